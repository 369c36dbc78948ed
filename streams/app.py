"""The Faust topology: normalize (vitals.raw -> vitals.clean | vitals.dlq) and seal
(vitals.clean -> encrypted Parquet + manifest -> vitals.batches).

Messages carry many samples each and travel as raw bytes (``value_serializer='raw'``): Faust's
per-event overhead is paid per message, never per sample.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, cast

import faust

from streams.batcher import Pending, Sealer
from streams.clock import ClockEstimator
from streams.keystore import LocalKeystore
from streams.normalize import RecentIds, Rejection, normalize
from streams.sequence import SequenceTracker
from vitalproof.crashpoints import crashpoint
from vitalproof.errors import WireFormatError
from vitalproof.manifest import BatchManifest
from vitalproof.raw import H_DLQ_ORIGIN, H_DLQ_REASON, H_DLQ_STAGE, RawRecord
from vitalproof.registry import Registry
from vitalproof.schema import SampleBatch
from vitalproof.settings import Settings

log = logging.getLogger(__name__)


def dlq_headers(
    reason: str, stage: str, origin: str, original: dict[str, bytes]
) -> dict[str, bytes]:
    headers = dict(original)
    headers[H_DLQ_REASON] = reason.encode()
    headers[H_DLQ_STAGE] = stage.encode()
    headers[H_DLQ_ORIGIN] = origin.encode()
    return headers


def create_app(settings: Settings) -> faust.App:
    prefix = settings.namespace
    datadir = settings.home / "faust" / prefix
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        f"vitalproof-{prefix}",
        broker=f"kafka://{settings.kafka_bootstrap}",
        value_serializer="raw",
        key_serializer="raw",
        store="memory://",
        datadir=str(datadir),
        web_enabled=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        broker_commit_interval=1.0,
        # A worker killed with -9 keeps its partitions until the group notices: 10 s, not
        # Faust's 60 s, before a restarted or surviving worker takes over.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        stream_wait_empty=False,
    )
    raw_topic = app.topic(settings.topic_raw, value_serializer="raw", key_serializer="raw")
    clean_topic = app.topic(settings.topic_clean, value_serializer="raw", key_serializer="raw")
    dlq_topic = app.topic(settings.topic_dlq, value_serializer="raw", key_serializer="raw")
    batches_topic = app.topic(settings.topic_batches, value_serializer="raw", key_serializer="raw")
    events_topic = app.topic(settings.topic_events, value_serializer="raw", key_serializer="raw")

    @app.agent(raw_topic)
    async def normalize_agent(stream: faust.StreamT[Any]) -> None:
        registry = Registry(settings.registry_path)
        recent = RecentIds()
        sequences = SequenceTracker()
        clocks = ClockEstimator()
        async for event in stream.events():
            msg = event.message
            raw = RawRecord.from_kafka(event.value or b"", _headers(event))
            result = normalize(raw, registry.lookup)
            if isinstance(result, Rejection):
                await dlq_topic.send(
                    key=raw.device_id.encode(),
                    value=raw.payload,
                    headers=dlq_headers(
                        result.reason,
                        "normalize",
                        f"{msg.topic}/{msg.partition}/{msg.offset}",
                        _headers(event),
                    ),
                )
                continue
            recent.drop_seen(result)
            for seq_event in sequences.observe(result):
                await events_topic.send(key=raw.device_id.encode(), value=seq_event.to_json())
                log.info(
                    "%s on %s: seq %d after %d (gaps %d, missing %d, resets %d so far)",
                    seq_event.kind,
                    seq_event.device_id,
                    seq_event.seq,
                    seq_event.last_seq,
                    sequences.gaps,
                    sequences.missing,
                    sequences.resets,
                )
            for clock_event in clocks.observe(result):
                await events_topic.send(key=raw.device_id.encode(), value=clock_event.to_json())
                log.info("%s (%d clock jumps so far)", clock_event.describe(), clocks.jumps)
            if len(result):
                assert result.patient_id is not None
                await clean_topic.send(key=result.patient_id.encode(), value=result.to_json())
                crashpoint("after_normalize")

    @app.agent(clean_topic)
    async def seal_agent(stream: faust.StreamT[Any]) -> None:
        sealer = Sealer(settings.lake_dir, LocalKeystore(settings.keys_dir))
        for unsent in sealer.unproduced():
            await _produce_manifest(batches_topic, sealer, unsent)
        take = cast(faust.Stream[Any], stream).noack_take
        async for events in take(settings.batch_max_messages, within=settings.batch_max_age_s):
            for chunk in _chunks_by_rows(events, settings.batch_max_rows):
                items, rejected = _decode_pending(chunk)
                for event, reason in rejected:
                    msg = event.message
                    await dlq_topic.send(
                        key=event.key,
                        value=event.value,
                        headers=dlq_headers(
                            reason,
                            "seal",
                            f"{msg.topic}/{msg.partition}/{msg.offset}",
                            _headers(event),
                        ),
                    )
                manifest: BatchManifest | None = await asyncio.to_thread(sealer.seal, items)
                if manifest is not None:
                    await _produce_manifest(batches_topic, sealer, manifest)
                    log.info(
                        "sealed %s: %d rows, %d files",
                        manifest.batch_id,
                        manifest.rows,
                        len(manifest.files),
                    )
                for event in chunk:
                    await stream.ack(event)
                crashpoint("after_ack")

    return app


async def _produce_manifest(topic: faust.TopicT, sealer: Sealer, manifest: BatchManifest) -> None:
    fut = await topic.send(key=manifest.batch_id.encode(), value=manifest.to_json_bytes())
    await fut  # Kafka acknowledged (acks=all) before the ledger calls it produced
    crashpoint("after_produce")
    sealer.mark_produced(manifest)


def _headers(event: Any) -> dict[str, bytes]:
    h = event.headers or {}
    return {k: (v if isinstance(v, bytes) else str(v).encode()) for k, v in dict(h).items()}


def _chunks_by_rows(events: Sequence[Any], max_rows: int) -> list[list[Any]]:
    """Split one take into consecutive chunks of at most ~``max_rows`` samples each.

    Consecutive chunks keep each partition's offsets contiguous and non-overlapping, which is
    what makes a batch id (derived from the offsets it covers) deterministic.
    """
    chunks: list[list[Any]] = [[]]
    rows = 0
    for e in events:
        n = _count_hint(e)
        if chunks[-1] and rows + n > max_rows:
            chunks.append([])
            rows = 0
        chunks[-1].append(e)
        rows += n
    return chunks


def _count_hint(event: Any) -> int:
    # The clean wire JSON lists every value; counting commas is a cheap upper bound that
    # spares a full decode here (the sealer decodes once).
    value: bytes = event.value or b""
    return max(1, value.count(b","))


def _decode_pending(events: list[Any]) -> tuple[list[Pending], list[tuple[Any, str]]]:
    items: list[Pending] = []
    rejected: list[tuple[Any, str]] = []
    for e in events:
        m = e.message
        try:
            batch = SampleBatch.from_json(e.value or b"")
        except WireFormatError as err:
            rejected.append((e, str(err)))
            continue
        items.append(Pending(m.topic, m.partition, m.offset, batch))
    return items, rejected
