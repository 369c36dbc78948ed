"""When the sealer closes a batch: consumed clean records wait here until enough rows or
enough age, independently of how Faust hands them over.

Why not Faust's ``take(n, within)`` alone: it counts *records*, and a record of
``vitals.clean`` is a bundle of anything from one to thousands of samples, so a take sized in
records either seals tiny batches or waits for its timeout every time; and a take never
yields when nothing new arrives, so age alone could not close the last batch. The agent
feeds this buffer; a sealing task polls it on a timer. Pure logic; ``now`` is passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class SealBuffer(Generic[T]):
    def __init__(
        self, *, max_rows: int, max_records: int, max_age_s: float, rows_of: Callable[[T], int]
    ) -> None:
        self.max_rows = max_rows
        self.max_records = max_records
        self.max_age_s = max_age_s
        self.rows_of = rows_of
        self._items: list[T] = []
        self._rows: list[int] = []
        self._arrived: list[float] = []
        self.rows = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, items: Sequence[T], now: float) -> None:
        for item in items:
            n = max(1, self.rows_of(item))
            self._items.append(item)
            self._rows.append(n)
            self._arrived.append(now)
            self.rows += n

    def ready(self, now: float) -> bool:
        """A batch should be sealed now: full by rows or records, or old enough."""
        if not self._items:
            return False
        return (
            self.rows >= self.max_rows
            or len(self._items) >= self.max_records
            or self.age(now) >= self.max_age_s
        )

    def age(self, now: float) -> float:
        """How long the oldest waiting record has waited."""
        return now - self._arrived[0] if self._arrived else 0.0

    def seconds_left(self, now: float) -> float | None:
        """Until the oldest waiting record makes a batch due by age (``None``: empty)."""
        return max(0.0, self.max_age_s - self.age(now)) if self._arrived else None

    def pop_batch(self) -> list[T]:
        """The oldest records, up to ``max_rows`` rows and ``max_records`` records (at least
        one record): consecutive, so each partition's offsets stay contiguous."""
        count = rows = 0
        for n in self._rows:
            if count and (rows + n > self.max_rows or count >= self.max_records):
                break
            count += 1
            rows += n
        out = self._items[:count]
        del self._items[:count], self._rows[:count], self._arrived[:count]
        self.rows -= rows
        return out

    def discard(self, unwanted: Callable[[T], bool]) -> int:
        """Drop the records ``unwanted`` picks (a partition lost to another worker); how
        many were dropped. The others keep their order and arrival times."""
        keep = [i for i, item in enumerate(self._items) if not unwanted(item)]
        dropped = len(self._items) - len(keep)
        if dropped:
            self._items = [self._items[i] for i in keep]
            self._rows = [self._rows[i] for i in keep]
            self._arrived = [self._arrived[i] for i in keep]
            self.rows = sum(self._rows)
        return dropped
