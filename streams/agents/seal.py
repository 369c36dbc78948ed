"""The seal agent: vitals.clean -> a buffer cut into batches by rows, records or age
(:mod:`streams.seal_buffer`) -> the seal process (encrypted Parquet + manifest, on the other
core) -> the manifest to vitals.batches -> the batch's records acked.

Three tasks share a :class:`_SealPipe`: the consumer fills the buffer (and stops while a whole
batch waits: back pressure), the cutter hands due batches to the seal process (at most
:data:`SEAL_DEPTH` at once), the collector takes their outcomes in order, produces and acks.
A manifest is marked produced in the ledger only after Kafka acknowledged it, so a restart
sends again exactly what was not ("Nothing is lost", "Effectively once").

In a group of workers (:meth:`SealAgent.on_revoked`, :meth:`SealAgent.on_assigned`): each
batch covers one ``vitals.clean`` partition, so it has one owner. On a rebalance the agent
stops handing batches over, drops what it buffered (not acked: the next owner consumes it
again) and waits until every batch handed over is produced and acked, before the rebalance
goes on; on an assignment the seal process adopts the new partitions' memory from the lake
and the agent produces their unproduced manifests (a previous owner killed between its
manifest and the produce), unless ``vitals.batches`` already holds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from streams.agents.ports import (
    Event,
    SealOutputs,
    TakeStream,
    dlq_headers,
    event_headers,
    event_origin,
)
from streams.fence import Fenced
from streams.ledger import Folder, mark_produced, unproduced
from streams.partition_index import unproduced_of
from streams.seal_buffer import SealBuffer
from streams.seal_process import CleanRecord, SealOutcome, SealProcessDied, exit_like
from vitalproof.crashpoints import crashpoint
from vitalproof.manifest import BatchManifest
from vitalproof.retry import Backoff, Outage, disk_full
from vitalproof.settings import BatchSettings
from vitalproof.wire import clean

log = logging.getLogger(__name__)
T = TypeVar("T")

#: vitals.clean records handed to the seal buffer per take, and how often it is fed.
SEAL_TAKE = 256
SEAL_TAKE_WITHIN_S = 0.2
#: Batches in the seal process at once: one being sealed, one waiting to be.
SEAL_DEPTH = 2


class Sealer(Protocol):
    """What the agent needs of :class:`streams.seal_process.SealProcess`."""

    def start(self) -> None: ...

    async def ready(self) -> None: ...

    async def submit(self, records: list[CleanRecord]) -> None: ...

    async def outcome(self) -> SealOutcome: ...

    async def adopt(
        self, partitions: Sequence[tuple[str, int]], claims: dict[tuple[str, int], str] | None
    ) -> None: ...

    def close(self) -> None: ...


class Publishers(Protocol):
    """What the agent needs of :class:`streams.fence.PartitionPublishers`: per partition, a
    publisher of manifests that a later owner of the partition fences."""

    async def take(self, tps: Iterable[tuple[str, int]]) -> dict[tuple[str, int], str]: ...

    async def publish(self, tp: tuple[str, int], batch_id: str, manifest_json: bytes) -> None: ...

    def kept(self, tps: Iterable[tuple[str, int]]) -> set[tuple[str, int]]: ...

    async def drop(self, tps: Iterable[tuple[str, int]]) -> None: ...

    async def close(self) -> None: ...


#: The ids among the given batch ids that ``vitals.batches`` holds from the given time (ms)
#: on: only asked after a previous owner died with manifests unproduced.
PublishedCheck = Callable[[set[str], int], Awaitable[set[str]]]


class SealAgent:
    """Seals what it consumes, through one seal process it starts and closes with itself."""

    def __init__(
        self,
        *,
        sealer: Sealer,
        batches_dir: Path | Folder,
        outputs: SealOutputs,
        batching: BatchSettings,
        published: PublishedCheck | None = None,
        publishers: Publishers | None = None,
        backoff: Callable[[], Backoff] = Backoff,
    ) -> None:
        self.sealer = sealer
        self.backoff = backoff
        """A fresh backoff for each wait (a full lake disk)."""
        self.batches_dir = batches_dir
        self.outputs = outputs
        self.batching = batching
        self.published = published
        """``None``: a lone agent that owns every partition (no rebalance signals); else the
        check of ``vitals.batches`` for manifests a previous owner may have produced."""
        self.publishers = publishers
        """In a group: the fenced publishers of manifests (``streams.fence``); ``None``:
        through :attr:`outputs`, unfenced."""
        self.assigned: set[tuple[str, int]] = set()
        self._accepting = asyncio.Event()
        if published is None:
            self._accepting.set()
        self._ready = asyncio.Event()
        self._buffer: SealBuffer[Event] | None = None
        self._pipe = _SealPipe()

    async def run(self, stream: TakeStream) -> None:
        # The child loads the ledger while the outbox is produced here (a lone agent; in a
        # group each partition's outbox is produced when it is assigned).
        self.sealer.start()
        try:
            if self.published is None:
                for unsent in unproduced(self.batches_dir):
                    await self._produce_manifest(unsent.batch_id, unsent.to_json_bytes())
            await fatal_on_error(self.sealer.ready())
            self._ready.set()
            await self._consume_into_buffer(stream)
        finally:
            self.sealer.close()
            if self.publishers is not None:
                await self.publishers.close()

    # -- rebalances ---------------------------------------------------------------------

    async def on_revoked(self) -> None:
        """Before the group reassigns partitions: nothing more is handed to the seal process,
        and every batch handed over is produced and acked, so the next owner finds its
        manifest in the lake. The buffer waits: what it holds of partitions this worker
        keeps is sealed after the rebalance, the rest dropped then (:meth:`on_assigned`).

        Why not drop it all now (its records are not acked, and Faust seeks every partition
        to its committed offset after a rebalance): a record fetched before the seek and
        delivered after it makes Faust count the offsets between as a gap, done, so records
        dropped here were not always delivered again; in quick successive rebalances a
        kept partition lost them (found by the fencing drill)."""
        self._accepting.clear()
        pipe = self._pipe
        while pipe.in_flight:
            pipe.sealed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pipe.sealed.wait(), 1.0)

    async def on_assigned(self, assigned: set[tuple[str, int]]) -> None:
        """This worker's ``vitals.clean`` partitions now: the seal process adopts the new
        ones' memory from the lake, their unproduced manifests are produced, then records
        are taken again."""
        newly = sorted(assigned - self.assigned)
        gone = self.assigned - assigned
        claims = None
        if self.publishers is not None:
            # Kept across the rebalance, unless another worker had them meanwhile (this one
            # was frozen past its session timeout): those are adopted afresh.
            kept = assigned & self.assigned
            taken = kept - self.publishers.kept(kept)
            if taken:
                log.warning("taken over while this worker was frozen: %s", sorted(taken))
            newly = sorted(set(newly) | taken)
        self.assigned = set(assigned)
        await self._ready.wait()
        if self.publishers is not None:
            await self.publishers.drop(gone)
            # Fence the previous owners (Kafka, then the lake) before reading what they left.
            claims = await fatal_on_error(self.publishers.take(newly)) if newly else None
        if newly:
            await fatal_on_error(self.sealer.adopt(newly, claims))
            await self._produce_outbox(set(newly))
        if self._buffer is not None:  # what is buffered of partitions gone: their new owner's
            self._buffer.discard(lambda e: _tp(e) not in self.assigned)
        self._accepting.set()

    async def _produce_outbox(self, partitions: set[tuple[str, int]]) -> None:
        """Manifests of ``partitions`` sealed but never marked produced: their sealer died
        between the manifest and the produce, or between Kafka's ack and the mark; in the
        second case ``vitals.batches`` holds them already and they are only marked."""
        indexed = unproduced_of(self.batches_dir, partitions)  # their newest manifests only
        every = unproduced(self.batches_dir) if indexed is None else indexed
        mine = [m for m in every if _owner(m) in partitions]
        if not mine:
            return
        assert self.published is not None
        since_ms = min(m.sealed_at_us for m in mine) // 1000 - PUBLISHED_MARGIN_MS
        there = await self.published({m.batch_id for m in mine}, since_ms)
        for m in mine:
            if m.batch_id in there:
                mark_produced(self.batches_dir, m.batch_id)
            else:
                await self._produce_manifest(m.batch_id, m.to_json_bytes(), _owner(m))
        log.info(
            "outbox of %s: %d manifests, %d already on Kafka", partitions, len(mine), len(there)
        )

    async def _takes(self, events: list[Event]) -> list[Event]:
        """The events of a take this worker may seal, once no rebalance is under way: those
        of its partitions (a take can hold records fetched before the rebalance)."""
        if self.published is None:
            return events
        await self._accepting.wait()
        assigned = self.assigned
        return [e for e in events if (e.message.topic, e.message.partition) in assigned]

    async def _consume_into_buffer(self, stream: TakeStream) -> None:
        batching = self.batching
        buffer: SealBuffer[Event] = SealBuffer(
            max_rows=batching.max_rows,
            max_records=batching.max_messages,
            max_age_s=batching.max_age_s,
            rows_of=_count_hint,
        )
        self._buffer = buffer
        pipe = self._pipe
        cutting = asyncio.create_task(fatal_on_error(self._cut_loop(buffer, pipe)))
        collecting = asyncio.create_task(fatal_on_error(self._collect_loop(stream, pipe)))
        try:
            async for taken in stream.noack_take(SEAL_TAKE, within=SEAL_TAKE_WITHIN_S):
                events = await self._takes(taken)
                if not events:
                    continue
                buffer.add(events, time.monotonic())
                pipe.arrived.set()
                # Back pressure: while a whole batch waits behind the ones in the seal
                # process, stop consuming (memory stays at a few batches).
                while buffer.rows >= batching.max_rows and not cutting.done():
                    pipe.sealed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(pipe.sealed.wait(), 1.0)
        finally:
            cutting.cancel()
            collecting.cancel()

    async def _cut_loop(self, buffer: SealBuffer[Event], pipe: _SealPipe) -> None:
        """Cut each batch as soon as it is due (rows, records or age), oldest first, and hand
        it to the seal process once fewer than :data:`SEAL_DEPTH` are there."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pipe.arrived.wait(), buffer.seconds_left(time.monotonic()))
            pipe.arrived.clear()
            while buffer.ready(time.monotonic()):
                # One batch per partition: each batch then has one owner, whose memory of
                # what was sealed moves with the partition (see streams.sealer).
                await self._accepting.wait()  # not while a rebalance is under way
                for chunk in _by_partition(buffer.pop_batch()):
                    await pipe.slots.acquire()
                    await self._accepting.wait()
                    if not self._owns(chunk[0]):
                        pipe.slots.release()  # revoked meanwhile: the next owner seals it
                        continue
                    pipe.in_flight.append(chunk)
                    pipe.submitted.set()
                    await self.sealer.submit(
                        [
                            (e.message.topic, e.message.partition, e.message.offset, e.value or b"")
                            for e in chunk
                        ]
                    )

    async def _collect_loop(self, stream: TakeStream, pipe: _SealPipe) -> None:
        """Each batch's outcome, in the order they were handed over: its rejects to the DLQ,
        its manifest to vitals.batches, then its records acked."""
        while True:
            while not pipe.in_flight:
                pipe.submitted.clear()
                await pipe.submitted.wait()
            chunk = pipe.in_flight[0]
            outcome = await self.sealer.outcome()
            await self._finish_batch(stream, chunk, outcome)
            # Only now: a rebalance waits until nothing is in flight, i.e. until the last
            # batch's manifest is on Kafka and marked produced (its next owner must not
            # find it unproduced and produce it a second time).
            pipe.in_flight.popleft()
            pipe.slots.release()
            pipe.sealed.set()

    def _owns(self, event: Event) -> bool:
        return self.published is None or _tp(event) in self.assigned

    def _lost(self, tp: tuple[str, int], why: object) -> None:
        """Another worker took ``tp`` over while this one did not know (it was frozen past
        the session timeout): drop what is buffered of it, seal and publish nothing more of
        it, and adopt it afresh should the group give it back."""
        self.assigned.discard(tp)
        if self._buffer is not None:
            self._buffer.discard(lambda e: _tp(e) == tp)
        log.warning("fenced: %s[%d] belongs to another worker now (%s)", tp[0], tp[1], why)

    async def _finish_batch(
        self, stream: TakeStream, chunk: list[Event], outcome: SealOutcome
    ) -> None:
        if outcome.fenced:  # the seal process found the partition claimed by another worker
            self._lost(_tp(chunk[0]), "its lake claim changed; nothing was sealed")
            return  # not acked: the new owner consumes these records
        sent = []
        for index, reason in outcome.rejected:
            event = chunk[index]
            headers = dlq_headers(reason, "seal", event_origin(event), event_headers(event))
            sent.append(await self.outputs.dlq(event.key, event.value, headers))
        await asyncio.gather(*sent)
        if outcome.batch_id is not None and outcome.manifest_json is not None:
            try:
                await self._produce_manifest(outcome.batch_id, outcome.manifest_json, _tp(chunk[0]))
            except Fenced as err:
                self._lost(_tp(chunk[0]), err)
                return
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

    async def _produce_manifest(
        self, batch_id: str, manifest_json: bytes, tp: tuple[str, int] | None = None
    ) -> None:
        """To vitals.batches, acknowledged; in a group through the fenced publisher of
        ``tp`` (:class:`~streams.fence.Fenced` if another worker owns it now)."""
        if self.publishers is not None and tp is not None:
            await self.publishers.publish(tp, batch_id, manifest_json)
        else:
            await (await self.outputs.manifest(batch_id, manifest_json))
        # Kafka acknowledged it (acks=all) before the ledger calls it produced.
        crashpoint("after_produce")
        await self._mark_produced(batch_id)

    async def _mark_produced(self, batch_id: str) -> None:
        """The ledger's mark, waited for while the lake's disk is full (one line when it
        fills, one when it is written): until then this batch is not acked, nor anything
        after it, and a restart would find the manifest unproduced and check Kafka for it."""
        outage = Outage(
            "lake disk", str(self.batches_dir), disk_full, backoff=self.backoff(), logger=log
        )
        while True:
            try:
                mark_produced(self.batches_dir, batch_id)
            except OSError as exc:
                await asyncio.sleep(outage.failed(exc))  # raises what is not a full disk
                continue
            outage.succeeded()
            return


class _SealPipe:
    """What the seal agent's tasks share: batches handed to the seal process and not yet
    acked (oldest first), the free places among :data:`SEAL_DEPTH`, and their wake-ups."""

    def __init__(self) -> None:
        self.in_flight: deque[list[Event]] = deque()
        self.slots = asyncio.Semaphore(SEAL_DEPTH)
        self.arrived = asyncio.Event()  # records were added to the buffer
        self.submitted = asyncio.Event()  # a batch was handed over
        self.sealed = asyncio.Event()  # a batch was acked


#: How long before a manifest's seal time ``vitals.batches`` is searched for it (the clocks of
#: the sealing host and of the producer that stamped the record may differ that much).
PUBLISHED_MARGIN_MS = 60_000


def _owner(manifest: BatchManifest) -> tuple[str, int]:
    """The partition whose owner produces a manifest: its first (and normally only) one."""
    first = manifest.covers[0]
    return (first.topic, first.partition)


def _tp(event: Event) -> tuple[str, int]:
    return (event.message.topic, event.message.partition)


def _by_partition(events: list[Event]) -> list[list[Event]]:
    """``events`` split per (topic, partition), in order within each."""
    parts: dict[tuple[str, int], list[Event]] = {}
    for e in events:
        parts.setdefault((e.message.topic, e.message.partition), []).append(e)
    return list(parts.values())


def _count_hint(event: Event) -> int:
    # The binary record says how many samples it holds; in a JSON one (written before the
    # binary encoding) counting commas is a cheap upper bound. Either spares a full decode
    # here (the sealer decodes once).
    value: bytes = event.value or b""
    if clean.is_clean_binary(value):
        return max(1, clean.sample_count(value))
    return max(1, value.count(b","))


async def fatal_on_error(work: Awaitable[T]) -> T:
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
