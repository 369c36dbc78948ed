"""Deduplication by reading id that survives a restart: windowed ids plus a compacted changelog.

Retransmissions (a device resending after a lost ack, a second gateway hearing the same
notification) arrive seconds to minutes after the original. Normalization drops every sample
whose reading id it has seen within the last ``retain`` windows of *receive* time (the
collector's clock, which a device with a wrong clock cannot push around).

Why a changelog of our own and not a Faust Table: the normalize agent consumes in bulk
(``noack_take``) and must decide when a change becomes durable relative to the clean record
it protects (see :mod:`streams.app`); a Faust Table writes its changelog per assignment,
under the partition of whatever event is "current", on its own schedule.

The cost is per take, not per message or sample: one changelog record per (window, raw
partition) per :meth:`DedupeWindows.drain` (the agent drains once per take, after the
take's clean records are durable), keyed ``<window>/<raw partition>:<raw offset>`` with the
offset of the first raw record in that partition that brought the window new ids; its
value is their new ids packed as 16-byte digests, in record order, at most
:data:`RECORD_BYTES` (then the next raw record starts the next key). (One record per raw
message cost the worker ~5 % of its CPU in sends.) When a window expires its keys get
tombstones, so the compacted topic, and the memory rebuilt from it at start, stay bounded
by ``retain`` windows of traffic.

Why that key survives a crash: after one, the agent resumes at the committed offset, where
a take of the crashed run began, and the changelog's ids of every record before the crash
are dropped as seen. The first records with new ids are those of the take whose changelog
write was lost or raced the crash: the same first offset, so the same key, overwritten.
A replay cut differently may hold fewer of that take's ids than the record it overwrites;
the rest belong to uncommitted raw records, which the replay processes (and writes under
their own key) before their offsets are committed. Every record only ever holds ids whose
clean records were durable when it was written, so the worst a crash costs is a reading
emitted twice (the sealer's memory of sealed ids drops it), never one dropped for good.

Memory: at 200,000 samples/s five minutes are 60M ids, far too many for Python strings in a
set (~120 bytes each, measured). Ids are held as 16-byte digests in sorted numpy runs
(:mod:`streams.digest_run`) behind a one-byte-per-slot filter (:mod:`streams.id_filter`),
~23 bytes per id at 10M; only the newest ``recent_ids`` live as the batch's own hex
strings in a set, until they are packed into a run. And the memory has a
budget, ``max_ids``: when it is reached the oldest window is evicted early (tombstoned,
counted in :attr:`DedupeWindows.evicted_windows`, logged). The trade-off: at full rate the
budget, not ``retain``, decides how late a retransmission normalize still catches; an
older one reaches the sealer, whose memory of recently sealed ids is the last line.

Pure logic: :class:`DedupeWindows` takes changelog records in and hands records to write
out; the agent does the Kafka I/O.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from itertools import chain

import numpy as np

from streams.digest_run import ID_BYTES, Bools, DigestRun, split
from streams.id_filter import MAX_LIVE, IdFilter
from vitalproof.errors import VitalproofError
from vitalproof.schema import SampleBatch

log = logging.getLogger(__name__)

#: Retransmissions later than ``WINDOW_US * RETAIN_WINDOWS`` after the original reach the
#: sealer, whose own memory of recently sealed ids is the last line.
WINDOW_US = 60 * 1_000_000
RETAIN_WINDOWS = 5
MAX_IDS = 4_000_000
"""Default memory budget in ids (~23 bytes each held): 5 minutes of 13,000 samples/s, 20 s at
200,000 samples/s (one worker stays under 512 MB with the seal process beside it)."""
RECENT_IDS = 1 << 17
"""Newest ids kept as strings before they are packed into a run (a bounded, fast set; packing
waits for the end of a :meth:`DedupeWindows.drop_seen_many` call, so one take may exceed it)."""
RUN_IDS = 1 << 21
"""Largest run a window grows by merging: bounds the copy (and the memory it needs
transiently) of one merge; a window with more ids holds several runs."""

RECORD_BYTES = 512 * 1024
"""A changelog record's value at most, unless one raw record's new ids alone are more: well
under Kafka's default 1 MB message size (a take of 1,000 raw records of 120 samples from one
partition and window would be 1.9 MB). Where a record is cut depends only on the raw records
from its first one on, so a replay cuts it at the same place."""

Record = tuple[bytes, bytes | None]
"""One changelog record: key, and the packed ids (``None``: a tombstone)."""


class ChangelogError(VitalproofError, ValueError):
    """A changelog record that this module did not write (wrong key or value shape)."""


class DedupeWindows:
    """Reading ids seen in the newest ``retain`` windows; the changelog records to write."""

    def __init__(
        self,
        *,
        window_us: int = WINDOW_US,
        retain: int = RETAIN_WINDOWS,
        max_ids: int = MAX_IDS,
        recent_ids: int = RECENT_IDS,
        run_ids: int = RUN_IDS,
    ) -> None:
        if min(window_us, retain, max_ids, recent_ids, run_ids) <= 0:
            raise ValueError("window_us, retain, max_ids, recent_ids and run_ids must be positive")
        if retain > MAX_LIVE:
            raise ValueError(f"retain must be at most {MAX_LIVE} windows")
        self.window_us = window_us
        self.retain = retain
        self.max_ids = max_ids
        self.recent_ids = recent_ids
        self.run_ids = run_ids
        # Ids not packed yet: one set over all windows (one C-level lookup per batch), and
        # per window the batches' ids, to pack them or to forget them with their window.
        self._recent: set[str] = set()
        self._recent_by_window: dict[int, list[tuple[str, ...]]] = {}
        self._runs: dict[int, list[DigestRun]] = {}  # window -> packed ids
        self._counts: dict[int, int] = {}  # window -> ids held
        self._keys: dict[int, list[bytes]] = {}  # window -> its changelog keys
        self._held = 0
        self._filter = IdFilter(max_ids)
        self._newest = -(2**62)
        self._out: list[Record] = []  # tombstones (and records of windows gone since)
        # (window, raw partition) -> its changelog key and packed ids, until drain()
        self._pending: dict[tuple[int, str], tuple[bytes, list[bytes]]] = {}
        self._pending_bytes: dict[tuple[int, str], int] = {}
        self._generation = 0  # windows dropped so far
        self.dropped = 0
        """Samples dropped as duplicates since start."""
        self.evicted_windows = 0
        """Windows dropped before their time because the memory budget was reached."""
        self.evicted_ids = 0

    def __len__(self) -> int:
        """Reading ids held (what bounds the memory)."""
        return self._held

    @property
    def windows(self) -> list[int]:
        return sorted(self._keys)

    @property
    def nbytes(self) -> int:
        """Bytes of the runs and the filter (the recent set not counted)."""
        return self._filter.nbytes + sum(r.nbytes for rs in self._runs.values() for r in rs)

    # -- the hot path -------------------------------------------------------------------

    def drop_seen(self, batch: SampleBatch, origin: str) -> int:
        """:meth:`drop_seen_many` for one batch."""
        return self.drop_seen_many([(batch, origin)])

    def drop_seen_many(self, batches: Sequence[tuple[SampleBatch, str]]) -> int:
        """Remove samples already seen (in place), remember the rest; how many were removed.

        ``batches`` in the order their raw records were consumed, each with its ``origin``,
        the raw record (``partition:offset``; one partition's records in offset order): the
        first record with new ids per window and partition since the last :meth:`drain`
        makes the changelog key (see the module docstring). They are handled one after the
        other, so a retransmission among them is dropped like one from before.

        Why many at once (the agent passes a whole take): the runs are looked up for every
        id of every batch in one vectorized call. Per message, numpy's per-call overhead,
        paid for every run, cost more than the lookups (~150 us per message of 120 ids
        with 3.5M ids held, measured). Packing recent ids into runs waits until all are
        handled, so those answers stay valid; only a window dropped meanwhile (expired,
        evicted) has the rest looked up again. Duplicates are rare: when no run holds any
        id of a batch, the recent set holds none and none repeats (C-level set operations,
        one set for all windows), the batch is kept whole; only otherwise is it walked id
        by id.
        """
        for batch, _origin in batches:
            if len(batch.reading_id) != len(batch):
                raise ValueError("drop_seen() needs reading ids (a normalized batch)")
        packed_all = bytes.fromhex("".join(chain.from_iterable(b.reading_id for b, _ in batches)))
        held = self._held_rows(packed_all)
        generation = self._generation
        dropped = start = 0
        for batch, origin in batches:
            stop = start + len(batch.reading_id)
            if stop == start:
                continue
            if self._generation != generation:  # a window went: look the rest up again
                rest = self._held_rows(packed_all[start * ID_BYTES :])
                held, generation = [start + r for r in rest], self._generation
            known = held[bisect_left(held, start) : bisect_left(held, stop)]
            packed = packed_all[start * ID_BYTES : stop * ID_BYTES]
            dropped += self._drop_one(batch, origin, packed, {r - start for r in known})
            start = stop
        if len(self._recent) >= self.recent_ids:
            self._pack_recent()
        return dropped

    def _drop_one(self, batch: SampleBatch, origin: str, packed: bytes, in_runs: set[int]) -> int:
        """One batch of :meth:`drop_seen_many`: ``in_runs``, the positions some run holds."""
        ids = batch.reading_id
        unique = set(ids)
        if not in_runs and len(unique) == len(ids) and self._recent.isdisjoint(unique):
            fresh = ids
        else:
            keep: list[int] = []
            within: set[str] = set()
            for i, rid in enumerate(ids):
                if i in in_runs or rid in within or rid in self._recent:
                    continue
                within.add(rid)
                keep.append(i)
            if len(keep) != len(ids):
                batch.keep_only(keep)
            fresh = batch.reading_id
            packed = bytes.fromhex("".join(fresh))
        dropped = len(ids) - len(fresh)
        self.dropped += dropped
        if fresh:
            window = self._window_of(batch)
            if window > self._newest - self.retain:
                self._remember(window, origin, fresh, packed)
            self._expire()
            self._enforce_budget()
        return dropped

    def _remember(self, window: int, origin: str, fresh: list[str], packed: bytes) -> None:
        """Hold new ids, and add them to the changelog record of their window and partition."""
        group = (window, origin.partition(":")[0])
        pending = self._pending.get(group)
        size = self._pending_bytes.get(group, 0) + len(packed)
        if pending is not None and size > RECORD_BYTES:  # full: out, start anew
            self._out.append((pending[0], b"".join(pending[1])))
            pending = None
        if pending is None:
            key = f"{window}/{origin}".encode()
            self._keys.setdefault(window, []).append(key)
            self._pending[group] = (key, [packed])
            size = len(packed)
        else:
            pending[1].append(packed)
        self._pending_bytes[group] = size
        self._recent.update(fresh)
        self._recent_by_window.setdefault(window, []).append(tuple(fresh))
        self._count(window, len(fresh))
        self._newest = max(self._newest, window)

    def drain(self) -> list[Record]:
        """The changelog records to write since the last call: one per (window, raw
        partition) with new ids, and the tombstones of the windows gone.

        Call it once the clean records of every batch passed to :meth:`drop_seen` since the
        last call are durable, and write what it returns.
        """
        out, self._out = self._out, []
        out.extend((key, b"".join(packs)) for key, packs in self._pending.values())
        self._pending.clear()
        self._pending_bytes.clear()
        return out

    # -- restart ------------------------------------------------------------------------

    def load(self, records: Iterable[Record]) -> None:
        """Rebuild from the changelog as read from its start (last value per key wins).

        The packed values go straight into runs, one bulk sort per window. Windows that
        expired meanwhile, or that do not fit the budget, are dropped and get their
        tombstones (in :meth:`drain`), so a compaction that has not run yet costs nothing
        after a restart.
        """
        latest: dict[bytes, bytes | None] = {}
        for key, value in records:
            latest[key] = value
        by_window: dict[int, list[tuple[bytes, bytes]]] = {}
        for key, value in latest.items():
            if value is None:
                continue
            window = _parse_key(key)
            if len(value) % ID_BYTES:
                raise ChangelogError(f"changelog value of {key!r} is not whole 16-byte ids")
            by_window.setdefault(window, []).append((key, value))
        del latest
        self._newest = max([self._newest, *by_window])
        for window in sorted(by_window):
            entries = by_window.pop(window)
            keys = self._keys.setdefault(window, [])
            keys.extend(k for k, _v in entries)
            if window <= self._newest - self.retain:
                continue  # tombstoned by _expire below
            hi, lo = split(b"".join(v for _k, v in entries))
            self._filter.add(window, hi)
            for start in range(0, len(hi), self.run_ids):
                self._add_run(
                    window,
                    DigestRun(hi[start : start + self.run_ids], lo[start : start + self.run_ids]),
                )
            self._count(window, len(hi))
        self._expire()
        self._enforce_budget()

    def adopt(self, records: Iterable[Record], partitions: set[int]) -> int:
        """Add what the changelog (read from its start) holds for raw ``partitions``, just
        assigned to this worker, under keys not known here yet; the number of keys added.

        Why: in a group of workers a raw partition moves on a rebalance, and its previous
        owner wrote changelog records after this worker last read the topic. The keys are
        by raw partition, so the new owner picks exactly those up. A key known already keeps
        what is held for it (a replay may rewrite a key with fewer ids, never with ids the
        first record lacked and whose clean records were not durable).
        """
        known = {k for keys in self._keys.values() for k in keys}
        known.update(key for key, _packs in self._pending.values())
        fresh = [
            (key, value)
            for key, value in records
            if key not in known and _parse_partition(key) in partitions
        ]
        before = sum(len(keys) for keys in self._keys.values())
        self.load(fresh)
        return sum(len(keys) for keys in self._keys.values()) - before

    def forget(self, partitions: set[int]) -> None:
        """Stop tracking the changelog keys of raw ``partitions`` (revoked from this worker):
        their new owner tombstones them when their windows expire, and this worker's budget
        never evicts another's records. The ids stay held until their window goes: a stale
        "seen" is still true, so it drops nothing genuine."""
        for window, keys in self._keys.items():
            self._keys[window] = [k for k in keys if _parse_partition(k) not in partitions]

    # -- internals ----------------------------------------------------------------------

    def _window_of(self, batch: SampleBatch) -> int:
        t = batch.receive_time_us or (min(batch.device_time_us) if batch.device_time_us else 0)
        return t // self.window_us

    def _held_rows(self, packed: bytes) -> list[int]:
        """Positions (ascending) of the packed ids that some run holds."""
        found = self._in_runs(packed)
        return [] if found is None else np.flatnonzero(found).tolist()

    def _in_runs(self, packed: bytes) -> Bools | None:
        """Which of the packed ids some run holds (``None``: none of them).

        Only the ids the filter cannot rule out are looked up, in every run.
        """
        if not self._runs:
            return None
        hi, lo = split(packed)
        maybe = self._filter.maybe_held(hi)
        if not maybe.any():
            return None
        rows = np.flatnonzero(maybe)
        hi, lo = hi[rows], lo[rows]
        hit = np.zeros(len(rows), dtype=np.bool_)
        for runs in self._runs.values():
            for run in runs:
                hit |= run.contains(hi, lo)
        found = np.zeros(len(maybe), dtype=np.bool_)
        found[rows] = hit
        return found

    def _count(self, window: int, n: int) -> None:
        self._counts[window] = self._counts.get(window, 0) + n
        self._held += n

    def _add_run(self, window: int, run: DigestRun) -> None:
        """Merge into the window's last run while that stays within ``run_ids``."""
        runs = self._runs.setdefault(window, [])
        if runs and len(runs[-1]) + len(run) <= self.run_ids:
            runs[-1] = DigestRun.merged([runs[-1], run])
        else:
            runs.append(run)

    def _pack_recent(self) -> None:
        for window, batches in self._recent_by_window.items():
            hi, lo = split(bytes.fromhex("".join(chain.from_iterable(batches))))
            self._filter.add(window, hi)  # the filter covers the runs, the set itself
            self._add_run(window, DigestRun(hi, lo))
        self._recent.clear()
        self._recent_by_window.clear()

    def _expire(self) -> None:
        cutoff = self._newest - self.retain
        for window in [w for w in self._keys if w <= cutoff]:
            self._drop_window(window)

    def _enforce_budget(self) -> None:
        """Evict the oldest windows (tombstoned like expired ones) while over ``max_ids``."""
        while self._held > self.max_ids and self._keys:
            window = min(self._keys)
            n = self._counts.get(window, 0)
            self._drop_window(window)
            self.evicted_windows += 1
            self.evicted_ids += n
            log.warning(
                "dedupe: memory budget of %d ids reached; window %d (%d ids) evicted before "
                "its time (%d windows, %d ids evicted so far): older retransmissions reach "
                "the sealer",
                self.max_ids,
                window,
                n,
                self.evicted_windows,
                self.evicted_ids,
            )

    def _drop_window(self, window: int) -> None:
        self._generation += 1  # lookups made before may name ids of this window
        # A record not drained yet goes out before its tombstone (compaction keeps the last).
        for group in [g for g in self._pending if g[0] == window]:
            key, packs = self._pending.pop(group)
            del self._pending_bytes[group]
            self._out.append((key, b"".join(packs)))
        for key in self._keys.pop(window):
            self._out.append((key, None))
        self._runs.pop(window, None)
        self._filter.drop(window)
        for ids in self._recent_by_window.pop(window, ()):
            self._recent.difference_update(ids)
        self._held -= self._counts.pop(window, 0)


def _parse_key(key: bytes) -> int:
    window, sep, _rest = key.partition(b"/")
    try:
        if not sep:
            raise ValueError
        return int(window)
    except ValueError:
        raise ChangelogError(
            f"changelog key {key!r} is not <window>/<partition>:<offset>[/<device>]"
        ) from None


def _parse_partition(key: bytes) -> int:
    """The raw partition of a changelog key ``<window>/<partition>:<offset>[/<device>]``."""
    _window, _sep, rest = key.partition(b"/")
    part, sep, _offset = rest.partition(b":")
    try:
        if not sep:
            raise ValueError
        return int(part)
    except ValueError:
        raise ChangelogError(
            f"changelog key {key!r} is not <window>/<partition>:<offset>[/<device>]"
        ) from None
