"""A bounded, fsync'd, append-only disk buffer: what a gateway holds while Kafka is away.

Why a disk buffer at all: a BLE peripheral does not redeliver. Once a notification reached
the gateway, the gateway is the only place the reading exists, so it must survive Kafka
being unreachable and the gateway process being restarted. Every record is written here
first and leaves only after Kafka acknowledged it.

Layout of ``directory``::

    seg-<first index, 20 digits>.log   records, appended, never rewritten
    cursor.json                        {"head": <first live index>, "evicted": <total>}

A record on disk is ``length u32 | crc32 u32 | index u64 | payload``, little-endian. Indexes
grow by one per record across segments, so FIFO order is the index order and survives
restarts. ``cursor.json`` is replaced atomically (temp file, fsync, rename, fsync dir);
segments whose records are all below the head are deleted. A torn record at the end of the
last segment (power cut mid-append) fails its length or CRC check and is truncated on open:
it was never acknowledged as appended, so nothing acknowledged is lost.

Bounds: ``max_bytes`` (payload + header bytes of live records) and/or ``max_records``. An
append that would exceed them evicts the oldest live records first; each eviction is counted
(``evicted``, persisted in the cursor so the total survives restarts) and logged as a warning
with the count: loss is never silent. A record already handed to :meth:`peek` and then
evicted before its :meth:`ack` is still counted as lost even if Kafka later takes it: the
count may overstate loss, never understate it. Disk use is at most the bound plus one
segment (segments are deleted whole).

Not thread-safe: one owner (the collector's event loop) appends, peeks and acks.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from vitalproof.durable import fsync_dir, write_atomic
from vitalproof.errors import VitalproofError

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<IIQ")  # payload length, crc32(index || payload), index
_SEG_PREFIX = "seg-"
_SEG_SUFFIX = ".log"
_CURSOR = "cursor.json"
MAX_RECORD_BYTES = 16 << 20


class DiskBufferError(VitalproofError):
    """The buffer directory is unusable (not a corrupt tail: that is repaired silently)."""


@dataclass(frozen=True, slots=True)
class BufferedRecord:
    index: int
    payload: bytes


@dataclass(slots=True)
class _Seg:
    first: int
    path: Path
    last: int  # index of the last record in it; first - 1 when empty
    size: int = 0  # bytes in the file


@dataclass(slots=True)
class _Loc:
    index: int
    seg: _Seg
    offset: int  # of the payload
    size: int  # payload bytes


def _crc(index: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(index.to_bytes(8, "little")))


class DiskBuffer:
    """FIFO of byte records on disk; see the module docstring for the guarantees."""

    def __init__(
        self,
        directory: Path | str,
        *,
        max_bytes: int | None = 64 << 20,
        max_records: int | None = None,
        segment_bytes: int = 1 << 20,
    ) -> None:
        if max_bytes is None and max_records is None:
            raise ValueError("a disk buffer needs a bound: max_bytes and/or max_records")
        if (max_bytes is not None and max_bytes <= 0) or (
            max_records is not None and max_records <= 0
        ):
            raise ValueError("bounds must be positive")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.max_records = max_records
        self.segment_bytes = segment_bytes
        self.evicted = 0
        """Records dropped by the bound since the buffer was first created (persisted)."""
        self.evicted_this_session = 0
        self._head = 0
        self._tail = 0  # next index to assign
        self._live: deque[_Loc] = deque()
        self._live_bytes = 0
        self._segs: list[_Seg] = []
        self._open()

    # -- properties -------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._live)

    @property
    def nbytes(self) -> int:
        """Bytes the live records take on disk (headers included): what the bound limits."""
        return self._live_bytes

    @property
    def head(self) -> int:
        return self._head

    @property
    def tail(self) -> int:
        return self._tail

    # -- recovery ---------------------------------------------------------------------

    def _open(self) -> None:
        cursor = self.directory / _CURSOR
        if cursor.exists():
            try:
                doc = json.loads(cursor.read_text())
                self._head = int(doc["head"])
                self.evicted = int(doc.get("evicted", 0))
            except (ValueError, KeyError, TypeError) as e:
                raise DiskBufferError(f"{cursor}: unreadable cursor: {e}") from e
        paths = sorted(self.directory.glob(f"{_SEG_PREFIX}*{_SEG_SUFFIX}"))
        expected: int | None = None
        for n, path in enumerate(paths):
            first = int(path.name[len(_SEG_PREFIX) : -len(_SEG_SUFFIX)])
            if expected is not None and first != expected:
                raise DiskBufferError(f"{path}: segment starts at {first}, expected {expected}")
            seg = _Seg(first, path, first - 1)
            self._scan(seg, is_last=n == len(paths) - 1)
            self._segs.append(seg)
            expected = seg.last + 1
        self._tail = max(self._head, expected if expected is not None else 0)
        self._drop_dead_segments()

    def _scan(self, seg: _Seg, *, is_last: bool) -> None:
        data = seg.path.read_bytes()
        pos, index = 0, seg.first
        while pos < len(data):
            ok = pos + _HEADER.size <= len(data)
            if ok:
                size, crc, idx = _HEADER.unpack_from(data, pos)
                end = pos + _HEADER.size + size
                payload = data[pos + _HEADER.size : end]
                ok = idx == index and end <= len(data) and _crc(idx, payload) == crc
            if not ok:
                if not is_last:
                    raise DiskBufferError(f"{seg.path}: corrupt record at byte {pos}")
                log.warning("disk buffer: truncating torn record at %s byte %d", seg.path, pos)
                with open(seg.path, "r+b") as f:
                    f.truncate(pos)
                    os.fsync(f.fileno())
                break
            if index >= self._head:
                self._live.append(_Loc(index, seg, pos + _HEADER.size, size))
                self._live_bytes += _HEADER.size + size
            seg.last = index
            seg.size = end
            index += 1
            pos = end

    # -- appending --------------------------------------------------------------------

    def append(self, payload: bytes) -> int:
        """Append one record durably (fsync'd before returning); returns its index."""
        return self.append_many([payload])[0]

    def append_many(self, payloads: Iterable[bytes]) -> list[int]:
        """Append a group with one fsync: all are durable when this returns.

        Returns the indexes of the records stored: one per payload, except when the group
        alone exceeds the bound, in which case only its newest records are stored (the
        others are counted in ``evicted``) and the indexes are theirs.
        """
        items = [bytes(p) for p in payloads]
        for p in items:
            if len(p) > MAX_RECORD_BYTES:
                raise ValueError(f"record of {len(p)} bytes exceeds {MAX_RECORD_BYTES}")
        self._make_room(items)
        indexes: list[int] = []
        f: BinaryIO | None = None
        for p in items:
            seg = self._writable_segment(_HEADER.size + len(p))
            if f is None or f.name != str(seg.path):
                if f is not None:
                    f.flush()
                    os.fsync(f.fileno())
                    f.close()
                f = open(seg.path, "ab")  # noqa: SIM115 - closed below, spans the loop
            offset = seg.size
            index = self._tail
            f.write(_HEADER.pack(len(p), _crc(index, p), index) + p)
            seg.size += _HEADER.size + len(p)
            self._live.append(_Loc(index, seg, offset + _HEADER.size, len(p)))
            self._live_bytes += _HEADER.size + len(p)
            seg.last = index
            self._tail += 1
            indexes.append(index)
        if f is not None:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        return indexes

    def _writable_segment(self, need: int) -> _Seg:
        seg = self._segs[-1] if self._segs else None
        if seg is None or (seg.last >= seg.first and seg.size + need > self.segment_bytes):
            path = self.directory / f"{_SEG_PREFIX}{self._tail:020d}{_SEG_SUFFIX}"
            path.touch()
            fsync_dir(self.directory)
            seg = _Seg(self._tail, path, self._tail - 1)
            self._segs.append(seg)
        return seg

    def _make_room(self, items: list[bytes]) -> None:
        """Evict the oldest live records so that ``items`` fit the bounds (counted, logged)."""
        dropped = 0
        for p in items:
            if self.max_bytes is not None and _HEADER.size + len(p) > self.max_bytes:
                raise ValueError(f"a record of {len(p)} bytes can never fit max_bytes")
        # A group larger than the bound keeps its newest records; the rest are evicted
        # before they are ever written (counted like any other eviction).
        while (self.max_records is not None and len(items) > self.max_records) or (
            self.max_bytes is not None
            and sum(_HEADER.size + len(p) for p in items) > self.max_bytes
        ):
            items.pop(0)
            dropped += 1
        add_bytes = sum(_HEADER.size + len(p) for p in items)
        add_records = len(items)
        while self._live and (
            (self.max_records is not None and len(self._live) + add_records > self.max_records)
            or (self.max_bytes is not None and self._live_bytes + add_bytes > self.max_bytes)
        ):
            loc = self._live.popleft()
            self._live_bytes -= _HEADER.size + loc.size
            dropped += 1
        if dropped:
            self._head = self._live[0].index if self._live else self._tail
            self.evicted += dropped
            self.evicted_this_session += dropped
            self._write_cursor()
            self._drop_dead_segments()
            log.warning(
                "disk buffer full (%s): evicted the %d oldest record(s); %d evicted in total",
                self._bounds_text(), dropped, self.evicted,
            )  # fmt: skip

    def _bounds_text(self) -> str:
        parts = []
        if self.max_bytes is not None:
            parts.append(f"max_bytes={self.max_bytes}")
        if self.max_records is not None:
            parts.append(f"max_records={self.max_records}")
        return ", ".join(parts)

    # -- draining ---------------------------------------------------------------------

    def peek(self, max_records: int = 500, max_bytes: int = 4 << 20) -> list[BufferedRecord]:
        """The oldest live records, in order, without removing them (at least one if any)."""
        out: list[BufferedRecord] = []
        total = 0
        handles: dict[Path, BinaryIO] = {}
        try:
            for loc in self._live:
                if len(out) >= max_records or (out and total + loc.size > max_bytes):
                    break
                f = handles.get(loc.seg.path)
                if f is None:
                    f = handles[loc.seg.path] = open(loc.seg.path, "rb")  # noqa: SIM115
                f.seek(loc.offset)
                out.append(BufferedRecord(loc.index, f.read(loc.size)))
                total += loc.size
        finally:
            for f in handles.values():
                f.close()
        return out

    def ack(self, index: int) -> int:
        """Kafka took every record up to ``index``: forget them. Returns how many left."""
        removed = 0
        while self._live and self._live[0].index <= index:
            loc = self._live.popleft()
            self._live_bytes -= _HEADER.size + loc.size
            removed += 1
        new_head = (
            self._live[0].index if self._live else max(self._head, min(index + 1, self._tail))
        )
        if new_head != self._head:
            self._head = new_head
            self._write_cursor()
            self._drop_dead_segments()
        return removed

    # -- housekeeping -----------------------------------------------------------------

    def _write_cursor(self) -> None:
        cursor = {"head": self._head, "evicted": self.evicted}
        write_atomic(self.directory / _CURSOR, json.dumps(cursor).encode())

    def _drop_dead_segments(self) -> None:
        """Delete segments entirely below the head, except the one we append to."""
        while len(self._segs) > 1 and self._segs[0].last < self._head:
            seg = self._segs.pop(0)
            seg.path.unlink(missing_ok=True)
        if self._segs and not self._live and self._segs[0].last < self._head:
            # Everything was acked: start the next append in a fresh segment.
            seg = self._segs.pop(0)
            seg.path.unlink(missing_ok=True)
