"""Normalization: one raw record in, one clean SampleBatch or one rejection out.

Pure logic (the registry lookup is passed in), so every rule is unit-testable without Kafka.
Rules: a known, active device; a supported encoding; canonical UCUM units (converting the few
that differ); plausibility ranges and implausible clocks *flag* a reading, they never drop it.
A message that cannot be trusted as a whole (wrong encoding, unknown unit) is rejected whole,
with the original bytes, to the DLQ.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from vitalproof.codecs import decode_samples
from vitalproof.errors import WireFormatError
from vitalproof.raw import RawRecord
from vitalproof.registry import Device, DeviceStatus
from vitalproof.schema import Quality, SampleBatch
from vitalproof.units import CANONICAL_UNIT, PLAUSIBLE, Metric, UnitError, conversion_for

FUTURE_TOLERANCE_US = 5 * 60 * 1_000_000  # device clocks drift; five minutes is plausible
PAST_LIMIT_US = 30 * 24 * 3600 * 1_000_000  # older than a month: a reset or wrong clock


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
        _canonicalize(batch, raw.received_us)
    except UnitError as e:
        return Rejection(str(e), raw)
    batch.patient_id = device.patient_id
    batch.gateway_id = raw.gateway_id
    batch.transport = raw.transport
    batch.receive_time_us = raw.received_us
    batch.fill_reading_ids()
    return batch


def _canonicalize(batch: SampleBatch, received_us: int) -> None:
    """Convert units in place and set quality flags (never drop a sample)."""
    for i in range(len(batch)):
        metric = Metric(batch.metric[i])
        q = batch.quality[i]
        conv = conversion_for(metric, batch.unit[i])
        v = batch.value[i]
        if conv is not None:
            scale, offset = conv
            v = v * scale + offset
            batch.unit[i] = CANONICAL_UNIT[metric]
            q |= Quality.CONVERTED
        if math.isnan(v):
            q |= Quality.INVALID
        else:
            lo, hi = PLAUSIBLE[metric]
            if not lo <= v <= hi:
                q |= Quality.IMPLAUSIBLE
        t = batch.device_time_us[i]
        if received_us and t > received_us + FUTURE_TOLERANCE_US:
            q |= Quality.CLOCK_FUTURE
        elif received_us and t < received_us - PAST_LIMIT_US:
            q |= Quality.CLOCK_PAST
        batch.value[i] = v
        batch.quality[i] = int(q)


class RecentIds:
    """Bounded memory of recently seen reading ids, for deduplication.

    Retransmissions arrive within seconds to minutes of the original, so a bounded LRU
    catches them without unbounded growth. (It lives in the worker's memory: a restart
    forgets it, and the batcher's own per-batch dedupe is then the last line.)
    """

    def __init__(self, capacity: int = 500_000) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[str, None] = OrderedDict()

    def drop_seen(self, batch: SampleBatch) -> int:
        """Remove samples already seen (in place); return how many were removed."""
        keep = []
        seen = self._seen
        for i, rid in enumerate(batch.reading_id):
            if rid in seen:
                seen.move_to_end(rid)
                continue
            seen[rid] = None
            keep.append(i)
        while len(seen) > self.capacity:
            seen.popitem(last=False)
        dropped = len(batch) - len(keep)
        if dropped:
            batch.keep_only(keep)
        return dropped
