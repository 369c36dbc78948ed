"""An immutable sorted run of 16-byte reading-id digests with a bucket index, in numpy arrays.

16 bytes per id instead of a Python ``str`` in a ``set`` (~150-250 bytes with its entry).
Why a bucket index and not ``np.searchsorted``: a binary search over millions of random
keys costs ~20 cache misses per key (measured ~2 us per id over 12M ids). Digests are
uniform, so the top bits of a digest's first word say where it must sit in the sorted run:
one lookup in ``starts`` and one gather of a small block, ~2 cache misses per id. Buckets
hold 4 ids on average; the rare bucket longer than the gathered block falls back to a
comparison over the whole bucket, so membership is always exact on all 16 bytes (a false
"seen" would drop a genuine reading).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

ID_BYTES = 16
BLOCK = 8
"""Slots compared per key in one gather; a bucket longer than this is checked in full."""
IDS_PER_BUCKET = 2
"""Average bucket length at the largest: a bucket overflows BLOCK for ~2e-4 of keys."""

U64 = npt.NDArray[np.uint64]
Bools = npt.NDArray[np.bool_]
_OFFSETS = np.arange(BLOCK, dtype=np.intp)


def split(packed: bytes | bytearray | memoryview) -> tuple[U64, U64]:
    """Packed 16-byte digests as (first word, second word) arrays; no copy."""
    if len(packed) % ID_BYTES:
        raise ValueError(f"{len(packed)} bytes are not whole {ID_BYTES}-byte ids")
    words = np.frombuffer(packed, dtype="<u8").reshape(-1, 2)
    return words[:, 0], words[:, 1]


class DigestRun:
    """Sorted (by first word) digests with ``starts[b]``: where bucket ``b`` begins."""

    __slots__ = ("_bounds", "_longest", "_n", "_shift", "_starts", "hi", "lo")

    def __init__(self, hi: U64, lo: U64) -> None:
        """``hi``/``lo`` in any order (they are sorted here)."""
        n = len(hi)
        order = np.argsort(hi, kind="stable")  # timsort: sorted runs of input merge in O(n)
        # BLOCK slots of padding: a gather from the last bucket never leaves the array.
        self.hi: U64 = np.zeros(n + BLOCK, dtype=np.uint64)
        self.lo: U64 = np.zeros(n + BLOCK, dtype=np.uint64)
        np.take(hi, order, out=self.hi[:n], mode="clip")  # "raise" would buffer the output
        np.take(lo, order, out=self.lo[:n], mode="clip")
        self._n = n
        bits = max(1, (max(1, n // IDS_PER_BUCKET) - 1).bit_length())
        self._shift = np.uint64(64 - bits)
        counts = np.bincount(_buckets(self.hi[:n], self._shift), minlength=1 << bits)
        starts = np.zeros(len(counts) + 1, dtype=np.uint32 if n < 2**32 else np.int64)
        np.cumsum(counts, out=starts[1:])
        self._starts = starts
        self._longest = int(counts.max(initial=0))
        # (start, end) of every bucket as one (buckets, 2) view: one gather per lookup
        self._bounds = np.lib.stride_tricks.as_strided(
            starts, shape=(len(counts), 2), strides=(starts.itemsize, starts.itemsize)
        )

    @classmethod
    def merged(cls, runs: list[DigestRun]) -> DigestRun:
        return cls(
            np.concatenate([r.hi[: r._n] for r in runs]),
            np.concatenate([r.lo[: r._n] for r in runs]),
        )

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        return int(self.hi.nbytes + self.lo.nbytes + self._starts.nbytes)

    def contains(self, hi: U64, lo: U64) -> Bools:
        """For each query digest, whether this run holds it (exactly, all 16 bytes).

        The common answer (no) costs one gather of ``BLOCK`` first words per key, with no
        bucket bounds: an equal first word can only sit in the key's own bucket. Bounds
        and second words are looked at only where a first word matched.
        """
        if self._n == 0 or len(hi) == 0:
            return np.zeros(len(hi), dtype=np.bool_)
        bucket = _buckets(hi, self._shift)
        idx = np.add(self._starts[bucket][:, None], _OFFSETS)  # uint32 + intp: intp
        same = self.hi[idx] == hi[:, None]
        candidate = same.any(axis=1)
        hit = np.zeros(len(hi), dtype=np.bool_)
        if candidate.any():
            rows = np.flatnonzero(candidate)
            length = self._bounds[bucket[rows]].astype(np.intp) @ np.array([-1, 1])
            within = length[:, None] > _OFFSETS  # the padding is zeros: a real 0 may match
            hit[rows] = (same[rows] & within & (self.lo[idx[rows]] == lo[rows, None])).any(1)
        if self._longest > BLOCK:  # a bucket longer than the block: exact, not fast
            bounds = self._bounds[bucket].astype(np.intp)
            for i in np.flatnonzero(bounds[:, 1] - bounds[:, 0] > BLOCK):
                s, e = bounds[i]
                hit[i] = bool(np.any((self.hi[s:e] == hi[i]) & (self.lo[s:e] == lo[i])))
        return hit


def _buckets(hi: U64, shift: np.uint64) -> npt.NDArray[np.int64]:
    """Bucket numbers (top bits) as indices; a view, as ``astype`` is ~8x slower here."""
    return (hi >> shift).view(np.int64)
