"""The service's own reader of ``vitals.clean`` and ``vitals.events``: every clean reading,
and every device event (sequence gap, reset, clock jump) the worker found, handed to the hub.

Its own consumer group (``vitalproof-clinic-<namespace>``), so it never slows the sealer nor
moves the sealer's offsets; it starts at the end of the topic (a live view: history comes
from the lake) and commits as it goes. A record that does not decode is logged and skipped:
the sealer, not this reader, sends such records to the DLQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from typing import TypeAlias

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from clinic import device_events
from clinic.live import Event, Hub, Segment, Source, Subscription, SubscriptionError, compact
from vitalproof.errors import WireFormatError
from vitalproof.registry import Registry
from vitalproof.schema import SampleBatch
from vitalproof.settings import Settings
from vitalproof.wire import clean

log = logging.getLogger(__name__)
#: How long a replay waits for Kafka to answer a fetch.
REPLAY_TIMEOUT_MS = 5_000


class Gone(SubscriptionError):
    """Events that are neither held nor still in Kafka (the message names them)."""


def group_id(settings: Settings) -> str:
    return f"vitalproof-clinic-{settings.namespace}"


async def run_fanout(settings: Settings, hub: Hub, stop: asyncio.Event) -> None:
    """Read and fan out until ``stop``; an unreachable broker is retried, not fatal (the
    service's history and consent routes work without Kafka)."""
    while not stop.is_set():
        try:
            await _consume(settings, hub, stop)
        except (KafkaError, OSError) as e:
            hub.fanout_ready = False
            log.warning("fan-out: Kafka at %s: %s; retrying in 2 s", settings.kafka.bootstrap, e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)


async def _consume(settings: Settings, hub: Hub, stop: asyncio.Event) -> None:
    registry = Registry(settings.paths.registry_path)

    def patient_of(device_id: str) -> str | None:
        device = registry.lookup(device_id)
        return device.patient_id if device else None

    events_topic = settings.kafka.topic_events
    consumer = AIOKafkaConsumer(
        settings.kafka.topic_clean,
        events_topic,
        bootstrap_servers=settings.kafka.bootstrap,
        group_id=group_id(settings),
        auto_offset_reset="latest",
        enable_auto_commit=True,
        max_partition_fetch_bytes=256 * 1024,
    )
    await consumer.start()
    try:
        while not stop.is_set():
            got = await consumer.getmany(timeout_ms=200, max_records=500)
            if not hub.fanout_ready:
                hub.fanout_ready = await _positioned(consumer)
            elif not consumer.assignment():
                hub.fanout_ready = False
            for tp, records in got.items():
                if not records:
                    continue
                if tp.topic == events_topic:
                    decoded = _device_events(records, patient_of)
                    hub.deliver_device_events(
                        [e for e, _ in decoded], [_source([r]) for _, r in decoded]
                    )
                    continue
                hub.deliver(_batches(records), _source(records))
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()


async def _positioned(consumer: AIOKafkaConsumer) -> bool:
    """Ready only once every assigned partition has a position: an assignment alone is not
    enough, because "latest" is resolved lazily, and a reading produced before it is resolved
    would be skipped by a fan-out that already said it was ready (a subscriber that started
    watching then would miss it)."""
    assigned = consumer.assignment()
    for tp in assigned:
        await consumer.position(tp)
    return bool(assigned)


Record: TypeAlias = ConsumerRecord[bytes, bytes]


def _source(records: Sequence[Record]) -> Source:
    first, last = records[0], records[-1]
    return Source(first.topic, first.partition, first.offset, last.offset, first.timestamp)


def _batches(records: Sequence[Record]) -> list[SampleBatch]:
    """The readings of clean records, in order; a record that does not decode is logged and
    skipped (the same on replay, so the numbering is the same)."""
    batches = []
    for record in records:
        try:
            batches.extend(clean.decode_record(record.value or b""))
        except WireFormatError as e:
            log.warning("vitals.clean %s/%s: %s", record.partition, record.offset, e)
    return batches


def _device_events(
    records: Sequence[Record], patient_of: Callable[[str], str | None]
) -> list[tuple[device_events.DeviceEvent, Record]]:
    out = []
    for record in records:
        try:
            event = device_events.decode(record.value or b"", patient_of)
        except WireFormatError as e:
            log.warning("vitals.events %s/%s: %s", record.partition, record.offset, e)
            continue
        if event is not None:
            out.append((event, record))
    return out


class Replayer:
    """Events a subscription no longer holds, numbered again from the records they came from
    (:class:`clinic.live.Segment`), read back from Kafka by offset with a consumer of no group.

    The events are re-made as they were delivered (same numbers, same order); whether each
    may still be sent is decided by the caller at sending, as for held events. What Kafka no
    longer has (retention, deleted records) is not silently skipped: :class:`Gone` names the
    event numbers, the partition, the offsets and the time, so the client can search the
    lake's history for that time instead."""

    def __init__(self, settings: Settings, hub: Hub) -> None:
        self.settings = settings
        self.hub = hub
        self._registry = Registry(settings.paths.registry_path)

    def _patient_of(self, device_id: str) -> str | None:
        device = self._registry.lookup(device_id)
        return device.patient_id if device else None

    async def replay(self, sub: Subscription, since: int, until: int, limit: int) -> list[Event]:
        """Events ``since+1 .. until`` (at most ``limit``, oldest first) from Kafka."""
        until = min(until, since + limit)
        if until <= since:
            return []
        segments = [g for g in sub.segments if g.last > since and g.first <= until]
        covered = segments[0].first if segments else until + 1
        if covered > since + 1:
            raise Gone(
                f"events {since + 1}..{covered - 1} of subscription {sub.id} are no longer held"
                " and older than what the service noted of their source; search Observation"
                " history for that time"
            )
        ranges: dict[TopicPartition, tuple[int, int, Segment]] = {}
        for g in segments:  # one read per partition, over all its segments' offsets
            tp = TopicPartition(g.source.topic, g.source.partition)
            lo, hi, oldest = ranges.get(tp, (g.source.first_offset, g.source.last_offset, g))
            ranges[tp] = (min(lo, g.source.first_offset), max(hi, g.source.last_offset), oldest)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="none",
        )
        try:
            await consumer.start()
            read: dict[TopicPartition, dict[int, Record]] = {}
            for tp, (lo, hi, oldest) in ranges.items():
                read[tp] = await self._read(consumer, sub, tp, lo, hi, oldest)
        except KafkaError as e:  # incl. offsets deleted between the check and the fetch
            raise Gone(
                f"events {since + 1}..{until} of subscription {sub.id} are no longer held and"
                f" could not be read back from Kafka ({type(e).__name__}: {e}); search"
                " Observation history for that time"
            ) from None
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()
        out: list[Event] = []
        for g in segments:
            by_offset = read[TopicPartition(g.source.topic, g.source.partition)]
            records = [
                by_offset[o]
                for o in range(g.source.first_offset, g.source.last_offset + 1)
                if o in by_offset
            ]
            out.extend(self._events(g, records, since, until))
        return out

    async def _read(
        self,
        consumer: AIOKafkaConsumer,
        sub: Subscription,
        tp: TopicPartition,
        lo: int,
        hi: int,
        oldest: Segment,
    ) -> dict[int, Record]:
        """Records ``lo..hi`` of one partition, by offset."""
        consumer.assign([tp])
        start = (await consumer.beginning_offsets([tp]))[tp]
        if start > lo:
            when = dt.datetime.fromtimestamp(oldest.source.timestamp_ms / 1000, dt.UTC)
            raise Gone(
                f"events from {oldest.first} of subscription {sub.id} came from {tp.topic}"
                f" partition {tp.partition} offsets from {lo}, which Kafka no longer holds"
                f" (it starts at offset {start}); search Observation history from"
                f" {when.isoformat(timespec='seconds')}"
            )
        consumer.seek(tp, lo)
        records: dict[int, Record] = {}
        last = lo - 1
        while last < hi:
            got = await consumer.getmany(tp, timeout_ms=REPLAY_TIMEOUT_MS)
            batch = got.get(tp, [])
            if not batch:
                raise Gone(
                    f"events from {oldest.first} of subscription {sub.id}: {tp.topic}"
                    f" partition {tp.partition} gave nothing from offset {last + 1} within"
                    f" {REPLAY_TIMEOUT_MS} ms"
                )
            for r in batch:
                if r.offset <= hi:
                    records[r.offset] = r
                last = r.offset
        return records

    def _events(self, seg: Segment, records: list[Record], since: int, until: int) -> list[Event]:
        out: list[Event] = []
        n = seg.first - 1
        if seg.source.topic == self.settings.kafka.topic_events:
            for ev, _ in _device_events(records, self._patient_of):
                if (ev.patient_id, "") in seg.pairs:
                    n += 1
                    if since < n <= until:
                        out.append(Event(n, ev.patient_id, "", ev.compact()))
        else:
            patients = {p for p, _ in seg.pairs}
            for batch in _batches(records):
                patient = batch.patient_id or ""
                if patient not in patients:
                    continue
                if not batch.reading_id:
                    batch.fill_reading_ids()
                for i, metric in enumerate(batch.metric):
                    if (patient, metric) in seg.pairs:
                        n += 1
                        if since < n <= until:
                            out.append(Event(n, patient, metric, compact(batch, i)))
        if n != seg.last:  # never silently renumbered
            raise Gone(
                f"events {seg.first}..{seg.last}: the records at {seg.source.topic} partition"
                f" {seg.source.partition} offsets {seg.source.first_offset}.."
                f"{seg.source.last_offset} now give {n - seg.first + 1} of them; search"
                " Observation history for that time"
            )
        return out
