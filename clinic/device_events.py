"""What normalization says about a device's stream besides its readings: sequence gaps,
resets (reboots) and clock jumps, as the worker writes them to ``vitals.events``
(:class:`streams.sequence.SequenceEvent`, :class:`streams.clock.ClockEvent`, JSON, keyed by
device id).

A chart must draw these, not hide them: a gap is readings the device numbered but that never
arrived, which a time-based break alone misses when the device's other metrics kept the
clock moving. They carry no measured value, but they are about a patient, so the fan-out
discloses them through the same consent check as readings (:mod:`clinic.live`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vitalproof.errors import WireFormatError

KINDS = ("gap", "reset", "clock_jump")
#: What else the topic carries, for others to read: the service's own break-glass alerts.
OTHER_KINDS = ("break_glass",)


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    kind: str  # one of KINDS
    device_id: str
    patient_id: str
    device_time_us: int  # where on the device's time axis it happened
    receive_time_us: int | None
    last_seq: int | None = None  # gap/reset: the highest sequence number seen before
    seq: int | None = None  # gap/reset: the one that revealed it
    missing: int = 0  # gap: how many numbers were skipped
    step_us: int | None = None  # clock_jump: how far the device clock moved

    @property
    def key(self) -> str:
        """The same event read twice (a replay of the topic) has the same key."""
        where = self.seq if self.seq is not None else self.device_time_us
        return f"{self.device_id}:{self.kind}:{where}:{self.device_time_us}"

    def describe(self) -> str:
        """The marker's label, in words."""
        if self.kind == "gap":
            n = self.missing
            return f"gap: {n} reading{'s' if n != 1 else ''} missing"
        if self.kind == "reset":
            return f"device reset: counting again from {self.seq}"
        step = (self.step_us or 0) / 1e6
        return f"clock jump: {step:+.1f} s"

    def compact(self) -> dict[str, Any]:
        """The chart's form (``event`` tells it from a reading)."""
        return {
            "event": self.kind,
            "key": self.key,
            "patient": self.patient_id,
            "device": self.device_id,
            "t_us": self.device_time_us,
            "received_us": self.receive_time_us,
            "last_seq": self.last_seq,
            "seq": self.seq,
            "missing": self.missing,
            "step_us": self.step_us,
            "label": self.describe(),
        }


def decode(value: bytes, patient_of: Callable[[str], str | None]) -> DeviceEvent | None:
    """One ``vitals.events`` record; the patient from the record, else from the registry
    (``patient_of``); None for the topic's other kinds (:data:`OTHER_KINDS`). Raises
    :class:`WireFormatError` naming what is wrong."""
    try:
        doc = json.loads(value)
    except (ValueError, UnicodeDecodeError) as e:
        raise WireFormatError(f"device event: not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise WireFormatError("device event: not a JSON object")
    kind = doc.get("kind")
    if kind in OTHER_KINDS:
        return None
    if kind not in KINDS:
        raise WireFormatError(f"device event: kind {kind!r} is not one of {', '.join(KINDS)}")
    device = doc.get("device_id")
    if not isinstance(device, str) or not device:
        raise WireFormatError("device event: device_id missing")
    patient = doc.get("patient_id") or patient_of(device)
    if not isinstance(patient, str) or not patient:
        raise WireFormatError(f"device event: device {device} belongs to no enrolled patient")
    t = _int(doc, "device_time_us", required=True)
    assert t is not None
    if kind == "clock_jump":
        old, new = _int(doc, "old_offset_us"), _int(doc, "new_offset_us")
        step = _int(doc, "step_us")
        if step is None and old is not None and new is not None:
            step = new - old
        return DeviceEvent(kind, device, patient, t, _int(doc, "receive_time_us"), step_us=step)
    return DeviceEvent(
        kind,
        device,
        patient,
        t,
        _int(doc, "receive_time_us"),
        last_seq=_int(doc, "last_seq", required=True),
        seq=_int(doc, "seq", required=True),
        missing=_int(doc, "missing") or 0,
    )


def _int(doc: dict[str, Any], name: str, *, required: bool = False) -> int | None:
    value = doc.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireFormatError(f"device event: {name} must be an integer, got {value!r}")
    return value
