"""Sequence tracking: which readings a device numbered but never delivered, and reboots.

Devices number their samples (one counter per device, as a flash log does). Normalization
feeds every accepted batch through a :class:`SequenceTracker`, which reports

* a **gap** when the sequence jumps forward: the numbers in between were lost on the way
  (a dropped BLE link, a device buffer overflow) or are still to come out of order;
* a **reset** when the sequence goes backwards while the device clock moves forward: the
  device rebooted and started counting again.

A sample that is merely late (lower seq *and* older time) is reordering, not an event. Pure
logic; the Faust agent produces the events to ``vitals.events`` and keeps the counters.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Literal

from vitalproof.schema import SampleBatch


@dataclass(frozen=True, slots=True)
class SequenceEvent:
    kind: Literal["gap", "reset"]
    device_id: str
    patient_id: str | None
    last_seq: int  # the highest sequence number seen before
    seq: int  # the one that revealed the gap or reset
    missing: int  # gap: how many numbers were skipped; reset: 0
    device_time_us: int
    receive_time_us: int | None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()


class SequenceTracker:
    """Last (seq, device time) per device; bounded (least recently seen devices forgotten)."""

    def __init__(self, max_devices: int = 1_000_000) -> None:
        self.max_devices = max_devices
        self._last: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self.gaps = 0
        self.missing = 0
        self.resets = 0

    def observe(self, batch: SampleBatch) -> list[SequenceEvent]:
        if not len(batch):
            return []
        events: list[SequenceEvent] = []
        # one (seq, time) per distinct seq, in sequence order
        firsts: dict[int, int] = {}
        for s, t in zip(batch.seq, batch.device_time_us, strict=True):
            if s not in firsts or t < firsts[s]:
                firsts[s] = t
        last = self._last.get(batch.device_id)
        for seq in sorted(firsts):
            t = firsts[seq]
            if last is None:
                last = (seq, t)
                continue
            last_seq, last_t = last
            if seq == last_seq + 1 or seq == last_seq:
                last = (seq, max(t, last_t))
            elif seq > last_seq + 1:
                missing = seq - last_seq - 1
                events.append(self._event("gap", batch, last_seq, seq, missing, t))
                self.gaps += 1
                self.missing += missing
                last = (seq, max(t, last_t))
            elif t > last_t:  # counting again from a lower number, later in time: a reboot
                events.append(self._event("reset", batch, last_seq, seq, 0, t))
                self.resets += 1
                last = (seq, t)
            # else: an older sample arriving late (reordering): no event
        assert last is not None
        self._last[batch.device_id] = last
        self._last.move_to_end(batch.device_id)
        while len(self._last) > self.max_devices:
            self._last.popitem(last=False)
        return events

    @staticmethod
    def _event(
        kind: Literal["gap", "reset"],
        batch: SampleBatch,
        last_seq: int,
        seq: int,
        missing: int,
        t: int,
    ) -> SequenceEvent:
        return SequenceEvent(
            kind,
            batch.device_id,
            batch.patient_id,
            last_seq,
            seq,
            missing,
            t,
            batch.receive_time_us,
        )
