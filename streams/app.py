"""The Faust topology: normalize (vitals.raw -> vitals.clean | vitals.dlq) and seal
(vitals.clean -> encrypted Parquet + manifest -> vitals.batches).

Messages carry many samples each and travel as raw bytes (``value_serializer='raw'``): Faust's
per-event overhead is paid per message, never per sample.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast

import faust
from mode.utils.times import Seconds

from streams.batcher import Pending, Sealer
from streams.keystore import LocalKeystore
from streams.normalize import RecentIds, Rejection, normalize
from vitalproof.errors import WireFormatError
from vitalproof.manifest import BatchManifest
from vitalproof.raw import RawRecord
from vitalproof.registry import Registry
from vitalproof.schema import SampleBatch
from vitalproof.settings import Settings

log = logging.getLogger(__name__)

H_DLQ_REASON = "dlq-reason"
H_DLQ_STAGE = "dlq-stage"
H_DLQ_ORIGIN = "dlq-origin"  # topic/partition/offset of the rejected record


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
    app = faust.App(
        f"vitalproof-{prefix}",
        broker=f"kafka://{settings.kafka_bootstrap}",
        value_serializer="raw",
        key_serializer="raw",
        store="memory://",
        datadir=str(settings.home / "faust" / prefix),
        web_enabled=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        broker_commit_interval=1.0,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        stream_wait_empty=False,
    )
    raw_topic = app.topic(settings.topic_raw, value_serializer="raw", key_serializer="raw")
    clean_topic = app.topic(settings.topic_clean, value_serializer="raw", key_serializer="raw")
    dlq_topic = app.topic(settings.topic_dlq, value_serializer="raw", key_serializer="raw")
    batches_topic = app.topic(settings.topic_batches, value_serializer="raw", key_serializer="raw")

    @app.agent(raw_topic)
    async def normalize_agent(stream: faust.StreamT[Any]) -> None:
        registry = Registry(settings.registry_path)
        recent = RecentIds()
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
            if len(result):
                assert result.patient_id is not None
                await clean_topic.send(key=result.patient_id.encode(), value=result.to_json())

    @app.agent(clean_topic)
    async def seal_agent(stream: faust.StreamT[Any]) -> None:
        sealer = Sealer(settings.lake_dir, LocalKeystore(settings.keys_dir))
        for unsent in sealer.unproduced():
            await _produce_manifest(batches_topic, sealer, unsent)
        pending: list[Any] = []
        rows = 0
        oldest = 0.0
        within: Seconds = min(1.0, settings.batch_max_age_s)
        async for events in cast(faust.Stream[Any], stream).noack_take(1000, within=within):
            for event in events:
                if not pending:
                    oldest = time.monotonic()
                pending.append(event)
            rows += sum(_count_hint(e) for e in events)
            full = rows >= settings.batch_max_rows
            old = pending and time.monotonic() - oldest >= settings.batch_max_age_s
            if not (full or old):
                continue
            items, rejected = _decode_pending(pending)
            for event, reason in rejected:
                msg = event.message
                await dlq_topic.send(
                    key=event.key,
                    value=event.value,
                    headers=dlq_headers(
                        reason, "seal", f"{msg.topic}/{msg.partition}/{msg.offset}", _headers(event)
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
            for event in pending:
                await stream.ack(event)
            pending, rows = [], 0

    return app


async def _produce_manifest(topic: faust.TopicT, sealer: Sealer, manifest: BatchManifest) -> None:
    fut = await topic.send(key=manifest.batch_id.encode(), value=manifest.to_json_bytes())
    await fut  # Kafka acknowledged (acks=all) before the ledger calls it produced
    sealer.mark_produced(manifest)


def _headers(event: Any) -> dict[str, bytes]:
    h = event.headers or {}
    return {k: (v if isinstance(v, bytes) else str(v).encode()) for k, v in dict(h).items()}


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
