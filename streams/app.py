"""The Faust topology: normalize (vitals.raw -> vitals.clean | vitals.dlq) and seal
(vitals.clean -> encrypted Parquet + manifest -> vitals.batches).

Messages carry many samples each and travel as raw bytes (``value_serializer='raw'``): Faust's
per-event overhead is paid per message, never per sample.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from typing import Any, cast

import faust

from streams import changelog
from streams.batcher import Pending, Sealer
from streams.dedupe import DedupeWindows
from streams.keystore import LocalKeystore
from streams.normalize import Rejection, normalize
from streams.sequence import SequenceTracker
from vitalproof import clean_codec
from vitalproof.crashpoints import crashpoint
from vitalproof.errors import WireFormatError
from vitalproof.manifest import BatchManifest
from vitalproof.raw import H_DLQ_ORIGIN, H_DLQ_REASON, H_DLQ_STAGE, RawRecord
from vitalproof.registry import Registry
from vitalproof.schema import SampleBatch
from vitalproof.settings import Settings

log = logging.getLogger(__name__)

#: Raw records normalized per take (at most), and how long a take waits to fill up.
NORMALIZE_TAKE = 1000
NORMALIZE_WITHIN_S = 0.2


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

    dedupe_topic = app.topic(
        settings.topic("vitals.dedupe"),
        value_serializer="raw",
        key_serializer="raw",
        compacting=True,
        partitions=settings.partitions,
    )

    @app.agent(raw_topic)
    async def normalize_agent(stream: faust.StreamT[Any]) -> None:
        registry = Registry(settings.registry_path)
        sequences = SequenceTracker()
        await dedupe_topic.declare()
        dedupe = DedupeWindows()
        dedupe.load(
            await changelog.read_all(settings.kafka_bootstrap, dedupe_topic.get_topic_name())
        )
        log.info(
            "dedupe: %d reading ids in windows %s from the changelog", len(dedupe), dedupe.windows
        )
        take = cast(faust.Stream[Any], stream).noack_take
        async for events in take(NORMALIZE_TAKE, within=NORMALIZE_WITHIN_S):
            # Produce everything without waiting, then wait for all of it at once: one
            # round trip per take, not per message.
            sent: list[Awaitable[Any]] = []
            for event in events:
                sent.extend(await _normalize_one(event, registry, dedupe, sequences))
            await asyncio.gather(*sent)
            # Only now, with the clean records durable, may the changelog say their ids were
            # seen: a changelog entry without its clean record would drop a reading forever.
            await asyncio.gather(
                *[await dedupe_topic.send(key=k, value=v) for k, v in dedupe.drain()]
            )
            for event in events:
                await stream.ack(event)

    async def _normalize_one(
        event: Any, registry: Registry, dedupe: DedupeWindows, sequences: SequenceTracker
    ) -> list[Awaitable[Any]]:
        msg = event.message
        raw = RawRecord.from_kafka(event.value or b"", _headers(event))
        result = normalize(raw, registry.lookup)
        if isinstance(result, Rejection):
            return [
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
            ]
        sent: list[Awaitable[Any]] = []
        dedupe.drop_seen(result, f"{msg.partition}:{msg.offset}")
        for seq_event in sequences.observe(result):
            sent.append(
                await events_topic.send(key=raw.device_id.encode(), value=seq_event.to_json())
            )
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
        if len(result):
            assert result.patient_id is not None
            sent.append(
                await clean_topic.send(
                    key=result.patient_id.encode(), value=clean_codec.encode(result)
                )
            )
            crashpoint("after_normalize")
        return sent

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
    # The binary record says how many samples it holds; in a JSON one (written before the
    # binary encoding) counting commas is a cheap upper bound. Either spares a full decode
    # here (the sealer decodes once).
    value: bytes = event.value or b""
    if clean_codec.is_clean_binary(value):
        return max(1, clean_codec.sample_count(value))
    return max(1, value.count(b","))


def decode_clean(value: bytes) -> SampleBatch:
    """A record of vitals.clean: binary, or JSON from a worker that predates it."""
    if clean_codec.is_clean_binary(value):
        return clean_codec.decode(value)
    return SampleBatch.from_json(value)


def _decode_pending(events: list[Any]) -> tuple[list[Pending], list[tuple[Any, str]]]:
    items: list[Pending] = []
    rejected: list[tuple[Any, str]] = []
    for e in events:
        m = e.message
        try:
            batch = decode_clean(e.value or b"")
        except WireFormatError as err:
            rejected.append((e, str(err)))
            continue
        items.append(Pending(m.topic, m.partition, m.offset, batch))
    return items, rejected
