"""Per-device clock offset: how far each device's clock is from the receive clock.

Every message gives one observation, ``receive time - newest device time in it``. That is the
device clock's offset *plus* the delivery delay, and a delay is never negative, so the
smallest recent observation is the best estimate of the offset (NTP's minimum filter). The
estimate is what to add to a device time to get receive-clock time; it travels with the data
(``SampleBatch.clock_offset_us``) and never changes a device time, a reading id or a leaf:
it is an estimate, re-learned after a worker restart, not part of what a reading *is*.

Three things the plain minimum gets wrong, and what :class:`ClockEstimator` does instead:

* A **late** message (buffered, reordered, a backlog upload) has a large observation; it
  never lowers a minimum, and observations more than ``threshold_us`` above the estimate
  are kept out of the window, so a backlog does not push the good ones out of it either.
* A **clock step** (reboot to a default date, an NTP correction, a user setting the time)
  moves every later observation by the same amount. A step down can only be a clock change
  (delays cannot be negative), a step up could also be a run of late messages; either is
  followed once ``confirm`` consecutive observations agree with each other (within
  ``threshold_us``) and disagree with the estimate on the same side. A backlog drains with
  *falling* observations (device time advances faster than receive time), so it does not
  look like agreement unless its messages each cover less than ``threshold_us /
  (confirm - 1)`` of device time; a single odd timestamp, early or late, is never followed.
* A jump of the estimate by more than ``threshold_us`` is reported as a :class:`ClockEvent`
  (the agent produces it to ``vitals.events`` next to the sequence events).

Samples whose time was made up from the receive time (``Quality.ESTIMATED_TIME``) say
nothing about the device clock and are left out. Pure logic: no I/O, no wall clock.
"""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass
from typing import Literal

from vitalproof.schema import Quality, SampleBatch

#: Defaults: a 32-message window, 6 messages to confirm a step, 2 s to call it a jump. The
#: threshold sits above the jitter a device adds itself (its newest sample is up to one
#: sampling period old when it sends: 1 s for 1 Hz vitals) plus network delay jitter.
WINDOW = 32
CONFIRM = 6
THRESHOLD_US = 2_000_000


@dataclass(frozen=True, slots=True)
class ClockEvent:
    kind: Literal["clock_jump"]
    device_id: str
    patient_id: str | None
    old_offset_us: int  # the estimate last reported (or learned) before the jump
    new_offset_us: int
    device_time_us: int  # newest device time of the message that completed the jump
    receive_time_us: int

    @property
    def step_us(self) -> int:
        """How far the device clock moved: positive = it was set back (or fell behind)."""
        return self.new_offset_us - self.old_offset_us

    def describe(self) -> str:
        """One line for the worker's log."""
        return (
            f"clock jump on {self.device_id}: offset {self.old_offset_us / 1e6:+.3f} s -> "
            f"{self.new_offset_us / 1e6:+.3f} s (step {self.step_us / 1e6:+.3f} s)"
        )

    def to_json(self) -> bytes:
        doc = asdict(self)
        doc["step_us"] = self.step_us
        return json.dumps(doc, separators=(",", ":")).encode()


@dataclass(slots=True)
class _DeviceClock:
    window: deque[int]
    pending: deque[int]  # consecutive observations off the estimate, all on one side
    pending_side: int = 0  # +1 above the estimate, -1 below
    estimate: int | None = None
    reported: int | None = None  # the estimate events are measured against
    warm: int = 0  # observations taken while learning (no events yet)


class ClockEstimator:
    """Clock offset estimate per device; bounded (least recently seen devices forgotten)."""

    def __init__(
        self,
        window: int = WINDOW,
        confirm: int = CONFIRM,
        threshold_us: int = THRESHOLD_US,
        max_devices: int = 1_000_000,
    ) -> None:
        if not 2 <= confirm <= window:
            raise ValueError(f"need 2 <= confirm <= window, got confirm={confirm} window={window}")
        if threshold_us <= 0:
            raise ValueError(f"threshold_us must be > 0, got {threshold_us}")
        self.window, self.confirm, self.threshold_us = window, confirm, threshold_us
        self.max_devices = max_devices
        self._devices: OrderedDict[str, _DeviceClock] = OrderedDict()
        self.jumps = 0

    def offset(self, device_id: str) -> int | None:
        """The current estimate for a device (None before its first usable message)."""
        d = self._devices.get(device_id)
        return None if d is None else d.estimate

    def observe(self, batch: SampleBatch) -> list[ClockEvent]:
        """Feed one normalized message; set its ``clock_offset_us``; return jump events."""
        rx = batch.receive_time_us
        times = batch.device_time_us
        made_up = Quality.ESTIMATED_TIME
        # set() and max() run in C: no Python step per sample unless a time was made up.
        if any(q & made_up for q in set(batch.quality)):
            times = [t for t, q in zip(times, batch.quality, strict=True) if not q & made_up]
        if not rx or not times:  # nothing to learn from: carry the current estimate
            batch.clock_offset_us = self.offset(batch.device_id)
            return []
        newest = max(times)
        old = self.update(batch.device_id, rx - newest)
        batch.clock_offset_us = self.offset(batch.device_id)
        if old is None:
            return []
        assert batch.clock_offset_us is not None
        return [
            ClockEvent(
                "clock_jump",
                batch.device_id,
                batch.patient_id,
                old,
                batch.clock_offset_us,
                newest,
                rx,
            )
        ]

    def update(self, device_id: str, observation_us: int) -> int | None:
        """Take one observation (receive - device time); return the old estimate on a jump."""
        d = self._device(device_id)
        if d.estimate is None or d.warm < self.confirm:
            # Learning: the plain minimum of the first few, whatever they are.
            d.window.append(observation_us)
            d.estimate = min(d.window)
            d.warm += 1
            d.reported = d.estimate
            return None
        diff = observation_us - d.estimate
        if abs(diff) <= self.threshold_us:
            d.window.append(observation_us)
            d.pending.clear()
            d.estimate = min(d.window)
        else:
            side = 1 if diff > 0 else -1
            if side != d.pending_side:
                d.pending.clear()
                d.pending_side = side
            d.pending.append(observation_us)
            if len(d.pending) == self.confirm and (
                max(d.pending) - min(d.pending) <= self.threshold_us
            ):
                d.window.clear()
                d.window.extend(d.pending)
                d.pending.clear()
                d.estimate = min(d.window)
        assert d.reported is not None
        if abs(d.estimate - d.reported) > self.threshold_us:
            old, d.reported = d.reported, d.estimate
            self.jumps += 1
            return old
        return None

    def _device(self, device_id: str) -> _DeviceClock:
        d = self._devices.get(device_id)
        if d is None:
            d = self._devices[device_id] = _DeviceClock(
                deque(maxlen=self.window), deque(maxlen=self.confirm)
            )
            while len(self._devices) > self.max_devices:
                self._devices.popitem(last=False)
        else:
            self._devices.move_to_end(device_id)
        return d
