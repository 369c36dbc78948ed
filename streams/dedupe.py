"""Deduplication by reading id that survives a restart: windowed ids plus a compacted changelog.

Retransmissions (a device resending after a lost ack, a second gateway hearing the same
notification) arrive seconds to minutes after the original. Normalization drops every sample
whose reading id it has seen within the last ``retain`` windows of *receive* time (the
collector's clock, which a device with a wrong clock cannot push around).

Why a changelog of our own and not a Faust Table: the normalize agent consumes in bulk
(``noack_take``) and must decide when a change becomes durable relative to the clean record
it protects (see :mod:`streams.app`); a Faust Table writes its changelog per assignment,
under the partition of whatever event is "current", on its own schedule.

The cost is per message, not per sample: one changelog record per accepted raw message,
keyed ``<window>/<raw partition>:<raw offset>/<device>`` (a replay of the same raw record
rewrites the same key), whose value is the message's new ids packed as 16-byte digests.
When a window expires its keys get tombstones, so the compacted topic, and the memory
rebuilt from it at start, stay bounded by ``retain`` windows of traffic.

Pure logic: :class:`DedupeWindows` takes changelog records in and hands records to write
out; the agent does the Kafka I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from vitalproof.schema import SampleBatch

#: Retransmissions later than ``WINDOW_US * RETAIN_WINDOWS`` after the original reach the
#: sealer, whose own memory of recently sealed ids is the last line.
WINDOW_US = 60 * 1_000_000
RETAIN_WINDOWS = 5
ID_BYTES = 16  # a reading id is a 16-byte BLAKE2b digest, hex on the wire

Record = tuple[bytes, bytes | None]
"""One changelog record: key, and the packed ids (``None``: a tombstone)."""


class ChangelogError(ValueError):
    """A changelog record that this module did not write (wrong key or value shape)."""


@dataclass(frozen=True, slots=True)
class _Entry:
    window: int
    ids: list[str]


class DedupeWindows:
    """Reading ids seen in the newest ``retain`` windows; the changelog records to write."""

    def __init__(self, *, window_us: int = WINDOW_US, retain: int = RETAIN_WINDOWS) -> None:
        if window_us <= 0 or retain <= 0:
            raise ValueError("window_us and retain must be positive")
        self.window_us = window_us
        self.retain = retain
        self._ids: set[str] = set()
        self._entries: dict[bytes, _Entry] = {}  # changelog key -> what it added
        self._windows: dict[int, list[bytes]] = {}  # window -> changelog keys
        self._newest = -(2**62)
        self._out: list[Record] = []
        self.dropped = 0
        """Samples dropped as duplicates since start."""

    def __len__(self) -> int:
        """Reading ids held (what bounds the memory)."""
        return len(self._ids)

    @property
    def windows(self) -> list[int]:
        return sorted(self._windows)

    # -- the hot path -------------------------------------------------------------------

    def drop_seen(self, batch: SampleBatch, origin: str) -> int:
        """Remove samples already seen (in place), remember the rest; how many were removed.

        ``origin`` names the raw record (``partition:offset``): it makes the changelog key,
        so processing the same record again writes the same key. Duplicates are rare: when
        none of the ids is known and none repeats (two C-level set operations) the batch is
        kept whole; only otherwise is it walked id by id.
        """
        ids = batch.reading_id
        if len(ids) != len(batch):
            raise ValueError("drop_seen() needs reading ids (a normalized batch)")
        seen = self._ids
        unique = set(ids)
        if len(unique) == len(ids) and seen.isdisjoint(unique):
            fresh = ids
        else:
            keep: list[int] = []
            within: set[str] = set()
            for i, rid in enumerate(ids):
                if rid in seen or rid in within:
                    continue
                within.add(rid)
                keep.append(i)
            if len(keep) != len(ids):
                batch.keep_only(keep)
            fresh = batch.reading_id
        dropped = len(ids) - len(fresh)
        self.dropped += dropped
        if fresh:
            window = self._window_of(batch)
            key = f"{window}/{origin}/{batch.device_id}".encode()
            if self._add(key, window, list(fresh)):
                self._out.append((key, bytes.fromhex("".join(fresh))))
            self._expire()
        return dropped

    def drain(self) -> list[Record]:
        """The changelog records to write since the last call, in order."""
        out, self._out = self._out, []
        return out

    # -- restart ------------------------------------------------------------------------

    def load(self, records: Iterable[Record]) -> None:
        """Rebuild from the changelog as read from its start (last value per key wins).

        Windows that expired meanwhile are dropped and get their tombstones (in
        :meth:`drain`), so a compaction that has not run yet costs nothing after a restart.
        """
        latest: dict[bytes, bytes | None] = {}
        for key, value in records:
            latest[key] = value
        for key, value in latest.items():
            if value is None:
                continue
            window = _parse_key(key)
            if len(value) % ID_BYTES:
                raise ChangelogError(f"changelog value of {key!r} is not whole 16-byte ids")
            hexed = value.hex()
            step = 2 * ID_BYTES
            self._add(key, window, [hexed[i : i + step] for i in range(0, len(hexed), step)])
        self._expire()

    # -- internals ----------------------------------------------------------------------

    def _window_of(self, batch: SampleBatch) -> int:
        t = batch.receive_time_us or (min(batch.device_time_us) if batch.device_time_us else 0)
        return t // self.window_us

    def _add(self, key: bytes, window: int, ids: list[str]) -> bool:
        """Remember ``ids`` under ``key``; ``False`` if its window has expired already."""
        if window <= self._newest - self.retain:
            return False
        old = self._entries.get(key)
        if old is not None:  # the same raw record again: replace, never double count
            self._ids.difference_update(old.ids)
        else:
            self._windows.setdefault(window, []).append(key)
        self._entries[key] = _Entry(window, ids)
        self._ids.update(ids)
        self._newest = max(self._newest, window)
        return True

    def _expire(self) -> None:
        cutoff = self._newest - self.retain
        if min(self._windows, default=cutoff + 1) > cutoff:
            return
        for window in [w for w in self._windows if w <= cutoff]:
            for key in self._windows.pop(window):
                entry = self._entries.pop(key)
                self._ids.difference_update(entry.ids)
                self._out.append((key, None))


def _parse_key(key: bytes) -> int:
    window, sep, _rest = key.partition(b"/")
    try:
        if not sep:
            raise ValueError
        return int(window)
    except ValueError:
        raise ChangelogError(f"changelog key {key!r} is not <window>/<origin>/<device>") from None
