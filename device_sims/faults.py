"""Fault injection as a reproducible transform of the device message stream.

Input: ``(device_id, payload bytes)`` messages in send order. Output: :data:`Event` s that
the fleet carries out: :class:`Send` (publish these bytes), :class:`Drop` (the message never
left the device) and :class:`Storm` (a group of devices loses its connections at once).

Why a transform over bytes rather than hooks inside the simulator: the faults are what a
real network and real firmware do *to* correct payloads, and the ground truth must describe
exactly the bytes on the wire. Clock and sequence faults therefore rewrite the payload the
device produced (and keep doing so for the rest of the run, as a skewed clock or a rebooted
counter would).

Why one ``random.Random`` per device: fault decisions for a device depend only on the seed,
the spec and that device's own messages, not on how the fleet interleaves devices in time,
so a run is reproducible even though wall-clock scheduling is not. Every message draws one
number per fault kind whether or not that fault is enabled, so raising ``drop`` does not
change where duplicates land.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

FAULT_KEYS = ("dup", "reorder", "drop", "malformed", "skew", "jump", "reset", "storm")


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """Per-message probabilities of each fault (all 0 = a clean run)."""

    dup: float = 0.0  # the device sends the same payload twice
    reorder: float = 0.0  # the message is overtaken by the device's next one
    drop: float = 0.0  # the message is lost before reaching the broker
    malformed: float = 0.0  # the payload is replaced by deliberately broken bytes
    skew: float = 0.0  # the device clock drifts by a few seconds (persistent)
    jump: float = 0.0  # the device clock jumps by hours or days (persistent)
    reset: float = 0.0  # the device reboots: its sequence counter restarts at 0
    storm: float = 0.0  # a group of devices drops its connections and reconnects at once

    def __str__(self) -> str:
        return ",".join(f"{k}={getattr(self, k):g}" for k in FAULT_KEYS)

    @property
    def any(self) -> bool:
        return any(getattr(self, k) > 0 for k in FAULT_KEYS)


def parse_fault_spec(spec: str | None) -> FaultSpec:
    """Parse ``"dup=0.01,drop=0.001"``; omitted keys are 0. Empty/``none`` = no faults.

    Raises ``ValueError`` with a one-line message naming the offending part.
    """
    if spec is None or spec.strip().lower() in ("", "none", "off"):
        return FaultSpec()
    values: dict[str, float] = {}
    for raw in spec.split(","):
        part = raw.strip()
        if not part:
            continue
        key, sep, val = part.partition("=")
        key, val = key.strip(), val.strip()
        if key not in FAULT_KEYS:
            raise ValueError(f"fault spec: unknown fault {key!r} (known: {', '.join(FAULT_KEYS)})")
        if not sep or not val:
            raise ValueError(f"fault spec: {key!r} needs a probability, like {key}=0.01")
        if key in values:
            raise ValueError(f"fault spec: {key!r} given twice")
        try:
            p = float(val)
        except ValueError:
            raise ValueError(f"fault spec: {key}={val!r} is not a number") from None
        if not 0.0 <= p <= 1.0:  # also rejects NaN
            raise ValueError(f"fault spec: {key}={val} is not a probability in [0, 1]")
        values[key] = p
    return FaultSpec(**values)


# -- events ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Publish ``payload`` for ``device_id``."""

    device_id: str
    payload: bytes
    malformed: str | None = None  # why the payload is broken (a MALFORMED_KINDS entry)
    duplicate: bool = False  # a repeat of the previous Send of the same payload
    reordered: bool = False  # sent after a message the device produced later


@dataclass(frozen=True, slots=True)
class Drop:
    """The message was lost: its readings never reach the broker."""

    device_id: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Storm:
    """These devices lose their connections now and reconnect (a reconnect storm)."""

    device_ids: tuple[str, ...]


Event = Send | Drop | Storm

MALFORMED_KINDS = (
    "truncated_json",
    "not_utf8",
    "not_an_object",
    "wrong_schema",
    "unknown_metric",
    "string_value",
    "float_seq",
    "length_mismatch",
    "empty_series",
    "wrong_device",
)


def malform(payload: bytes, kind: str, rng: random.Random) -> bytes:
    """A deliberately broken variant of a valid device payload.

    Each kind is a mistake real firmware or a flaky link makes; every one of them must be
    rejected by :meth:`vitalproof.schema.SampleBatch.from_json` (tests check this).
    """
    if kind == "truncated_json":
        # A proper prefix of a JSON object is never valid JSON.
        return payload[: rng.randrange(1, max(2, len(payload)))]
    if kind == "not_utf8":
        return b'{"schema":1,"device_id":"\xff\xfe\xfd","series":[]}'
    if kind == "not_an_object":
        return b"[" + payload + b"]"
    doc: dict[str, Any] = json.loads(payload)
    first = doc["series"][0]
    if kind == "wrong_schema":
        doc["schema"] = rng.choice([0, 2, 99, "1", None])
    elif kind == "unknown_metric":
        first["metric"] = rng.choice(["heart_rat", "mood", "HeartRate", ""])
    elif kind == "string_value":
        first["v"][0] = str(first["v"][0])
    elif kind == "float_seq":
        first["seq"][0] = first["seq"][0] + 0.5
    elif kind == "length_mismatch":
        first["t"] = first["t"][:-1]
    elif kind == "empty_series":
        doc["series"] = []
    elif kind == "wrong_device":
        doc["device_id"] = f"{doc.get('device_id', 'dev')}-impostor"
    else:
        raise ValueError(f"unknown malformed kind {kind!r}")
    return json.dumps(doc, separators=(",", ":")).encode()


def shift_payload(payload: bytes, offset_us: int, seq_base: int) -> bytes:
    """Add ``offset_us`` to every device time and subtract ``seq_base`` from every seq."""
    doc: dict[str, Any] = json.loads(payload)
    for s in doc["series"]:
        if offset_us:
            s["t"] = [t + offset_us for t in s["t"]]
        if seq_base:
            s["seq"] = [q - seq_base for q in s["seq"]]
    return json.dumps(doc, separators=(",", ":")).encode()


def _min_seq(payload: bytes) -> int:
    doc = json.loads(payload)
    return min(q for s in doc["series"] for q in s["seq"])


@dataclass(slots=True)
class _DeviceFaults:
    decide: random.Random  # one draw per fault kind per message
    params: random.Random  # magnitudes, kinds, groups
    offset_us: int = 0  # accumulated skew and jumps
    seq_base: int = 0  # original seq that became 0 at the last reset
    held: list[Send] = field(default_factory=list)  # waiting to be overtaken (reorder)
    messages: int = 0


@dataclass(slots=True)
class FaultCounts:
    """What the injector did, for reports and tests."""

    dup: int = 0
    reorder: int = 0
    drop: int = 0
    malformed: int = 0
    skew: int = 0
    jump: int = 0
    reset: int = 0
    storm: int = 0
    by_malformed_kind: dict[str, int] = field(default_factory=dict)


class FaultInjector:
    """Stateful, deterministic fault transform; feed messages with :meth:`apply`.

    ``device_ids`` (the whole fleet) lets a storm pick a group of other devices; without it
    a storm affects the sending device only. Call :meth:`flush` at the end to release
    messages held back for reordering.
    """

    def __init__(
        self, spec: FaultSpec | str | None, seed: int, device_ids: Sequence[str] = ()
    ) -> None:
        self.spec = spec if isinstance(spec, FaultSpec) else parse_fault_spec(spec)
        self.seed = seed
        self.device_ids = tuple(device_ids)
        self.counts = FaultCounts()
        self._devices: dict[str, _DeviceFaults] = {}
        self._probs = [getattr(self.spec, f.name) for f in fields(FaultSpec)]

    def _device(self, device_id: str) -> _DeviceFaults:
        d = self._devices.get(device_id)
        if d is None:
            d = self._devices[device_id] = _DeviceFaults(
                decide=random.Random(f"faults/{self.seed}/{device_id}/decide"),
                params=random.Random(f"faults/{self.seed}/{device_id}/params"),
            )
        return d

    def apply(self, device_id: str, payload: bytes) -> list[Event]:
        """The events that replace one message the device wants to send."""
        d, c = self._device(device_id), self.counts
        d.messages += 1
        hit = dict(zip(FAULT_KEYS, (d.decide.random() < p for p in self._probs), strict=True))
        events: list[Event] = []

        if hit["storm"]:
            c.storm += 1
            events.append(Storm(self._storm_group(device_id, d.params)))
        if hit["skew"]:
            c.skew += 1
            d.offset_us += round(d.params.choice((-1, 1)) * d.params.uniform(0.2, 30.0) * 1e6)
        if hit["jump"]:
            c.jump += 1
            hours = d.params.choice((1, 2, 24, 48, -1, -24, -24 * 400))
            d.offset_us += hours * 3_600_000_000 + d.params.randrange(1_000_000)
        if hit["reset"]:
            c.reset += 1
            d.seq_base = _min_seq(payload)
        if d.offset_us or d.seq_base:
            payload = shift_payload(payload, d.offset_us, d.seq_base)

        if hit["drop"]:
            c.drop += 1
            events.append(Drop(device_id, payload))
            return events

        kind: str | None = None
        if hit["malformed"]:
            kind = d.params.choice(MALFORMED_KINDS)
            c.malformed += 1
            c.by_malformed_kind[kind] = c.by_malformed_kind.get(kind, 0) + 1
            payload = malform(payload, kind, d.params)
        sends = [Send(device_id, payload, malformed=kind)]
        if hit["dup"]:
            c.dup += 1
            sends.append(Send(device_id, payload, malformed=kind, duplicate=True))

        if d.held:
            # The held message (and its duplicate, if any) is overtaken by this one.
            events.extend(sends)
            events.extend(d.held)
            d.held = []
        elif hit["reorder"]:
            c.reorder += 1
            d.held = [Send(s.device_id, s.payload, s.malformed, s.duplicate, True) for s in sends]
        else:
            events.extend(sends)
        return events

    def flush(self) -> list[Event]:
        """Release every message still held back for reordering (end of run)."""
        out: list[Event] = []
        for d in self._devices.values():
            out.extend(d.held)
            d.held = []
        return out

    def _storm_group(self, device_id: str, rng: random.Random) -> tuple[str, ...]:
        others = [x for x in self.device_ids if x != device_id]
        if not others:
            return (device_id,)
        size = max(1, min(len(others), round(rng.uniform(0.05, 0.25) * len(self.device_ids))))
        return (device_id, *sorted(rng.sample(others, size)))


def inject(
    messages: Iterable[tuple[str, bytes]],
    spec: FaultSpec | str | None,
    seed: int,
    device_ids: Sequence[str] = (),
) -> Iterator[Event]:
    """The pure form: a message stream in, an event stream out (held messages at the end)."""
    injector = FaultInjector(spec, seed, device_ids)
    for device_id, payload in messages:
        yield from injector.apply(device_id, payload)
    yield from injector.flush()
