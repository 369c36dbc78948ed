"""Sealing: a group of clean Kafka records becomes one batch, durably and exactly once.

A batch is named by the Kafka offsets it covers, so its id is deterministic. Sealing writes,
in this order: the patients' encrypted Parquet files, then the manifest, each published
atomically (locally temp file + fsync + rename; on S3 one PUT, which makes an object visible
whole or not at all). The batch's tree has two levels (tree version 2, docs/wire-formats.md):
each patient's salted leaves, in the canonical order (:func:`canonical_order`), make one
RFC 9162 subtree, and the batch root is the RFC 9162 root over those subtrees' roots,
patients sorted by pseudonym (``Kms.pseudonym``: manifests name patients by it, never by id).
The manifest keeps each patient's root and leaf count, and nothing per
reading: a proof recomputes its patient's leaves from their rows (which carry ``batch_id``
and ``leaf_index``). The manifest is the commit point: once it exists the
batch is sealed, and the worker skips every offset it covers if Kafka redelivers them (the
*ledger*, rebuilt from manifests at start). Only after the manifest has been produced to
``vitals.batches`` and Kafka acknowledged it does the worker ack the offsets; a manifest
sealed but never produced (crash in between) is produced again at start (an outbox).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streams import lake
from streams.digest_run import DigestRun, split
from streams.lake.keystore import Kms
from streams.lake.layout import BATCHES_DIR
from streams.lake.storage import LakeRoot, as_root
from streams.lake.table import CleanPosition
from streams.ledger import mark_produced, read_manifests, unproduced
from streams.partition_index import (
    IndexEntry,
    PartitionIndex,
    index_of,
    read_index,
    write_index,
)
from vitalproof import hashing
from vitalproof.crashpoints import crashpoint
from vitalproof.manifest import BatchFile, BatchManifest, OffsetRange, batch_id_for
from vitalproof.schema import SampleBatch, pack_reading_ids


@dataclass(frozen=True, slots=True)
class Pending:
    """One consumed record of ``vitals.clean`` waiting to be sealed."""

    topic: str
    partition: int
    offset: int
    batch: SampleBatch


class Sealer:
    """Seals batches into the lake, and remembers, per ``vitals.clean`` partition, what is
    sealed already: the highest offset covered (the ledger) and the reading ids of the newest
    batches (:class:`RecentlySealed`).

    Why per partition: in a group of workers a partition moves from one worker to another
    on a rebalance, and the worker that takes it over must know what the previous owner
    sealed from it, up to its last manifest. The manifests in the lake (shared storage, S3
    at scale) are that memory; :meth:`adopt` rebuilds it for the partitions a worker was
    just given, after the previous owner finished its batches (the rebalance waits for it).
    """

    def __init__(
        self,
        lake_root: Path | LakeRoot,
        kms: Kms,
        *,
        recent_ids: int = 300_000,
        adopt_all: bool = True,
    ) -> None:
        self.lake_root = as_root(lake_root)
        self.kms = kms
        self.batches_dir = self.lake_root.child(BATCHES_DIR)
        self.batches_dir.mkdir()
        self.recent_ids = recent_ids
        self._high_water: dict[tuple[str, int], int] = {}
        self._recent: dict[tuple[str, int], RecentlySealed] = {}
        self.replayed = 0
        """Readings dropped because a recent batch had sealed them already."""
        self.manifests_read = 0
        """Manifests read to adopt partitions so far (bounded by the partitions' indexes)."""
        self._index: dict[tuple[str, int], PartitionIndex] = {}
        self.fence: Callable[[Sequence[OffsetRange]], None] | None = None
        """Called right before a manifest is written; raises if this worker lost one of the
        partitions it covers meanwhile (``streams.fence``): nothing is committed then."""
        # The worker's seal process adopts the partitions it is assigned instead, when it
        # learns them; a sealer on its own remembers every partition the lake holds.
        self.adopt(None if adopt_all else ())

    def adopt(self, partitions: Iterable[tuple[str, int]] | None) -> None:
        """Rebuild the memory of ``partitions`` (every partition if ``None``) from the
        manifests the lake holds now: a partition just assigned to this worker may have been
        sealed from by another one since this worker last held it. Named partitions are
        adopted from their indexes (:mod:`streams.partition_index`): only their newest
        manifests are read."""
        if partitions is not None:
            self._adopt_indexed(set(partitions))
            return
        manifests = self.manifests()
        self.manifests_read += len(manifests)
        for manifest in manifests:
            self._advance(manifest.covers)
        wanted = {(c.topic, c.partition) for m in manifests for c in m.covers}
        for key in wanted:
            self._recent[key] = RecentlySealed(self.recent_ids)
            self._index[key] = index_of(key, manifests, self.recent_ids)
        self._load_recent(manifests, wanted)

    def _adopt_indexed(self, wanted: set[tuple[str, int]]) -> None:
        """Adopt ``wanted`` from their indexes; a partition without one (sealed before
        indexes existed) from every manifest, once, and its index is written then."""
        indexes = {tp: read_index(self.batches_dir, tp) for tp in sorted(wanted)}
        if any(index is None for index in indexes.values()):
            every = self.manifests()
            self.manifests_read += len(every)
            for tp, index in indexes.items():
                if index is None:
                    index = indexes[tp] = index_of(tp, every, self.recent_ids)
                    write_index(self.batches_dir, index)
        by_id: dict[str, BatchManifest] = {}
        for tp, index in indexes.items():
            assert index is not None
            for entry in index.batches:
                if entry.batch_id in by_id:
                    continue
                data = self.batches_dir.read(f"{entry.batch_id}.json")
                self.manifests_read += 1
                if data is not None:  # not: the newest, if a crash came before its manifest
                    by_id[entry.batch_id] = BatchManifest.model_validate_json(data)
            self._index[tp] = index.model_copy(
                update={"batches": index.committed(lambda b: b in by_id)}
            )
        for manifest in by_id.values():
            self._advance(manifest.covers)
        for key in wanted:
            self._recent[key] = RecentlySealed(self.recent_ids)
        self._load_recent(list(by_id.values()), wanted)

    def _indexed(self, covers: Sequence[OffsetRange], batch_id: str, rows: int) -> None:
        """Each covered partition's index with this batch as its newest entry, written
        before the batch's manifest (see :mod:`streams.partition_index`)."""
        for c in covers:
            tp = (c.topic, c.partition)
            index = self._index.get(tp) or read_index(self.batches_dir, tp)
            if index is None:
                index = index_of(tp, self.manifests(), self.recent_ids)
            entry = IndexEntry(batch_id=batch_id, last=c.last, rows=rows)
            self._index[tp] = index = index.then(entry, self.recent_ids)
            write_index(self.batches_dir, index)

    def recent(self, partition: tuple[str, int]) -> RecentlySealed:
        """The memory of recently sealed ids of one ``(topic, partition)``."""
        memory = self._recent.get(partition)
        if memory is None:
            memory = self._recent[partition] = RecentlySealed(self.recent_ids)
        return memory

    def _load_recent(
        self, manifests: Sequence[BatchManifest], partitions: set[tuple[str, int]]
    ) -> None:
        """Remember the reading ids of the newest batches, so a replay cannot seal them twice.

        A worker killed after producing to ``vitals.clean`` but before committing its
        ``vitals.raw`` offsets normalizes those records again after the restart; normalize's
        own memory of recent ids died with it, so the copies reach the sealer in a *later*
        batch, in the same partition (``vitals.clean`` is keyed by patient). Files of erased
        patients cannot be read and are skipped (nothing of theirs can be resealed under
        their old keys anyway). A file merged by compaction is read from the compacted file
        that holds its batch's rows now.
        """
        merged: dict[str, Any] = {}
        for manifest in sorted(manifests, key=lambda m: m.sealed_at_us, reverse=True):
            keys = {(c.topic, c.partition) for c in manifest.covers} & partitions
            memories = [self._recent[k] for k in keys if not self._recent[k].full]
            if not memories:
                if all(self._recent[k].full for k in partitions):
                    break
                continue
            ids: list[str] = []
            for f in manifest.files:
                try:
                    ids.extend(lake.read_reading_ids(self.lake_root, f.path, self.kms))
                except lake.LakeFileVanished:
                    with contextlib.suppress(lake.LakeError):
                        ids.extend(
                            lake.merged_reading_ids(
                                self.lake_root, f.path, manifest.batch_id, self.kms,
                                f.patient, cache=merged,
                            )
                        )  # fmt: skip
                except lake.LakeError:
                    continue
            for memory in memories:
                memory.add_oldest(ids)

    # -- ledger -------------------------------------------------------------------------

    def manifests(self) -> list[BatchManifest]:
        return read_manifests(self.batches_dir)

    def unproduced(self) -> list[BatchManifest]:
        return unproduced(self.batches_dir)

    def mark_produced(self, manifest: BatchManifest) -> None:
        mark_produced(self.batches_dir, manifest.batch_id)

    def _advance(self, covers: Sequence[OffsetRange]) -> None:
        for c in covers:
            key = (c.topic, c.partition)
            self._high_water[key] = max(self._high_water.get(key, -1), c.last)

    def already_sealed(self, p: Pending) -> bool:
        return p.offset <= self._high_water.get((p.topic, p.partition), -1)

    # -- sealing ------------------------------------------------------------------------

    def seal(self, items: Sequence[Pending]) -> BatchManifest | None:
        """Seal ``items`` (minus any already sealed); ``None`` if nothing is left."""
        fresh = [p for p in items if not self.already_sealed(p)]
        if not fresh:
            return None
        covers = _covers(fresh)
        batch_id = batch_id_for(covers)
        manifest_name = f"{batch_id}.json"
        sealed = self.batches_dir.read(manifest_name)
        if sealed is not None:  # sealed before a crash, ledger not yet told
            manifest = BatchManifest.model_validate_json(sealed)
            self._advance(manifest.covers)
            return manifest

        crashpoint("before_files")
        # Ids sealed by a recent batch (a replay after a crash): one lookup for the batch.
        memories = [self.recent((c.topic, c.partition)) for c in covers]
        replayed = _seen_in(memories, [rid for p in fresh for rid in p.batch.reading_id])
        positions = _positions(fresh)  # before deduplication drops any reading
        grouped = group_by_patient([p.batch for p in fresh], already=replayed)
        # The upper tree's order, and the manifest's names: pseudonyms, sorted.
        pseudonyms = {p: self.kms.pseudonym(p) for p in grouped}
        by_patient = {p: grouped[p] for p in sorted(grouped, key=pseudonyms.__getitem__)}
        patient_roots: list[bytes] = []
        patient_sizes: list[int] = []
        sealed_ids: list[str] = []  # for the memory of recently sealed ids
        files: list[BatchFile] = []
        first_t, last_t = 2**63, -(2**63)
        for patient_id, batches in by_patient.items():
            ids = [rid for b in batches for rid in b.reading_id]
            sealed_ids.extend(ids)
            # A patient erased earlier gets fresh keys for new data ("Patient keys" in
            # docs/invariants.md only promises that the *old* data becomes unreadable).
            self.kms.current_key_id(patient_id)
            salts = self.kms.salts(patient_id, ids)
            arrival: list[bytes] = []  # the leaves in arrival order
            start = 0
            for b in batches:
                arrival.extend(hashing.canonical_leaves(salts[start : start + len(b)], b))
                start += len(b)
            for b in batches:
                if b.device_time_us:
                    first_t = min(first_t, min(b.device_time_us))
                    last_t = max(last_t, max(b.device_time_us))
            table = lake.table_from_batches(
                batches, batch_id=batch_id, positions=[_kept(positions[id(b)], b) for b in batches]
            )
            # Rows in canonical order, leaf_index their place in it: the row and its leaf
            # agree by construction, and leaf_index is 0, 1, 2... in every file.
            order = canonical_order(table)
            table = table.take(order).set_column(
                table.schema.get_field_index("leaf_index"),
                "leaf_index",
                pa.array(np.arange(len(order), dtype=np.int32)),
            )
            leaves = [arrival[i] for i in order.to_pylist()]
            patient_roots.append(hashing.merkle_root(leaves))
            patient_sizes.append(len(leaves))
            for written in lake.write_patient_files(
                self.lake_root, batch_id, patient_id, table, self.kms
            ):
                files.append(
                    BatchFile(
                        path=written.path,  # patient=<pseudonym>/...: BatchFile.patient
                        rows=written.rows,
                        sha256=written.sha256,
                        key_id=self.kms.key_ref(written.key_id),
                        bytes=written.bytes,
                    )
                )
        crashpoint("after_files")
        if not patient_roots:  # every reading was a replay of an earlier batch
            return None
        # The upper level over per-patient roots: the same RFC 9162 root function.
        root = hashing.merkle_root(patient_roots)
        manifest = BatchManifest(
            batch_id=batch_id,
            covers=covers,
            patients=[pseudonyms[p] for p in by_patient],  # the upper tree's leaf order
            rows=sum(patient_sizes),
            first_device_time_us=first_t,
            last_device_time_us=last_t,
            files=files,
            merkle_root=root.hex(),
            patient_roots=[r.hex() for r in patient_roots],
            patient_sizes=patient_sizes,
            sealed_at_us=time.time_ns() // 1000,
        )
        if self.fence is not None:
            self.fence(covers)
        self._indexed(covers, batch_id, manifest.rows)
        self.batches_dir.write(manifest_name, manifest.to_json_bytes())
        crashpoint("after_manifest")
        self._advance(covers)
        for memory in memories:
            memory.add(sealed_ids)
        return manifest


def canonical_order(table: pa.Table) -> pa.Array:
    """The canonical order of one patient's rows of a batch: their leaves' order in the
    patient's subtree, as indices into ``table``.

    By (metric, device_time), the order the lake sorts a file's rows in
    (:func:`streams.lake.table.sort_for_file`, which is stable, so a file written from rows
    in this order keeps it), then device id and seq, which make it total: distinct readings
    of a batch differ in (device, metric, seq, time), the material of their ids. Strings
    compare by code point, as Python's ``sorted`` does.
    """
    key = pa.table(
        {
            "m": pc.cast(table["metric"], pa.string()),
            "t": table["device_time"],
            "d": pc.cast(table["device_id"], pa.string()),
            "s": table["seq"],
        }
    )
    return pc.sort_indices(key, [(c, "ascending") for c in ("m", "t", "d", "s")])


def _positions(items: Sequence[Pending]) -> dict[int, tuple[CleanPosition, list[str]]]:
    """Each item's batch (by ``id``) -> where its readings came from, and its reading ids
    as they were then: a reading's index counts the readings of the record before it, over
    every batch the record decoded to, as the clinician service counts them
    (:mod:`clinic.fanout`)."""
    seen: dict[tuple[str, int, int], int] = {}
    out: dict[int, tuple[CleanPosition, list[str]]] = {}
    for p in items:
        key = (p.topic, p.partition, p.offset)
        start = seen.get(key, 0)
        n = len(p.batch)
        seen[key] = start + n
        index = range(start, start + n)
        out[id(p.batch)] = (CleanPosition(p.partition, p.offset, index), p.batch.reading_id)
    return out


def _kept(position: tuple[CleanPosition, list[str]], batch: SampleBatch) -> CleanPosition:
    """The position of what deduplication kept of ``batch`` (it keeps first occurrences, and
    replaces the id list, so the list noted before still holds every id)."""
    pos, ids = position
    if len(batch) == len(ids):
        return pos
    first: dict[str, int] = {}
    for i, rid in enumerate(ids):
        first.setdefault(rid, pos.index[i])
    return CleanPosition(pos.partition, pos.offset, [first[rid] for rid in batch.reading_id])


def _seen_in(memories: Sequence[RecentlySealed], ids: Sequence[str]) -> set[str]:
    """The ids that any of the partitions' memories holds (a batch normally covers one)."""
    seen: set[str] = set()
    for memory in memories:
        seen |= memory.seen(ids)
    return seen


def _covers(items: Sequence[Pending]) -> list[OffsetRange]:
    spans: dict[tuple[str, int], tuple[int, int]] = {}
    for p in items:
        key = (p.topic, p.partition)
        lo, hi = spans.get(key, (p.offset, p.offset))
        spans[key] = (min(lo, p.offset), max(hi, p.offset))
    return [
        OffsetRange(topic=t, partition=part, first=lo, last=hi)
        for (t, part), (lo, hi) in sorted(spans.items())
    ]


class RecentlySealed:
    """A bounded memory of reading ids sealed lately, forgotten a sealed batch at a time
    (oldest first) once the newer batches hold ``capacity`` ids.

    Why whole batches: each batch's ids are one sorted run of 16-byte digests
    (:class:`~streams.digest_run.DigestRun`), so adding and checking are a few numpy calls
    per batch. Why digests and not the ids' strings: ~16 bytes an id instead of ~100, and in
    one allocation instead of 300,000 small objects scattered among the batch's transient
    ones (which kept the seal process's heap from shrinking between batches). It holds at
    least the ``capacity`` newest ids, and at most one batch more. Reading ids are 32 hex
    digits (:func:`vitalproof.schema.reading_id`); anything else is a ``ValueError``.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._batches: deque[DigestRun] = deque()  # oldest first
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def full(self) -> bool:
        return self._size >= self.capacity

    def seen(self, ids: Sequence[str]) -> set[str]:
        """The ids among ``ids`` held here (normally none), in one lookup per held batch."""
        if not self._batches or not ids:
            return set()
        hi, lo = split(pack_reading_ids(ids))
        hit = np.zeros(len(ids), dtype=np.bool_)
        for run in self._batches:
            hit |= run.contains(hi, lo)
        return {ids[i] for i in np.flatnonzero(hit).tolist()}

    def __contains__(self, rid: object) -> bool:
        try:
            return isinstance(rid, str) and bool(self.seen([rid]))
        except ValueError:  # not a reading id: never sealed
            return False

    def isdisjoint(self, ids: Iterable[str]) -> bool:
        return not self.seen(list(ids))

    def add(self, ids: Sequence[str]) -> None:
        """Remember one sealed batch's ids (the newest)."""
        if not ids:
            return
        self._batches.append(DigestRun(*split(pack_reading_ids(ids))))
        self._size += len(ids)
        while self._size - len(self._batches[0]) >= self.capacity:
            self._size -= len(self._batches.popleft())

    def add_oldest(self, ids: Sequence[str]) -> None:
        """Add one batch older than everything held (loading newest batches first)."""
        if self.full or not ids:
            return
        self._batches.appendleft(DigestRun(*split(pack_reading_ids(ids))))
        self._size += len(ids)


def group_by_patient(
    batches: Sequence[SampleBatch], *, already: RecentlySealed | set[str] | None = None
) -> dict[str, list[SampleBatch]]:
    """Deduplicate by reading id (first wins, and never one sealed ``already``) and group by
    patient, patients sorted.

    Patients in sorted order are the order of the batch tree's upper level; within a patient
    the leaves follow :func:`canonical_order`, so the same records always give the same tree.
    """
    seen: set[str] = set()
    grouped: dict[str, list[SampleBatch]] = {}
    for b in batches:
        if b.patient_id is None:
            raise ValueError(f"batch from {b.device_id} is not normalized (no patient id)")
        ids = b.reading_id
        unique = set(ids)
        if (
            len(unique) == len(ids)
            and seen.isdisjoint(unique)
            and (already is None or already.isdisjoint(unique))
        ):  # no duplicate: the norm
            seen |= unique
        else:
            keep = []
            for i, rid in enumerate(ids):
                if rid not in seen and (already is None or rid not in already):
                    seen.add(rid)
                    keep.append(i)
            if len(keep) != len(b):
                b.keep_only(keep)
        if len(b):
            grouped.setdefault(b.patient_id, []).append(b)
    return dict(sorted(grouped.items()))
