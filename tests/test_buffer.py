"""ingest.buffer.DiskBuffer: FIFO, bounded, durable across reopen, loss counted."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.buffer import DiskBuffer, DiskBufferError


def payloads(buf: DiskBuffer, n: int = 10_000) -> list[bytes]:
    return [r.payload for r in buf.peek(max_records=n, max_bytes=1 << 30)]


def test_fifo_ack_and_reopen(tmp_path: Path) -> None:
    buf = DiskBuffer(tmp_path, max_records=100, segment_bytes=64)
    idx = buf.append_many([b"a", b"b", b"c"])
    assert idx == [0, 1, 2]
    assert buf.append(b"d") == 3
    assert payloads(buf) == [b"a", b"b", b"c", b"d"]
    assert buf.ack(1) == 2
    assert payloads(buf) == [b"c", b"d"]
    reopened = DiskBuffer(tmp_path, max_records=100, segment_bytes=64)
    assert payloads(reopened) == [b"c", b"d"]
    assert reopened.append(b"e") == 4  # indexes continue, never reused
    reopened.ack(4)
    assert len(reopened) == 0
    again = DiskBuffer(tmp_path, max_records=100, segment_bytes=64)
    assert len(again) == 0 and again.append(b"f") == 5


def test_acked_segments_are_deleted(tmp_path: Path) -> None:
    buf = DiskBuffer(tmp_path, max_records=1000, segment_bytes=100)
    buf.append_many([bytes(40)] * 10)  # 56 bytes each on disk: one per segment
    assert len(list(tmp_path.glob("seg-*.log"))) == 10
    buf.ack(8)
    assert len(list(tmp_path.glob("seg-*.log"))) == 1


def test_bound_by_records_evicts_oldest_counts_and_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    buf = DiskBuffer(tmp_path, max_bytes=None, max_records=5, segment_bytes=64)
    buf.append_many([b"%d" % i for i in range(5)])
    with caplog.at_level(logging.WARNING, logger="ingest.buffer"):
        buf.append_many([b"5", b"6"])
    assert payloads(buf) == [b"2", b"3", b"4", b"5", b"6"]
    assert buf.evicted == 2
    assert any("evicted the 2 oldest" in r.getMessage() for r in caplog.records)
    reopened = DiskBuffer(tmp_path, max_bytes=None, max_records=5)
    assert reopened.evicted == 2  # the loss count survives restarts
    assert payloads(reopened) == [b"2", b"3", b"4", b"5", b"6"]


def test_bound_by_bytes(tmp_path: Path) -> None:
    buf = DiskBuffer(tmp_path, max_bytes=3 * (16 + 10), segment_bytes=1000)
    for i in range(5):
        buf.append(bytes([i]) * 10)
    assert [p[0] for p in payloads(buf)] == [2, 3, 4]
    assert buf.nbytes <= 3 * 26 and buf.evicted == 2


def test_group_larger_than_the_bound_keeps_its_newest_and_counts_the_rest(
    tmp_path: Path,
) -> None:
    buf = DiskBuffer(tmp_path, max_bytes=None, max_records=2)
    buf.append(b"0")
    assert buf.append_many([b"1", b"2", b"3"]) == [1, 2]
    assert payloads(buf) == [b"2", b"3"] and buf.evicted == 2
    with pytest.raises(ValueError):  # can never fit: refused loudly, nothing evicted
        DiskBuffer(tmp_path / "b", max_bytes=20).append(bytes(10))
    with pytest.raises(ValueError):
        DiskBuffer(tmp_path / "x", max_bytes=None, max_records=None)


def test_torn_tail_is_truncated_and_appends_continue(tmp_path: Path) -> None:
    buf = DiskBuffer(tmp_path, max_records=100)
    buf.append_many([b"one", b"two"])
    seg = sorted(tmp_path.glob("seg-*.log"))[-1]
    with open(seg, "ab") as f:
        f.write(b"\x05\x00\x00\x00garb")  # half a header: a crash mid-append
    reopened = DiskBuffer(tmp_path, max_records=100)
    assert payloads(reopened) == [b"one", b"two"]
    assert reopened.append(b"three") == 2
    assert payloads(DiskBuffer(tmp_path, max_records=100)) == [b"one", b"two", b"three"]


def test_corruption_before_the_tail_is_an_error(tmp_path: Path) -> None:
    buf = DiskBuffer(tmp_path, max_records=100, segment_bytes=30)
    buf.append_many([b"x" * 10, b"y" * 10, b"z" * 10])
    first = sorted(tmp_path.glob("seg-*.log"))[0]
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(DiskBufferError):
        DiskBuffer(tmp_path, max_records=100, segment_bytes=30)


# One step of a session: append a group, ack some of what is live, or reopen (restart).
_step = st.one_of(
    st.tuples(st.just("append"), st.lists(st.binary(max_size=40), min_size=1, max_size=5)),
    st.tuples(st.just("ack"), st.integers(min_value=0, max_value=6)),
    st.tuples(st.just("reopen"), st.none()),
)


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(_step, max_size=40), max_records=st.integers(min_value=3, max_value=12))
def test_fifo_across_restarts_matches_a_model(
    steps: list[tuple[str, object]], max_records: int
) -> None:
    """Whatever the interleaving of appends, acks and restarts, the buffer holds exactly
    the newest un-acked records in append order, and evicted + acked + live = appended."""
    with tempfile.TemporaryDirectory() as d:
        buf = DiskBuffer(d, max_bytes=None, max_records=max_records, segment_bytes=80)
        model: list[tuple[int, bytes]] = []
        appended = acked = 0
        for kind, arg in steps:
            if kind == "append":
                assert isinstance(arg, list)
                idx = buf.append_many(arg)
                assert len(idx) == min(len(arg), max_records)
                model.extend(zip(idx, arg[len(arg) - len(idx) :], strict=True))
                appended += len(arg)
                model = model[-max_records:]
            elif kind == "ack":
                assert isinstance(arg, int)
                if model:
                    upto = model[min(arg, len(model) - 1)][0]
                    n = buf.ack(upto)
                    acked += n
                    model = [m for m in model if m[0] > upto]
            else:
                buf = DiskBuffer(d, max_bytes=None, max_records=max_records, segment_bytes=80)
            got = [(r.index, r.payload) for r in buf.peek(max_records=1000, max_bytes=1 << 30)]
            assert got == model
            assert buf.evicted + acked + len(buf) == appended
