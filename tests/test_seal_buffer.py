"""When a batch is due: rows, records or age, whatever size the records are."""

from __future__ import annotations

from streams.seal_buffer import SealBuffer


def buf(**kw: float) -> SealBuffer[int]:
    opts = {"max_rows": 100, "max_records": 5, "max_age_s": 2.0} | kw
    return SealBuffer(
        max_rows=int(opts["max_rows"]),
        max_records=int(opts["max_records"]),
        max_age_s=opts["max_age_s"],
        rows_of=lambda n: n,  # an item is its own row count
    )


def test_due_by_rows_and_popped_in_order_up_to_max_rows():
    b = buf()
    b.add([40, 30], now=0.0)
    assert not b.ready(0.1)
    b.add([50, 10], now=0.2)
    assert b.ready(0.2) and b.rows == 130
    assert b.pop_batch() == [40, 30]  # 40 + 30 + 50 would exceed 100
    assert b.pop_batch() == [50, 10] and b.rows == 0 and len(b) == 0


def test_due_by_records_and_by_age_of_the_oldest_record():
    b = buf()
    b.add([1] * 5, now=0.0)
    assert b.ready(0.0) and b.pop_batch() == [1] * 5
    b.add([1], now=10.0)
    b.add([1], now=11.0)
    assert b.seconds_left(11.0) == 1.0 and not b.ready(11.5) and b.ready(12.0)
    assert b.pop_batch() == [1, 1] and b.seconds_left(13.0) is None


def test_the_age_restarts_from_the_oldest_record_left_behind():
    b = buf(max_records=1)
    b.add([1], now=0.0)
    b.add([1], now=1.5)
    assert b.pop_batch() == [1]
    assert b.seconds_left(1.5) == 2.0 and b.ready(3.5)


def test_a_record_bigger_than_a_batch_is_sealed_alone_not_stuck():
    b = buf()
    b.add([500, 1], now=0.0)
    assert b.pop_batch() == [500] and b.pop_batch() == [1]
