"""The seal agent: vitals.clean -> a buffer cut into batches by rows, records or age
(:mod:`streams.seal_buffer`) -> the seal process (encrypted Parquet + manifest, on the other
core) -> the manifest to vitals.batches -> the batch's records acked.

Three tasks share a :class:`_SealPipe`: the consumer fills the buffer (and stops while a whole
batch waits: back pressure), the cutter hands due batches to the seal process (at most
:data:`SEAL_DEPTH` at once), the collector takes their outcomes in order, produces and acks.
A manifest is marked produced in the ledger only after Kafka acknowledged it, so a restart
sends again exactly what was not ("Nothing is lost", "Effectively once").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable
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
from streams.ledger import Folder, mark_produced, unproduced
from streams.seal_buffer import SealBuffer
from streams.seal_process import CleanRecord, SealOutcome, SealProcessDied, exit_like
from vitalproof.crashpoints import crashpoint
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

    def close(self) -> None: ...


class SealAgent:
    """Seals what it consumes, through one seal process it starts and closes with itself."""

    def __init__(
        self,
        *,
        sealer: Sealer,
        batches_dir: Path | Folder,
        outputs: SealOutputs,
        batching: BatchSettings,
    ) -> None:
        self.sealer = sealer
        self.batches_dir = batches_dir
        self.outputs = outputs
        self.batching = batching

    async def run(self, stream: TakeStream) -> None:
        # The child loads the ledger and recent ids while the outbox is produced here.
        self.sealer.start()
        try:
            for unsent in unproduced(self.batches_dir):
                await self._produce_manifest(unsent.batch_id, unsent.to_json_bytes())
            await fatal_on_error(self.sealer.ready())
            await self._consume_into_buffer(stream)
        finally:
            self.sealer.close()

    async def _consume_into_buffer(self, stream: TakeStream) -> None:
        batching = self.batching
        buffer: SealBuffer[Event] = SealBuffer(
            max_rows=batching.max_rows,
            max_records=batching.max_messages,
            max_age_s=batching.max_age_s,
            rows_of=_count_hint,
        )
        pipe = _SealPipe()
        cutting = asyncio.create_task(fatal_on_error(self._cut_loop(buffer, pipe)))
        collecting = asyncio.create_task(fatal_on_error(self._collect_loop(stream, pipe)))
        try:
            async for events in stream.noack_take(SEAL_TAKE, within=SEAL_TAKE_WITHIN_S):
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
                await pipe.slots.acquire()
                chunk = buffer.pop_batch()
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
            pipe.in_flight.popleft()
            await self._finish_batch(stream, chunk, outcome)
            pipe.slots.release()
            pipe.sealed.set()

    async def _finish_batch(
        self, stream: TakeStream, chunk: list[Event], outcome: SealOutcome
    ) -> None:
        sent = []
        for index, reason in outcome.rejected:
            event = chunk[index]
            headers = dlq_headers(reason, "seal", event_origin(event), event_headers(event))
            sent.append(await self.outputs.dlq(event.key, event.value, headers))
        await asyncio.gather(*sent)
        if outcome.batch_id is not None and outcome.manifest_json is not None:
            await self._produce_manifest(outcome.batch_id, outcome.manifest_json)
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

    async def _produce_manifest(self, batch_id: str, manifest_json: bytes) -> None:
        await (await self.outputs.manifest(batch_id, manifest_json))
        # Kafka acknowledged it (acks=all) before the ledger calls it produced.
        crashpoint("after_produce")
        mark_produced(self.batches_dir, batch_id)


class _SealPipe:
    """What the seal agent's tasks share: batches handed to the seal process and not yet
    acked (oldest first), the free places among :data:`SEAL_DEPTH`, and their wake-ups."""

    def __init__(self) -> None:
        self.in_flight: deque[list[Event]] = deque()
        self.slots = asyncio.Semaphore(SEAL_DEPTH)
        self.arrived = asyncio.Event()  # records were added to the buffer
        self.submitted = asyncio.Event()  # a batch was handed over
        self.sealed = asyncio.Event()  # a batch was acked


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
