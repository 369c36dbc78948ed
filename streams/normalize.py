"""Normalization: one raw record in, one clean SampleBatch or one rejection out.

Pure logic (the registry lookup is passed in), so every rule is unit-testable without Kafka.
Rules: a known, active device; a supported encoding; canonical UCUM units (converting the few
that differ); plausibility ranges and implausible clocks *flag* a reading, they never drop it.
A message that cannot be trusted as a whole (wrong encoding, unknown unit) is rejected whole,
with the original bytes, to the DLQ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vitalproof.errors import UnitError, WireFormatError
from vitalproof.raw import RawRecord
from vitalproof.registry import Device, DeviceStatus
from vitalproof.schema import Quality, SampleBatch, runs_of
from vitalproof.units import CANONICAL_UNIT, PLAUSIBLE, Metric, conversion_for
from vitalproof.wire.codecs import decode_samples

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
        metric = _METRIC_BY_NAME.get(metric_name) or Metric(metric_name)
        canonical = CANONICAL_UNIT[metric]
        units = batch.unit[start:stop]
        if units.count(canonical) == len(units):  # the usual case: one canonical unit
            _flag_run(batch, metric, start, stop, received_us, not_before, convert=False)
            continue
        for unit, ustart, ustop in runs_of(units, start):
            conv = unit != canonical
            _flag_run(batch, metric, ustart, ustop, received_us, not_before, convert=conv)


# Plain ints: ``Quality`` arithmetic (``Flag.__or__``, ``EnumType.__call__``) costs a Python
# call per operation, which per sample was most of a flagged run's cost.
_INVALID = int(Quality.INVALID)
_IMPLAUSIBLE = int(Quality.IMPLAUSIBLE)
_CONVERTED = int(Quality.CONVERTED)
_CLOCK_FUTURE = int(Quality.CLOCK_FUTURE)
_CLOCK_PAST = int(Quality.CLOCK_PAST)
_BEFORE_ENROLLMENT = int(Quality.BEFORE_ENROLLMENT)
_METRIC_BY_NAME = {m.value: m for m in Metric}


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
    """Convert and flag samples ``start:stop`` (one metric, one unit).

    Each test is decided for the whole run from its min and max where it can be: a flag
    that holds for every sample (a backlog from before enrollment, a clock reset) is
    OR-ed in once per run; only a test that splits the run makes one list of per-sample
    flags (list comprehensions over ints, no ``Quality`` objects). The clock tests cannot
    both hold for one sample: the future bound lies after the past one.
    """
    flags = 0  # for every sample of the run
    values = batch.value[start:stop]
    if convert:
        conv = conversion_for(metric, batch.unit[start])  # UnitError: reject the message
        if conv is not None:
            scale, offset = conv
            values = [v * scale + offset for v in values]
            batch.value[start:stop] = values
            batch.unit[start:stop] = [CANONICAL_UNIT[metric]] * (stop - start)
            flags |= _CONVERTED
    per_sample: list[list[int]] = []
    lo, hi = PLAUSIBLE[metric]
    total = sum(values)
    if not (total == total and lo <= min(values) and max(values) <= hi):  # NaN or range
        per_sample.append(
            [_INVALID if v != v else 0 if lo <= v <= hi else _IMPLAUSIBLE for v in values]
        )
    times = batch.device_time_us[start:stop]
    tmin, tmax = min(times), max(times)
    if received_us:
        future = received_us + FUTURE_TOLERANCE_US
        past = received_us - PAST_LIMIT_US
        flags |= _split(times, tmin, tmax, future, _CLOCK_FUTURE, per_sample, above=True)
        flags |= _split(times, tmin, tmax, past, _CLOCK_PAST, per_sample, above=False)
    if not_before is not None:
        flags |= _split(times, tmin, tmax, not_before, _BEFORE_ENROLLMENT, per_sample, above=False)
    if not flags and not per_sample:
        return
    quality = batch.quality[start:stop]
    if flags:
        quality = [q | flags for q in quality]
    for extra in per_sample:
        quality = [q | f for q, f in zip(quality, extra, strict=True)]
    batch.quality[start:stop] = quality


def _split(
    times: list[int],
    tmin: int,
    tmax: int,
    bound: int,
    flag: int,
    per_sample: list[list[int]],
    *,
    above: bool,
) -> int:
    """``flag`` for times beyond ``bound`` (``above`` it, or else below it).

    Returns ``flag`` if every time is beyond it, 0 if none or some are; for some, appends
    the per-sample flags to ``per_sample``.
    """
    if above:
        if tmax <= bound:
            return 0
        if tmin > bound:
            return flag
        per_sample.append([flag if t > bound else 0 for t in times])
    else:
        if tmin >= bound:
            return 0
        if tmax < bound:
            return flag
        per_sample.append([flag if t < bound else 0 for t in times])
    return 0
