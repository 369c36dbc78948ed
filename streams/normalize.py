"""Normalization: one raw record in, one clean SampleBatch or one rejection out.

Pure logic (the registry lookup is passed in), so every rule is unit-testable without Kafka.
Rules: a known, active device; a supported encoding; canonical UCUM units (converting the few
that differ); plausibility ranges and implausible clocks *flag* a reading, they never drop it.
A message that cannot be trusted as a whole (wrong encoding, unknown unit) is rejected whole,
with the original bytes, to the DLQ.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from vitalproof.codecs import decode_samples
from vitalproof.errors import WireFormatError
from vitalproof.raw import RawRecord
from vitalproof.registry import Device, DeviceStatus
from vitalproof.schema import Quality, SampleBatch, runs_of
from vitalproof.units import CANONICAL_UNIT, PLAUSIBLE, Metric, UnitError, conversion_for

FUTURE_TOLERANCE_US = 5 * 60 * 1_000_000  # device clocks drift; five minutes is plausible
PAST_LIMIT_US = 30 * 24 * 3600 * 1_000_000  # older than a month: a reset or wrong clock
#: Enrollment time is taken on the gateway's clock, device times on the device's: the same
#: five minutes of drift as for the future, before a reading counts as pre-enrollment.
ENROLLMENT_TOLERANCE_US = FUTURE_TOLERANCE_US


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str
    raw: RawRecord


def normalize(raw: RawRecord, lookup: Callable[[str], Device | None]) -> SampleBatch | Rejection:
    if not raw.device_id:
        return Rejection(f"no device id (source {raw.source!r})", raw)
    device = lookup(raw.device_id)
    if device is None:
        return Rejection(f"unknown device {raw.device_id}", raw)
    if device.status is not DeviceStatus.ACTIVE:
        return Rejection(f"retired device {raw.device_id}", raw)
    try:
        batch = decode_samples(raw.content_type, raw.payload, raw.device_id)
    except WireFormatError as e:
        return Rejection(str(e), raw)
    try:
        _canonicalize(batch, raw.received_us, enrolled_us=device.enrolled_us)
    except UnitError as e:
        return Rejection(str(e), raw)
    batch.patient_id = device.patient_id
    batch.gateway_id = raw.gateway_id
    batch.transport = raw.transport
    batch.receive_time_us = raw.received_us
    batch.fill_reading_ids()
    return batch


def _canonicalize(batch: SampleBatch, received_us: int, *, enrolled_us: int | None = None) -> None:
    """Convert units in place and set quality flags (never drop a sample).

    Per run of one metric (a batch holds a handful): the unit check, the conversion flag and
    the range and clock tests on the run's min and max. Only a run with something to flag
    (a NaN, an implausible value or clock) is walked sample by sample.

    ``enrolled_us`` (the device's enrollment time): samples timed before it, beyond
    :data:`ENROLLMENT_TOLERANCE_US`, are flagged BEFORE_ENROLLMENT. They are not the
    patient's as far as the registry knows (a device handed on keeps its old log, a clock
    reset to a factory date), so they are kept for a human to judge, never attributed
    silently. The flag is independent of CLOCK_PAST (older than a month before receipt):
    a reading can carry both, and a backlog recorded after enrollment carries neither.
    """
    not_before = None if enrolled_us is None else enrolled_us - ENROLLMENT_TOLERANCE_US
    for metric_name, start, stop in batch.runs():
        metric = Metric(metric_name)
        canonical = CANONICAL_UNIT[metric]
        units = batch.unit[start:stop]
        if units.count(canonical) == len(units):  # the usual case: one canonical unit
            _flag_run(batch, metric, start, stop, received_us, not_before, convert=False)
            continue
        for unit, ustart, ustop in runs_of(units, start):
            conv = unit != canonical
            _flag_run(batch, metric, ustart, ustop, received_us, not_before, convert=conv)


def _flag_run(
    batch: SampleBatch,
    metric: Metric,
    start: int,
    stop: int,
    received_us: int,
    not_before: int | None,
    *,
    convert: bool,
) -> None:
    flags = 0
    values = batch.value[start:stop]
    if convert:
        conv = conversion_for(metric, batch.unit[start])  # UnitError: reject the message
        if conv is not None:
            scale, offset = conv
            values = [v * scale + offset for v in values]
            batch.value[start:stop] = values
            batch.unit[start:stop] = [CANONICAL_UNIT[metric]] * (stop - start)
            flags |= Quality.CONVERTED
    lo, hi = PLAUSIBLE[metric]
    times = batch.device_time_us[start:stop]
    total = sum(values)
    clean = (
        total == total  # no NaN
        and lo <= min(values)
        and max(values) <= hi
        and (
            not received_us
            or (
                max(times) <= received_us + FUTURE_TOLERANCE_US
                and min(times) >= received_us - PAST_LIMIT_US
            )
        )
        and (not_before is None or min(times) >= not_before)
    )
    if clean:
        if flags:
            batch.quality[start:stop] = [q | flags for q in batch.quality[start:stop]]
        return
    quality = batch.quality
    for i in range(start, stop):
        q = quality[i] | flags
        v = batch.value[i]
        if math.isnan(v):
            q |= Quality.INVALID
        elif not lo <= v <= hi:
            q |= Quality.IMPLAUSIBLE
        t = batch.device_time_us[i]
        if received_us and t > received_us + FUTURE_TOLERANCE_US:
            q |= Quality.CLOCK_FUTURE
        elif received_us and t < received_us - PAST_LIMIT_US:
            q |= Quality.CLOCK_PAST
        if not_before is not None and t < not_before:
            q |= Quality.BEFORE_ENROLLMENT
        quality[i] = int(q)
