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
from typing import Any, TypeAlias

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from clinic import device_events
from clinic.lake_replay import LakeReplay
from clinic.live import Event, Hub, Segment, Source, Subscription, SubscriptionError, compact
from vitalproof.errors import VitalproofError, WireFormatError
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
        bootstrap_servers=settings.kafka.bootstrap,
        group_id=group_id(settings),
        auto_offset_reset="latest",
        enable_auto_commit=True,
        max_partition_fetch_bytes=256 * 1024,
    )
    consumer.subscribe([settings.kafka.topic_clean, events_topic], listener=_Rebalance())
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


class _Rebalance(ConsumerRebalanceListener):
    """Says when the fan-out's partitions move (each move is a moment where readings could
    be skipped if a partition had no committed offset yet)."""

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked:
            log.info("fan-out: partitions revoked: %s", _tps(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("fan-out: partitions assigned: %s", _tps(assigned))


def _tps(tps: set[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}/{tp.partition}" for tp in sorted(tps)) or "none"


async def _positioned(consumer: AIOKafkaConsumer) -> bool:
    """Ready only once every assigned partition has a position: an assignment alone is not
    enough, because "latest" is resolved lazily, and a reading produced before it is resolved
    would be skipped by a fan-out that already said it was ready (a subscriber that started
    watching then would miss it)."""
    assigned = consumer.assignment()
    at = {tp: await consumer.position(tp) for tp in assigned}
    if at:
        log.info(
            "fan-out: ready at %s",
            ", ".join(f"{t.topic}/{t.partition}@{o}" for t, o in sorted(at.items())),
        )
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
    (:class:`clinic.live.Segment`): read back from Kafka by offset with a consumer of no
    group, and what Kafka no longer has (retention, deleted records) from the lake, whose rows
    keep their record's offset (:class:`clinic.lake_replay.LakeReplay`).

    The events are re-made as they were delivered (same numbers, same order); whether each
    may still be sent is decided by the caller at sending, as for held events. What neither
    has (device events past retention, batches not sealed yet, erased patients' readings) is
    not silently skipped: :class:`Gone` names the event numbers, the partition, the offsets
    and the time, so the client can search the lake's history for that time instead. A
    segment is replayed whole or not at all: its count must come out as delivered."""

    def __init__(self, settings: Settings, hub: Hub) -> None:
        self.settings = settings
        self.hub = hub
        self._registry = Registry(settings.paths.registry_path)
        self.lake = LakeReplay(settings)
        self.from_lake = 0  # events re-made from the lake (for tests and /status)

    def _patient_of(self, device_id: str) -> str | None:
        device = self._registry.lookup(device_id)
        return device.patient_id if device else None

    async def replay(self, sub: Subscription, since: int, until: int, limit: int) -> list[Event]:
        """Events ``since+1 .. until`` (at most ``limit``, oldest first) from Kafka or the
        lake; fewer if a later segment is gone (the next call from the last one names it)."""
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
        read: dict[TopicPartition, dict[int, Record]] = {}
        starts: dict[TopicPartition, int] = {}
        try:
            await consumer.start()
            for tp, (lo, hi, oldest) in ranges.items():
                consumer.assign([tp])
                starts[tp] = start = (await consumer.beginning_offsets([tp]))[tp]
                read[tp] = {}
                if hi >= start:  # what is older than the partition's start is the lake's
                    read[tp] = await self._read(consumer, sub, tp, max(lo, start), hi, oldest)
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
            tp = TopicPartition(g.source.topic, g.source.partition)
            try:
                try:
                    readings = await self._readings(sub, g, read[tp], starts[tp])
                    out.extend(self._events(sub, g, starts[tp], readings, since, until))
                except Gone:
                    if g.source.first_offset >= starts[tp]:
                        raise
                    self.lake.relist()  # a batch sealed since the lake was listed: once more
                    readings = await self._readings(sub, g, read[tp], starts[tp])
                    out.extend(self._events(sub, g, starts[tp], readings, since, until))
            except Gone:
                if out:  # what came back before it; the client asks again from there
                    return out
                raise
        return out

    async def _readings(
        self, sub: Subscription, seg: Segment, by_offset: dict[int, Record], start: int
    ) -> list[tuple[str, str, dict[str, Any]]]:
        """(patient, metric, compact body) of every reading or device event of the
        segment's records, in delivery order: from the lake below Kafka's ``start``, from
        Kafka's records from it."""
        src = seg.source
        out: list[tuple[str, str, dict[str, Any]]] = []
        if src.first_offset < start:
            if src.topic == self.settings.kafka.topic_events:  # device events are not sealed
                raise Gone(
                    f"events from {seg.first} of subscription {sub.id} came from {src.topic}"
                    f" partition {src.partition} offsets from {src.first_offset}, which Kafka"
                    f" no longer holds (it starts at offset {start}); search Observation"
                    f" history from {_when(src)}"
                )
            patients = sorted({p for p, _ in seg.pairs})
            hi = min(src.last_offset, start - 1)
            try:
                sealed = await asyncio.to_thread(
                    self.lake.readings, src.topic, src.partition, src.first_offset, hi, patients
                )
            except VitalproofError as e:
                raise Gone(self._lake_lost(sub, seg, start, f"the lake: {e}")) from None
            out.extend((r.patient_id, r.metric, r.body) for r in sealed)
        records = [
            by_offset[o]
            for o in range(max(src.first_offset, start), src.last_offset + 1)
            if o in by_offset
        ]
        if src.topic == self.settings.kafka.topic_events:
            out.extend((ev.patient_id, "", ev.compact()) for ev, _ in self._decoded(records))
            return out
        for batch in _batches(records):
            if not batch.reading_id:
                batch.fill_reading_ids()
            patient = batch.patient_id or ""
            out.extend(
                (patient, m, compact(batch, i))
                for i, m in enumerate(batch.metric)
                if (patient, m) in seg.pairs
            )
        return out

    def _decoded(self, records: list[Record]) -> list[tuple[device_events.DeviceEvent, Record]]:
        return _device_events(records, self._patient_of)

    def _lake_lost(self, sub: Subscription, seg: Segment, start: int, what: str) -> str:
        src = seg.source
        return (
            f"events {seg.first}..{seg.last} of subscription {sub.id} came from {src.topic}"
            f" partition {src.partition} offsets {src.first_offset}..{src.last_offset}, which"
            f" Kafka no longer holds (it starts at offset {start}), and {what}; search"
            f" Observation history from {_when(src)}"
        )

    async def _read(
        self,
        consumer: AIOKafkaConsumer,
        sub: Subscription,
        tp: TopicPartition,
        lo: int,
        hi: int,
        oldest: Segment,
    ) -> dict[int, Record]:
        """Records ``lo..hi`` of one partition (assigned, ``lo`` not before its start), by
        offset."""
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

    def _events(
        self,
        sub: Subscription,
        seg: Segment,
        start: int,
        readings: list[tuple[str, str, dict[str, Any]]],
        since: int,
        until: int,
    ) -> list[Event]:
        out: list[Event] = []
        n = seg.first - 1
        for patient, metric, body in readings:
            if (patient, metric) in seg.pairs:
                n += 1
                if since < n <= until:
                    out.append(Event(n, patient, metric, body))
        if n != seg.last:  # never silently renumbered
            src = seg.source
            below = (
                f", which Kafka no longer holds below offset {start}," if src.first_offset < start
                else ""
            )  # fmt: skip
            raise Gone(
                f"events {seg.first}..{seg.last} of subscription {sub.id} came from"
                f" {src.topic} partition {src.partition} offsets {src.first_offset}.."
                f"{src.last_offset}{below} and Kafka and the lake give back"
                f" {n - seg.first + 1} of them (the rest: not sealed yet, or an erased"
                f" patient's); search Observation history from {_when(src)}"
            )
        return out


def _when(src: Source) -> str:
    when = dt.datetime.fromtimestamp(src.timestamp_ms / 1000, dt.UTC)
    return when.isoformat(timespec="seconds")
