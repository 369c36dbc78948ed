"""The sealer's memory of recently sealed reading ids: at least the newest ``capacity`` ids,
forgotten a whole batch at a time, oldest first; loading from the ledger adds older ones."""

from __future__ import annotations

import hashlib

import pytest

from streams.sealer import RecentlySealed, group_by_patient
from vitalproof.schema import SampleBatch


def rid(name: str) -> str:
    """A reading id (32 hex digits) named for the test."""
    return hashlib.blake2b(name.encode(), digest_size=16).hexdigest()


def ids(prefix: str, n: int) -> list[str]:
    return [rid(f"{prefix}{i}") for i in range(n)]


def test_keeps_the_newest_capacity_ids_and_forgets_whole_old_batches() -> None:
    recent = RecentlySealed(10)
    recent.add(ids("a", 6))
    recent.add(ids("b", 6))
    assert len(recent) == 12 and recent.full  # "a" still needed: "b" alone holds 6 < 10
    assert rid("a0") in recent and rid("b5") in recent
    recent.add(ids("c", 4))  # "b" + "c" hold 10: "a" goes
    assert len(recent) == 10
    assert rid("a0") not in recent and rid("b0") in recent and rid("c3") in recent
    assert recent.isdisjoint({rid("a1"), rid("zz")})
    assert not recent.isdisjoint({rid("zz"), rid("c1")})
    assert recent.seen([rid("c1"), rid("zz"), rid("b2")]) == {rid("c1"), rid("b2")}
    recent.add([])
    assert len(recent) == 10


def test_loading_adds_older_batches_until_full() -> None:
    recent = RecentlySealed(5)
    recent.add_oldest(ids("new", 3))
    recent.add_oldest(ids("old", 3))
    recent.add_oldest(ids("older", 3))  # already full: ignored
    assert len(recent) == 6 and rid("old2") in recent and rid("older0") not in recent
    recent.add(ids("next", 5))  # the newest 5 alone reach capacity: both loaded batches go
    assert len(recent) == 5 and rid("new0") not in recent and rid("old0") not in recent


def test_group_by_patient_drops_ids_sealed_already() -> None:
    b = SampleBatch(device_id="dev-1")
    for i in range(4):
        b.add("heart_rate", "/min", 1_000 + i, i, 60.0)
    b.patient_id = "pat-1"
    b.fill_reading_ids()
    all_ids = list(b.reading_id)
    recent = RecentlySealed(100)
    recent.add(all_ids[:2])
    grouped = group_by_patient([b], already=recent)
    assert grouped["pat-1"][0].reading_id == all_ids[2:] and len(b) == 2


def test_ids_that_are_not_reading_ids_are_refused() -> None:
    recent = RecentlySealed(10)
    for bad in (["a0"], ["zz" * 16], [rid("x") + "0"]):
        with pytest.raises(ValueError, match="32 hex digits"):
            recent.add(bad)
    assert "a0" not in recent and len(recent) == 0
