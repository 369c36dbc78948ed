"""Adopting a partition reads its newest manifests only (its index), not the whole lake; and
the fences' lake side: a claim taken by another worker stops a manifest (``streams.fence``).

The cost is counted (``Sealer.manifests_read``), not timed: the lake grows by the batches of
every partition, and adoption must not grow with it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.fence import Fenced, check_claims, read_claim, write_claim
from streams.lake.keystore import LocalKeystore
from streams.lake.layout import BATCHES_DIR
from streams.partition_index import MIN_ENTRIES, index_name, read_index, unproduced_of
from streams.sealer import Pending, Sealer
from tests.test_partition_memory import _batch, sealed_ids
from vitalproof.manifest import BatchManifest

CLEAN = "t.vitals.clean"


def _seal_many(sealer: Sealer, partition: int, batches: int, start: int = 0) -> list[str]:
    ids = []
    for b in range(batches):
        offsets = range(start + 2 * b, start + 2 * b + 2)
        m = sealer.seal([Pending(CLEAN, partition, o, _batch(f"p{partition}", o)) for o in offsets])
        assert m is not None
        ids.append(m.batch_id)
    return ids


def test_adopting_a_partition_reads_its_newest_manifests_not_the_whole_lake(
    tmp_path: Path,
) -> None:
    lake, kms = tmp_path / "lake", LocalKeystore(tmp_path / "keys")
    owner = Sealer(lake, kms, adopt_all=False, recent_ids=4)  # 2 readings a batch: 2 batches
    owner.adopt([(CLEAN, 0), (CLEAN, 1)])
    _seal_many(owner, 0, 25)
    newest = _seal_many(owner, 1, 25)
    assert len(list((lake / BATCHES_DIR).glob("*.json"))) == 50

    heir = Sealer(lake, kms, adopt_all=False, recent_ids=4)
    heir.adopt([(CLEAN, 1)])
    # Before: every one of the 50 manifests; now the partition's newest (its index) only.
    assert heir.manifests_read == MIN_ENTRIES < 50
    # It knows all the same: redelivered offsets are skipped, the newest ids are held.
    assert heir.seal([Pending(CLEAN, 1, 49, _batch("p1", 49))]) is None
    last = owner.batches_dir.read(f"{newest[-1]}.json")
    assert last is not None
    assert not heir.recent((CLEAN, 1)).isdisjoint(
        sealed_ids(BatchManifest.model_validate_json(last), lake, kms)
    )
    fresh = heir.seal([Pending(CLEAN, 1, 50, _batch("p1", 50))])
    assert fresh is not None and fresh.covers[0].first == 50
    index = read_index(lake / BATCHES_DIR, (CLEAN, 1))
    assert index is not None and index.batches[-1].batch_id == fresh.batch_id
    assert len(index.batches) == MIN_ENTRIES  # bounded: the oldest entries were dropped


def test_a_lake_without_indexes_is_adopted_from_every_manifest_once(tmp_path: Path) -> None:
    lake, kms = tmp_path / "lake", LocalKeystore(tmp_path / "keys")
    owner = Sealer(lake, kms, adopt_all=False, recent_ids=4)
    owner.adopt([(CLEAN, 0)])
    _seal_many(owner, 0, 20)
    (lake / BATCHES_DIR / index_name((CLEAN, 0))).unlink()  # as sealed before indexes

    first = Sealer(lake, kms, adopt_all=False, recent_ids=4)
    first.adopt([(CLEAN, 0)])
    assert first.manifests_read >= 20
    assert first.seal([Pending(CLEAN, 0, 39, _batch("p0", 39))]) is None
    second = Sealer(lake, kms, adopt_all=False, recent_ids=4)
    second.adopt([(CLEAN, 0)])  # the first adopter indexed it
    assert second.manifests_read == MIN_ENTRIES


def test_an_index_entry_whose_manifest_never_came_is_not_taken_as_sealed(tmp_path: Path) -> None:
    """The index is written before the manifest: a crash between leaves its newest entry
    without a manifest, and those offsets are sealed again by the next owner."""
    lake, kms = tmp_path / "lake", LocalKeystore(tmp_path / "keys")
    owner = Sealer(lake, kms, adopt_all=False)
    owner.adopt([(CLEAN, 0)])
    (_first, lost) = _seal_many(owner, 0, 2)
    (lake / BATCHES_DIR / f"{lost}.json").unlink()  # as if the crash came before it

    heir = Sealer(lake, kms, adopt_all=False)
    heir.adopt([(CLEAN, 0)])
    again = heir.seal([Pending(CLEAN, 0, o, _batch("p0", o)) for o in (2, 3)])
    assert again is not None and again.batch_id == lost and again.rows == 2
    # The worker's outbox of the partition, from its index: the two manifests, unproduced.
    unsent = unproduced_of(lake / BATCHES_DIR, {(CLEAN, 0)})
    assert unsent is not None and len(unsent) == 2
    assert unproduced_of(lake / BATCHES_DIR, {(CLEAN, 5)}) is None  # no index: not known


def test_a_partition_claimed_by_another_worker_gets_no_manifest(tmp_path: Path) -> None:
    lake, kms = tmp_path / "lake", LocalKeystore(tmp_path / "keys")
    batches = lake / BATCHES_DIR
    zombie = Sealer(lake, kms, adopt_all=False)
    zombie.adopt([(CLEAN, 0)])
    tokens = {(CLEAN, 0): write_claim(batches, (CLEAN, 0))}
    zombie.fence = lambda covers: check_claims(
        batches, tokens, {(c.topic, c.partition) for c in covers}
    )
    _seal_many(zombie, 0, 1)  # still its own: sealed
    heir_token = write_claim(batches, (CLEAN, 0))  # another worker took the partition over
    assert read_claim(batches, (CLEAN, 0)) == heir_token != tokens[(CLEAN, 0)]
    before = sorted(p.name for p in batches.glob("*.json"))
    index_before = (batches / index_name((CLEAN, 0))).read_bytes()
    with pytest.raises(Fenced, match="claimed by another worker"):
        zombie.seal([Pending(CLEAN, 0, o, _batch("p0", o)) for o in (2, 3)])
    assert sorted(p.name for p in batches.glob("*.json")) == before, "a stale manifest"
    assert (batches / index_name((CLEAN, 0))).read_bytes() == index_before
    with pytest.raises(Fenced):
        check_claims(batches, {}, [(CLEAN, 1)])  # never claimed here
