"""The compact dedupe memory against a plain Python set: same drops, never a false "seen",
bounded by its budget, and rebuilt from its changelog."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from streams.dedupe import DedupeWindows
from streams.digest_run import BLOCK, DigestRun, split
from vitalproof.schema import SampleBatch
from vitalproof.settings import DedupeSettings, Settings

MIN = 60 * 1_000_000
T0 = 1_800_000_000_000_000 // MIN * MIN


def digest(i: int) -> str:
    return hashlib.blake2b(str(i).encode(), digest_size=16).hexdigest()


# Ids that differ only in their second word share a bucket and a first word: the fast path's
# block, the long-bucket fallback and the full 16-byte comparison all get exercised.
TWINS = [("ab" * 8) + f"{i:016x}" for i in range(2 * BLOCK + 8)]
POOL = [digest(i) for i in range(48)] + TWINS


def batch(ids: list[str], received_us: int) -> SampleBatch:
    n = len(ids)
    return SampleBatch(
        "dev-1",
        metric=["heart_rate"] * n,
        unit=["/min"] * n,
        device_time_us=[T0] * n,
        seq=list(range(n)),
        value=[70.0] * n,
        quality=[0] * n,
        reading_id=list(ids),
        receive_time_us=received_us,
    )


class Reference:
    """The semantics in plain Python: ids per window; a batch is checked against what is
    held, then its window may push the oldest ones out of the newest ``retain``."""

    def __init__(self, retain: int) -> None:
        self.retain = retain
        self.windows: dict[int, set[str]] = {}
        self.newest = -(2**62)

    def drop_seen(self, ids: list[str], window: int) -> list[str]:
        seen = set().union(*self.windows.values())
        fresh: list[str] = []
        for rid in ids:
            if rid not in seen:
                seen.add(rid)
                fresh.append(rid)
        if fresh and window > self.newest - self.retain:
            self.windows.setdefault(window, set()).update(fresh)
            self.newest = max(self.newest, window)
        self.windows = {w: s for w, s in self.windows.items() if w > self.newest - self.retain}
        return fresh


steps = st.lists(
    st.tuples(
        st.lists(st.sampled_from(POOL), min_size=1, max_size=12),
        # windows to advance before this batch; back: a collector with a late clock
        st.integers(min_value=-1, max_value=2),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(steps=steps, retain=st.integers(min_value=1, max_value=4), recent=st.integers(1, 20))
def test_drops_exactly_what_a_python_set_drops_within_retention(
    steps: list[tuple[list[str], int]], retain: int, recent: int
) -> None:
    # recent_ids/run_ids tiny: ids move from the recent set into runs, and runs merge, all
    # the time; the answers must not change.
    d = DedupeWindows(
        window_us=MIN, retain=retain, max_ids=1000, recent_ids=recent, run_ids=3 * recent
    )
    ref = Reference(retain)
    window = 0
    for n, (ids, advance) in enumerate(steps):
        window += advance
        b = batch(ids, T0 + window * MIN + n)
        expected = ref.drop_seen(ids, T0 // MIN + window)
        d.drop_seen(b, f"0:{n}")
        assert b.reading_id == expected
        assert len(d) == sum(len(s) for s in ref.windows.values())
    # ... and the changelog rebuilds the same memory.
    after = DedupeWindows(window_us=MIN, retain=retain, max_ids=1000, run_ids=3 * recent)
    after.load(d.drain())
    assert after.windows == sorted(ref.windows) and len(after) == len(d)


@settings(max_examples=150, deadline=None)
@given(
    steps=steps,
    retain=st.integers(min_value=1, max_value=4),
    recent=st.integers(1, 20),
    cuts=st.lists(st.integers(1, 8), min_size=1, max_size=40),
)
def test_a_take_at_once_drops_what_its_batches_one_by_one_drop(
    steps: list[tuple[list[str], int]], retain: int, recent: int, cuts: list[int]
) -> None:
    # As the agent calls it: the batches of one take in one call (runs looked up once for
    # all, windows expiring and ids moving into runs in between), drained per take.
    d = DedupeWindows(
        window_us=MIN, retain=retain, max_ids=1000, recent_ids=recent, run_ids=3 * recent
    )
    ref = Reference(retain)
    window, n, records = 0, 0, []
    takes = iter(cuts * len(steps))
    while n < len(steps):
        take = steps[n : n + next(takes)]
        batches, expected = [], []
        for k, (ids, advance) in enumerate(take, n):
            window += advance
            batches.append((batch(ids, T0 + window * MIN + k), f"0:{k}"))
            expected.append(ref.drop_seen(ids, T0 // MIN + window))
        dropped = d.drop_seen_many(batches)
        assert [b.reading_id for b, _ in batches] == expected
        assert dropped == sum(len(ids) for ids, _ in take) - sum(map(len, expected))
        assert len(d) == sum(len(s) for s in ref.windows.values())
        records += d.drain()
        n += len(take)
    after = DedupeWindows(window_us=MIN, retain=retain, max_ids=1000, run_ids=3 * recent)
    after.load(records)
    assert after.windows == sorted(ref.windows) and len(after) == len(d)


@settings(max_examples=100, deadline=None)
@given(steps=steps, budget=st.integers(min_value=1, max_value=30))
def test_under_any_budget_it_never_drops_an_id_it_has_not_seen(
    steps: list[tuple[list[str], int]], budget: int
) -> None:
    d = DedupeWindows(window_us=MIN, retain=3, max_ids=budget, recent_ids=4, run_ids=8)
    accepted: set[str] = set()
    window = 0
    for n, (ids, advance) in enumerate(steps):
        window += advance
        b = batch(ids, T0 + window * MIN)
        d.drop_seen(b, f"0:{n}")
        assert len(set(b.reading_id)) == len(b.reading_id)
        # whatever was dropped had been accepted before (or earlier in this batch)
        dropped = set(ids) - set(b.reading_id)
        assert dropped <= accepted
        accepted.update(b.reading_id)
        assert len(d) <= budget


def test_the_budget_evicts_the_oldest_window_early_with_tombstones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = DedupeWindows(window_us=MIN, retain=5, max_ids=250, recent_ids=64)
    for minute in range(3):
        ids = [digest(minute * 1000 + i) for i in range(100)]
        d.drop_seen(batch(ids, T0 + minute * MIN), f"0:{minute}")
    # 300 ids > 250: the first window went although 5 would be retained by time
    assert d.windows == [T0 // MIN + 1, T0 // MIN + 2] and len(d) == 200
    assert (d.evicted_windows, d.evicted_ids) == (1, 100)
    assert "memory budget of 250 ids reached" in caplog.text
    assert caplog.records[-1].levelno == logging.WARNING
    records = d.drain()
    assert (f"{T0 // MIN}/0:0".encode(), None) in records
    # the evicted ids are no longer known; the retained ones still are
    old, kept = batch([digest(5)], T0 + 3 * MIN), batch([digest(1005)], T0 + 3 * MIN)
    assert d.drop_seen(old, "0:9") == 0 and d.drop_seen(kept, "0:10") == 1
    # a restart with the same budget loads what fits, newest first kept
    after = DedupeWindows(window_us=MIN, retain=5, max_ids=150)
    after.load(records)
    assert after.windows == [T0 // MIN + 2] and len(after) == 100
    assert [k for k, v in after.drain() if v is None] == [f"{T0 // MIN + 1}/0:1".encode()]


def test_reload_puts_the_packed_changelog_values_straight_into_runs() -> None:
    ids = [digest(i) for i in range(10_000)]
    packed = bytes.fromhex("".join(ids))
    records = [
        (f"{T0 // MIN}/0:{i}/dev-1".encode(), packed[i * 1600 : (i + 1) * 1600]) for i in range(100)
    ]
    d = DedupeWindows(window_us=MIN, run_ids=4096, max_ids=10_000)
    d.load(records)
    assert len(d) == 10_000 and d.nbytes >= 16 * 10_000
    # digests (16), bucket index (~2) and filter (4 one-byte slots per id of the budget):
    # no Python object per id
    assert d.nbytes < 24 * 10_000
    probe = batch([*ids[::97], digest(10000001)], T0 + 1)
    assert d.drop_seen(probe, "1:0") == len(ids[::97]) and probe.reading_id == [digest(10_000_001)]


def test_a_run_answers_exactly_on_all_16_bytes_even_in_a_long_bucket() -> None:
    held = TWINS[::2]
    run = DigestRun(*split(bytes.fromhex("".join(held))))
    assert max(np.diff(run._starts.astype(np.int64))) > BLOCK  # the fallback path is taken
    hi, lo = split(bytes.fromhex("".join(TWINS)))
    assert run.contains(hi, lo).tolist() == [t in held for t in TWINS]
    with pytest.raises(ValueError, match="16-byte"):
        split(b"\x00" * 17)


def test_budget_and_retention_are_settings_the_worker_inherits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VITALPROOF_DEDUPE_MAX_IDS", "1234")
    s = Settings()
    assert (s.dedupe.max_ids, s.dedupe.retain_windows) == (1234, 5)
    # what `worker` is started with
    assert s.child_env(Path("unused"))["VITALPROOF_DEDUPE_MAX_IDS"] == "1234"
    with pytest.raises(ValidationError):
        DedupeSettings(max_ids=0)
    with pytest.raises(ValueError, match="at most 254 windows"):
        DedupeWindows(retain=300)
