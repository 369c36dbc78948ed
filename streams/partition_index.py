"""A small index per ``vitals.clean`` partition next to the manifests, so that adopting a
partition reads only its newest manifests, not every manifest of the lake.

Why: a worker that is assigned a partition must learn what its previous owner sealed (the
highest offset covered, the reading ids of the newest batches, the manifests not produced
yet). Manifests are named by batch id, which says nothing of the partition, so without an
index that means reading every manifest the lake holds: a cost that grows with the lake's
age, paid on every rebalance by every worker (one GET per manifest on S3).

``_batches/<topic>.<partition>.index`` (JSON) lists the partition's newest batches, newest
last, each with the last offset it covers and its rows, as many as hold the sealer's
memory of recent ids (at least :data:`MIN_ENTRIES`). The sealer rewrites it (atomically,
one small write) *before* each manifest, with the new batch as its newest entry; so a crash
between the two leaves an entry whose manifest does not exist, and readers drop entries
without a manifest (:meth:`PartitionIndex.committed`). Only the newest can be such; the
rest were committed before the index was written. A partition without an index (a lake
sealed before it existed) is adopted from every manifest once, and indexed then.

Pure and free of pyarrow (the worker reads it for its outbox).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from streams.ledger import Folder, folder
from vitalproof.manifest import BatchManifest

INDEX_SUFFIX = ".index"
#: Entries kept whatever their rows: more than the batches a worker has in flight.
MIN_ENTRIES = 8

TP = tuple[str, int]


class IndexEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    batch_id: str
    last: int
    rows: int


class PartitionIndex(BaseModel):
    model_config = ConfigDict(frozen=True)

    topic: str
    partition: int
    batches: list[IndexEntry]  # oldest first

    def committed(self, exists: Callable[[str], bool]) -> list[IndexEntry]:
        """The entries whose manifest exists (the newest may not: a crash before it)."""
        entries = list(self.batches)
        while entries and not exists(entries[-1].batch_id):
            entries.pop()
        return entries

    def then(self, entry: IndexEntry, keep_rows: int) -> PartitionIndex:
        """This index with ``entry`` as the newest; the oldest dropped once the newer
        ones hold ``keep_rows`` rows and :data:`MIN_ENTRIES` entries."""
        entries = [e for e in self.batches if e.batch_id != entry.batch_id] + [entry]
        rows = sum(e.rows for e in entries)
        while len(entries) > MIN_ENTRIES and rows - entries[0].rows >= keep_rows:
            rows -= entries.pop(0).rows
        return self.model_copy(update={"batches": entries})


def index_name(tp: TP) -> str:
    return f"{tp[0]}.{tp[1]}{INDEX_SUFFIX}"


def read_index(batches_dir: Path | Folder, tp: TP) -> PartitionIndex | None:
    data = folder(batches_dir).read(index_name(tp))
    return None if data is None else PartitionIndex.model_validate_json(data)


def write_index(batches_dir: Path | Folder, index: PartitionIndex) -> None:
    name = index_name((index.topic, index.partition))
    folder(batches_dir).write(name, index.model_dump_json().encode())


def index_of(tp: TP, manifests: list[BatchManifest], keep_rows: int) -> PartitionIndex:
    """The index of ``tp`` built from ``manifests`` (a lake sealed before indexes existed)."""
    index = PartitionIndex(topic=tp[0], partition=tp[1], batches=[])
    mine = [(c.last, m) for m in manifests for c in m.covers if (c.topic, c.partition) == tp]
    for last, m in sorted(mine, key=lambda lm: lm[0]):
        index = index.then(IndexEntry(batch_id=m.batch_id, last=last, rows=m.rows), keep_rows)
    return index


def unproduced_of(batches_dir: Path | Folder, tps: set[TP]) -> list[BatchManifest] | None:
    """The manifests of ``tps`` never marked produced, from their indexes alone (the outbox
    of partitions just adopted); ``None`` if one of them has no index yet."""
    out: dict[str, BatchManifest] = {}
    for tp in sorted(tps):
        index = read_index(batches_dir, tp)
        if index is None:
            return None
        for e in index.committed(lambda b: folder(batches_dir).exists(f"{b}.json")):
            if e.batch_id in out or folder(batches_dir).exists(f"{e.batch_id}.produced"):
                continue
            data = (
                (batches_dir / f"{e.batch_id}.json").read_bytes()
                if isinstance(batches_dir, Path)
                else batches_dir.read(f"{e.batch_id}.json")
            )
            if data is not None:
                out[e.batch_id] = BatchManifest.model_validate_json(data)
    return list(out.values())
