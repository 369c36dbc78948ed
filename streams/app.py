"""The Faust topology: normalize (vitals.raw -> vitals.clean | vitals.dlq) and seal
(vitals.clean -> encrypted Parquet + manifest -> vitals.batches).

Messages carry many samples each and travel as raw bytes (``value_serializer='raw'``): Faust's
per-event overhead is paid per message, never per sample. Both agents take records in bulk
and ack them only once what they produced is durable; normalize sends one vitals.clean record
per patient per take (a clean bundle), and the sealer cuts batches out of a buffer by
rows, records or age (streams.seal_buffer), sealing one while the next fills. Sealing itself
runs in a child process (streams.seal_process) on the other core; this process produces the
manifests and acks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar, cast

import faust

from streams import changelog
from streams.clock import ClockEstimator
from streams.dedupe import DedupeWindows
from streams.lake.layout import BATCHES_DIR
from streams.ledger import mark_produced, unproduced
from streams.normalize import Rejection, normalize
from streams.seal_buffer import SealBuffer
from streams.seal_process import SealOutcome, SealProcess, SealProcessDied, exit_like
from streams.sequence import SequenceTracker
from vitalproof import memory
from vitalproof.crashpoints import crashpoint
from vitalproof.raw import H_DLQ_ORIGIN, H_DLQ_REASON, H_DLQ_STAGE, RawRecord
from vitalproof.registry import Registry
from vitalproof.schema import SampleBatch
from vitalproof.settings import Settings
from vitalproof.wire import clean

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Raw records normalized per take (at most), and how long a take waits to fill up.
NORMALIZE_TAKE = 1000
NORMALIZE_WITHIN_S = 0.2
#: Samples per vitals.clean record at most (~40 bytes each: well under Kafka's 1 MB).
CLEAN_BUNDLE_SAMPLES = 16_384
#: vitals.clean records handed to the seal buffer per take, and how often it is fed.
SEAL_TAKE = 256
SEAL_TAKE_WITHIN_S = 0.2
STREAM_BUFFER_RECORDS = 256
#: Bytes fetched per partition (compressed) and records per poll, at most.
FETCH_BYTES = 256 * 1024
POLL_RECORDS = 500
#: Batches in the seal process at once: one being sealed, one waiting to be.
SEAL_DEPTH = 2


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
    datadir = settings.paths.home / "faust" / prefix
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        f"vitalproof-{prefix}",
        broker=f"kafka://{settings.kafka.bootstrap}",
        value_serializer="raw",
        key_serializer="raw",
        store="memory://",
        datadir=str(datadir),
        web_enabled=False,
        topic_partitions=settings.kafka.partitions,
        topic_replication_factor=1,
        broker_commit_interval=1.0,
        # A worker killed with -9 keeps its partitions until the group notices: 10 s, not
        # Faust's 60 s, before a restarted or surviving worker takes over.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        # Every byte sent costs the worker a syscall's copy (and, to a local broker, the
        # receive path too): compressed batches (cramjam, in C) cost less than they save.
        producer_compression_type=settings.kafka.compression_type,
        stream_wait_empty=False,
        # Faust buffers up to this many *records* per stream; a vitals.clean bundle holds
        # thousands of samples, so its default (4096) could hold most of a gigabyte.
        stream_buffer_maxsize=STREAM_BUFFER_RECORDS,
        # Faust hands every fetched record to its stream before any record of the next
        # partition: a big fetch of a raw backlog (1 MB per partition compressed is ~6 MB of
        # device JSON) held vitals.clean back for seconds and left the sealer idle. Smaller
        # fetches and polls interleave the two topics, and hold less memory.
        consumer_max_fetch_size=FETCH_BYTES,
        broker_max_poll_records=POLL_RECORDS,
    )
    raw_topic = app.topic(settings.kafka.topic_raw, value_serializer="raw", key_serializer="raw")
    clean_topic = app.topic(
        settings.kafka.topic_clean, value_serializer="raw", key_serializer="raw"
    )
    dlq_topic = app.topic(settings.kafka.topic_dlq, value_serializer="raw", key_serializer="raw")
    batches_topic = app.topic(
        settings.kafka.topic_batches, value_serializer="raw", key_serializer="raw"
    )
    events_topic = app.topic(
        settings.kafka.topic_events, value_serializer="raw", key_serializer="raw"
    )

    dedupe_topic = app.topic(
        settings.kafka.topic("vitals.dedupe"),
        value_serializer="raw",
        key_serializer="raw",
        compacting=True,
        partitions=settings.kafka.partitions,
    )

    @app.agent(raw_topic)
    async def normalize_agent(stream: faust.StreamT[Any]) -> None:
        registry = Registry(settings.paths.registry_path)
        sequences = SequenceTracker()
        clocks = ClockEstimator()
        await dedupe_topic.declare()
        dedupe = DedupeWindows(
            retain=settings.dedupe.retain_windows, max_ids=settings.dedupe.max_ids
        )
        dedupe.load(
            await changelog.read_all(settings.kafka.bootstrap, dedupe_topic.get_topic_name())
        )
        log.info(
            "dedupe: %d reading ids in windows %s from the changelog", len(dedupe), dedupe.windows
        )
        take = cast(faust.Stream[Any], stream).noack_take
        clean_name, dedupe_name = clean_topic.get_topic_name(), dedupe_topic.get_topic_name()
        # A take never spans more raw records than a batch may: bundles stay within what
        # one batch would have covered message by message.
        per_take = min(NORMALIZE_TAKE, settings.batching.max_messages)
        async for events in take(per_take, within=NORMALIZE_WITHIN_S):
            # Produce everything without waiting, then wait for all of it at once: one
            # round trip per take, not per message. The clean batches go out bundled per
            # patient, straight through the producer (Faust's send costs per call).
            sent: list[Awaitable[Any]] = []
            normalized: list[tuple[RawRecord, SampleBatch, str]] = []
            for event in events:
                raw = RawRecord.from_kafka(event.value or b"", _headers(event))
                result = normalize(raw, registry.lookup)
                if isinstance(result, Rejection):
                    reason = result.reason
                    sent.append(await _send_dlq(event, raw.device_id.encode(), raw.payload, reason))
                else:
                    msg = event.message
                    normalized.append((raw, result, f"{msg.partition}:{msg.offset}"))
            # The take's batches in one call, in consumption order: the dedupe memory is
            # looked up for all their ids at once (per message, numpy's per-call overhead
            # cost more than the lookups).
            dedupe.drop_seen_many([(batch, origin) for _raw, batch, origin in normalized])
            accepted: list[SampleBatch] = []
            for raw, batch, _origin in normalized:
                sent.extend(await _observe(raw, batch, sequences, clocks, accepted))
            for patient_id, bundle in bundle_by_patient(accepted, CLEAN_BUNDLE_SAMPLES):
                value = clean.encode_bundle(bundle)
                sent.append(await _send(clean_name, patient_id.encode(), value))
            await asyncio.gather(*sent)
            # Only now, with the clean records durable, may the changelog say their ids were
            # seen: a changelog entry without its clean record would drop a reading forever.
            # One record per (window, raw partition) of the take, not one per raw record.
            await asyncio.gather(*[await _send(dedupe_name, k, v) for k, v in dedupe.drain()])
            for event in events:
                await stream.ack(event)
            del events, normalized, accepted
            memory.trim()  # a take's objects are garbage now: ~5 ms to return their pages

    async def _send(topic: str, key: bytes, value: bytes | None) -> Awaitable[Any]:
        return await app.producer.send(topic, key, value, None, None, None)

    async def _send_dlq(
        event: Any, key: bytes, value: bytes, reason: str, *, stage: str = "normalize"
    ) -> Awaitable[Any]:
        """The rejected record's original bytes and headers, plus why, where and from where."""
        msg = event.message
        origin = f"{msg.topic}/{msg.partition}/{msg.offset}"
        return await dlq_topic.send(
            key=key, value=value, headers=dlq_headers(reason, stage, origin, _headers(event))
        )

    async def _observe(
        raw: RawRecord,
        result: SampleBatch,
        sequences: SequenceTracker,
        clocks: ClockEstimator,
        accepted: list[SampleBatch],
    ) -> list[Awaitable[Any]]:
        """One normalized, deduplicated raw record: its batch goes to ``accepted``; the
        sequence and clock events it causes are sent (their futures returned)."""
        sent: list[Awaitable[Any]] = []
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
        # Before the batch is bundled: the estimate travels with it (clock_offset_us).
        for clock_event in clocks.observe(result):
            sent.append(
                await events_topic.send(key=raw.device_id.encode(), value=clock_event.to_json())
            )
            log.info("%s (%d clock jumps so far)", clock_event.describe(), clocks.jumps)
        if len(result):
            accepted.append(result)
            crashpoint("after_normalize")
        return sent

    @app.agent(clean_topic)
    async def seal_agent(stream: faust.StreamT[Any]) -> None:
        # The child loads the ledger and recent ids while the outbox is produced here.
        sealer = SealProcess(settings.lake_dir, settings.paths.keys_dir)
        sealer.start()
        try:
            batches_dir = settings.lake_dir / BATCHES_DIR
            for unsent in unproduced(batches_dir):
                await _produce_manifest(batches_topic, unsent.batch_id, unsent.to_json_bytes())
            await _fatal_on_error(sealer.ready())
            await _consume_into_buffer(stream, sealer)
        finally:
            sealer.close()

    async def _consume_into_buffer(stream: faust.StreamT[Any], sealer: SealProcess) -> None:
        buffer: SealBuffer[Any] = SealBuffer(
            max_rows=settings.batching.max_rows,
            max_records=settings.batching.max_messages,
            max_age_s=settings.batching.max_age_s,
            rows_of=_count_hint,
        )
        pipe = _SealPipe()
        cutting = asyncio.create_task(_fatal_on_error(_cut_loop(sealer, buffer, pipe)))
        collecting = asyncio.create_task(_fatal_on_error(_collect_loop(stream, sealer, pipe)))
        take = cast(faust.Stream[Any], stream).noack_take
        try:
            async for events in take(SEAL_TAKE, within=SEAL_TAKE_WITHIN_S):
                buffer.add(events, time.monotonic())
                pipe.arrived.set()
                # Back pressure: while a whole batch waits behind the ones in the seal
                # process, stop consuming (memory stays at a few batches).
                while buffer.rows >= settings.batching.max_rows and not cutting.done():
                    pipe.sealed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(pipe.sealed.wait(), 1.0)
        finally:
            cutting.cancel()
            collecting.cancel()

    async def _cut_loop(sealer: SealProcess, buffer: SealBuffer[Any], pipe: _SealPipe) -> None:
        """Cut each batch as soon as it is due (rows, records or age), oldest first, and hand
        it to the seal process once fewer than :data:`SEAL_DEPTH` are there."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pipe.arrived.wait(), buffer.seconds_left(time.monotonic()))
            pipe.arrived.clear()
            while buffer.ready(time.monotonic()):
                await pipe.slots.acquire()
                chunk = buffer.pop_batch()
                pipe.in_flight.append(chunk)
                pipe.submitted.set()
                await sealer.submit(
                    [
                        (e.message.topic, e.message.partition, e.message.offset, e.value or b"")
                        for e in chunk
                    ]
                )

    async def _collect_loop(
        stream: faust.StreamT[Any], sealer: SealProcess, pipe: _SealPipe
    ) -> None:
        """Each batch's outcome, in the order they were handed over: its rejects to the DLQ,
        its manifest to vitals.batches, then its records acked."""
        while True:
            while not pipe.in_flight:
                pipe.submitted.clear()
                await pipe.submitted.wait()
            chunk = pipe.in_flight[0]
            outcome = await sealer.outcome()
            pipe.in_flight.popleft()
            await _finish_batch(stream, chunk, outcome)
            pipe.slots.release()
            pipe.sealed.set()

    async def _finish_batch(
        stream: faust.StreamT[Any], chunk: list[Any], outcome: SealOutcome
    ) -> None:
        sent = []
        for index, reason in outcome.rejected:
            event = chunk[index]
            sent.append(await _send_dlq(event, event.key, event.value, reason, stage="seal"))
        await asyncio.gather(*sent)
        if outcome.batch_id is not None and outcome.manifest_json is not None:
            await _produce_manifest(batches_topic, outcome.batch_id, outcome.manifest_json)
            log.info(
                "sealed %s: %d rows, %d files; %.2f s in the seal process",
                outcome.batch_id,
                outcome.rows,
                outcome.files,
                outcome.seconds,
            )
        for event in chunk:
            await stream.ack(event)
        crashpoint("after_ack")

    async def _produce_manifest(topic: faust.TopicT, batch_id: str, manifest_json: bytes) -> None:
        fut = await topic.send(key=batch_id.encode(), value=manifest_json)
        await fut  # Kafka acknowledged (acks=all) before the ledger calls it produced
        crashpoint("after_produce")
        mark_produced(settings.lake_dir / BATCHES_DIR, batch_id)

    return app


class _SealPipe:
    """What the seal agent's tasks share: batches handed to the seal process and not yet
    acked (oldest first), the free places among :data:`SEAL_DEPTH`, and their wake-ups."""

    def __init__(self) -> None:
        self.in_flight: deque[list[Any]] = deque()
        self.slots = asyncio.Semaphore(SEAL_DEPTH)
        self.arrived = asyncio.Event()  # records were added to the buffer
        self.submitted = asyncio.Event()  # a batch was handed over
        self.sealed = asyncio.Event()  # a batch was acked


def bundle_by_patient(
    batches: Sequence[SampleBatch], max_samples: int
) -> list[tuple[str, list[SampleBatch]]]:
    """Group batches per patient (arrival order kept within a patient), and split a group
    once it holds ``max_samples`` samples, so no record outgrows Kafka's message size."""
    groups: dict[str, list[list[SampleBatch]]] = {}
    sizes: dict[str, int] = {}
    for b in batches:
        if b.patient_id is None:
            raise ValueError(f"batch from {b.device_id} is not normalized (no patient id)")
        chunks = groups.setdefault(b.patient_id, [[]])
        if chunks[-1] and sizes[b.patient_id] + len(b) > max_samples:
            chunks.append([])
            sizes[b.patient_id] = 0
        chunks[-1].append(b)
        sizes[b.patient_id] = sizes.get(b.patient_id, 0) + len(b)
    return [(p, chunk) for p, chunks in groups.items() for chunk in chunks]


def _headers(event: Any) -> dict[str, bytes]:
    h = event.headers or {}
    return {k: (v if isinstance(v, bytes) else str(v).encode()) for k, v in dict(h).items()}


def _count_hint(event: Any) -> int:
    # The binary record says how many samples it holds; in a JSON one (written before the
    # binary encoding) counting commas is a cheap upper bound. Either spares a full decode
    # here (the sealer decodes once).
    value: bytes = event.value or b""
    if clean.is_clean_binary(value):
        return max(1, clean.sample_count(value))
    return max(1, value.count(b","))


async def _fatal_on_error(work: Awaitable[T]) -> T:
    """Await ``work``; if sealing fails, the whole worker dies now, loudly. A worker that
    went on consuming without sealing would only pile up unacked records; a restarted one
    recovers from the ledger."""
    try:
        return await work
    except SealProcessDied as err:
        log.critical("%s: the worker stops; a restart recovers from the ledger", err)
        exit_like(err.returncode)
    except Exception:
        log.critical("sealing failed: the worker stops; a restart recovers", exc_info=True)
        exit_like(1)
