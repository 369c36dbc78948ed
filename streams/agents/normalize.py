"""The normalize agent: vitals.raw -> vitals.clean (one bundle per patient per take) |
vitals.dlq, with the dedupe memory's changelog and the sequence and clock events beside.

It takes raw records in bulk, sends everything a take produced without waiting, waits for all
of it at once (one round trip per take, not per message), and only then writes the dedupe
changelog and acks ("Nothing is lost": a changelog entry without its clean record would drop a
reading forever).

In a group of workers, a rebalance waits until the take in hand is durable and acked
(:meth:`NormalizeAgent.on_revoked`); a raw partition then assigned to this worker brings its
dedupe memory along from the changelog (:meth:`NormalizeAgent.on_assigned`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from streams.agents.ports import (
    Event,
    NormalizeOutputs,
    Sent,
    TakeStream,
    dlq_headers,
    event_headers,
    event_origin,
)
from streams.clock import ClockEstimator
from streams.dedupe import DedupeWindows, Record
from streams.normalize import Rejection, normalize
from streams.sequence import SequenceTracker
from vitalproof import memory
from vitalproof.crashpoints import crashpoint
from vitalproof.raw import RawRecord
from vitalproof.registry import Device
from vitalproof.schema import SampleBatch
from vitalproof.wire import clean

log = logging.getLogger(__name__)

#: Which patient a device belongs to (the registry's lookup).
Lookup = Callable[[str], Device | None]

#: The dedupe changelog as it is now, read from its start (for the partitions just assigned).
ChangelogReader = Callable[[], Awaitable[list[Record]]]

#: Raw records normalized per take (at most), and how long a take waits to fill up.
NORMALIZE_TAKE = 1000
NORMALIZE_WITHIN_S = 0.05
#: Samples per vitals.clean record at most (~40 bytes each: well under Kafka's 1 MB).
CLEAN_BUNDLE_SAMPLES = 16_384


class NormalizeAgent:
    """Normalizes, deduplicates and bundles raw records; owns the per-device sequence and
    clock state, which lives as long as the agent (one per worker)."""

    def __init__(
        self,
        *,
        lookup: Lookup,
        dedupe: DedupeWindows,
        outputs: NormalizeOutputs,
        max_messages: int,
        sequences: SequenceTracker | None = None,
        clocks: ClockEstimator | None = None,
        changelog: ChangelogReader | None = None,
    ) -> None:
        self.lookup = lookup
        self.dedupe = dedupe
        self.outputs = outputs
        self.sequences = sequences or SequenceTracker()
        self.clocks = clocks or ClockEstimator()
        # A take never spans more raw records than a batch may: bundles stay within what
        # one batch would have covered message by message.
        self.per_take = min(NORMALIZE_TAKE, max_messages)
        self.changelog = changelog
        """``None``: a lone agent owning every partition; else how to read the changelog
        when partitions are assigned (the agent is in a group)."""
        self.assigned: set[tuple[str, int]] = set()
        self._accepting = asyncio.Event()
        if changelog is None:
            self._accepting.set()
        self._idle = asyncio.Event()
        self._idle.set()

    async def run(self, stream: TakeStream) -> None:
        async for taken in stream.noack_take(self.per_take, within=NORMALIZE_WITHIN_S):
            events = await self._mine(taken)
            if not events:
                continue
            self._idle.clear()
            try:
                await self.process(events)
                for event in events:
                    await stream.ack(event)
            finally:
                self._idle.set()
            del events, taken
            memory.trim()  # a take's objects are garbage now: ~5 ms to return their pages

    async def _mine(self, events: list[Event]) -> list[Event]:
        """The events of a take to normalize, once no rebalance is under way: those of this
        worker's partitions (a take may hold records fetched before the rebalance, which
        the partition's owner consumes again from the committed offset)."""
        if self.changelog is None:
            return events
        await self._accepting.wait()
        return [e for e in events if (e.message.topic, e.message.partition) in self.assigned]

    # -- rebalances ---------------------------------------------------------------------

    async def on_revoked(self) -> None:
        """Before the group reassigns partitions: no new take starts, and the one in hand
        finishes (its clean records and changelog durable), so the next owner of each of its
        partitions finds that changelog when it reads the topic."""
        self._accepting.clear()
        await self._idle.wait()

    async def on_assigned(self, assigned: set[tuple[str, int]]) -> None:
        """This worker's raw partitions now: the changelog records of the new ones join the
        dedupe memory (those of partitions gone stop being tracked); then takes resume."""
        newly = {p for _t, p in assigned - self.assigned}
        gone = {p for _t, p in self.assigned - assigned}
        self.assigned = set(assigned)
        if gone:
            self.dedupe.forget(gone)
        if newly and self.changelog is not None:
            added = self.dedupe.adopt(await self.changelog(), newly)
            log.info("dedupe: partitions %s adopted, %d changelog keys added", sorted(newly), added)
        self._accepting.set()

    async def process(self, events: Sequence[Event]) -> None:
        """One take, durable on return: clean bundles, DLQ records and events acknowledged by
        Kafka, then the dedupe changelog for them."""
        sent: list[Sent] = []
        normalized: list[tuple[RawRecord, SampleBatch, str]] = []
        for event in events:
            raw = RawRecord.from_kafka(event.value or b"", event_headers(event))
            result = normalize(raw, self.lookup)
            if isinstance(result, Rejection):
                headers = dlq_headers(
                    result.reason, "normalize", event_origin(event), event_headers(event)
                )
                sent.append(await self.outputs.dlq(raw.device_id.encode(), raw.payload, headers))
            else:
                msg = event.message
                normalized.append((raw, result, f"{msg.partition}:{msg.offset}"))
        # The take's batches in one call, in consumption order: the dedupe memory is looked
        # up for all their ids at once (per message, numpy's per-call overhead cost more than
        # the lookups).
        self.dedupe.drop_seen_many([(batch, origin) for _raw, batch, origin in normalized])
        accepted: list[SampleBatch] = []
        for raw, batch, _origin in normalized:
            sent.extend(await self._observe(raw, batch, accepted))
        for patient_id, bundle in bundle_by_patient(accepted, CLEAN_BUNDLE_SAMPLES):
            sent.append(await self.outputs.clean(patient_id.encode(), clean.encode_bundle(bundle)))
        await asyncio.gather(*sent)
        # Only now, with the clean records durable, may the changelog say their ids were
        # seen. One record per (window, raw partition) of the take, not one per raw record.
        await asyncio.gather(*[await self.outputs.dedupe(k, v) for k, v in self.dedupe.drain()])

    async def _observe(
        self, raw: RawRecord, result: SampleBatch, accepted: list[SampleBatch]
    ) -> list[Sent]:
        """One normalized, deduplicated raw record: its batch goes to ``accepted``; the
        sequence and clock events it causes are sent (their futures returned)."""
        sent: list[Sent] = []
        key = raw.device_id.encode()
        sequences, clocks = self.sequences, self.clocks
        for seq_event in sequences.observe(result):
            sent.append(await self.outputs.event(key, seq_event.to_json()))
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
            sent.append(await self.outputs.event(key, clock_event.to_json()))
            log.info("%s (%d clock jumps so far)", clock_event.describe(), clocks.jumps)
        if len(result):
            accepted.append(result)
            crashpoint("after_normalize")
        return sent


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
