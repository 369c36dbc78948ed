"""A one-byte-per-slot prefilter over the ids in runs: which ids need no run lookup at all.

Each run costs ~2 cache misses per id looked up, and ids are spread over several runs per
window, so at 10M ids looking every id up in every run is the bulk of the dedupe's time.
This table has one byte per slot (4 slots per id of the budget): the tag of the newest
live window with an id in a run whose digest maps to that slot, 0 for none. An id whose
slot is 0 is in no run: one miss instead of two per run. A slot may be set by another id
(~1 in 5 at the full budget): then the runs answer, so the filter never decides "seen".
It is filled when ids are packed into runs, not per message (measured: inserting per
message cost normalize a third of its throughput).

Correct because a slot keeps the *newest* window that set it and windows are dropped
oldest first: when a window goes, its slots are cleared (one scan), and every window that
set one of them before it is gone already.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from streams.digest_run import U64, Bools

SLOTS_PER_ID = 4
MAX_LIVE = 254
"""Live windows must have distinct one-byte tags (0 means empty)."""


class IdFilter:
    def __init__(self, max_ids: int) -> None:
        self._size = np.uint64(SLOTS_PER_ID * max_ids)
        self._slots = np.zeros(int(self._size), dtype=np.uint8)
        self._window_of_tag = np.full(256, np.iinfo(np.int64).min, dtype=np.int64)
        self._tag_of_window: dict[int, int] = {}

    @property
    def nbytes(self) -> int:
        return int(self._slots.nbytes)

    def maybe_held(self, hi: U64) -> Bools:
        """``False``: certainly not held; ``True``: ask the runs."""
        return self._slots[self._slot(hi)] != 0

    def add(self, window: int, hi: U64) -> None:
        tag = self._tag_of_window.get(window)
        if tag is None:
            tag = self._free_tag()
            self._tag_of_window[window] = tag
            self._window_of_tag[tag] = window
        slot = self._slot(hi)
        newer = self._window_of_tag[self._slots[slot]] <= window
        self._slots[slot[newer]] = tag

    def drop(self, window: int) -> None:
        """Forget ``window`` (the oldest held, or older): clear its slots."""
        tag = self._tag_of_window.pop(window, None)
        if tag is not None:
            self._slots[self._slots == tag] = 0
            self._window_of_tag[tag] = np.iinfo(np.int64).min

    def _slot(self, hi: U64) -> npt.NDArray[np.int64]:
        return (hi % self._size).view(np.int64)

    def _free_tag(self) -> int:
        used = set(self._tag_of_window.values())
        for tag in range(1, 256):
            if tag not in used:
                return tag
        raise ValueError(f"more than {MAX_LIVE + 1} live windows")
