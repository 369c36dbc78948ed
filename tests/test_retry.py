"""The backoff and outage policy the collector, the anchor job and the seal process share
(vitalproof.retry): pure logic, a fake clock."""

from __future__ import annotations

import errno
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vitalproof.retry import Backoff, Outage, RepeatFilter, disk_full
from vitalproof.settings import RuntimeSettings


def test_backoff_doubles_from_min_to_max_and_starts_again_after_a_success() -> None:
    b = Backoff(min_s=1.0, max_s=30.0)
    assert [b.failed() for _ in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]
    b.succeeded()
    assert b.failed() == 1.0


@given(
    lo=st.floats(0.01, 10),
    span=st.floats(1, 100),
    factor=st.floats(1, 4),
    n=st.integers(0, 2000),
    jitter=st.floats(0, 1),
    r=st.floats(0, 1, exclude_max=True),
)
def test_backoff_is_bounded_and_never_shrinks_without_jitter(
    lo: float, span: float, factor: float, n: int, jitter: float, r: float
) -> None:
    b = Backoff(min_s=lo, max_s=lo * span, factor=factor)
    delays = [b.failed() for _ in range(n)]
    assert all(lo <= d <= lo * span for d in delays)
    assert delays == sorted(delays)  # never shrinks while failing
    j = Backoff(min_s=lo, max_s=lo * span, factor=factor, jitter=jitter, rand=lambda: r)
    for d in delays[:50]:
        assert d * (1 - jitter) - 1e-9 <= j.failed() <= d + 1e-9


def test_backoff_refuses_nonsense_and_reads_the_settings() -> None:
    with pytest.raises(ValueError):
        Backoff(min_s=0)
    with pytest.raises(ValueError):
        Backoff(min_s=5, max_s=1)
    b = Backoff.from_settings(RuntimeSettings(retry_min_s=0.5, retry_max_s=0.1))
    assert (b.min_s, b.max_s) == (0.5, 0.5)
    assert Backoff.from_settings(RuntimeSettings()).max_s == 30.0


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_an_outage_logs_one_line_when_it_starts_and_one_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    outage = Outage(
        "Kafka",
        "at 127.0.0.1:1",
        lambda e: "unreachable" if isinstance(e, ConnectionError) else None,
        backoff=Backoff(min_s=1, max_s=4),
        clock=clock,
    )
    assert outage.status() == {"state": "ok", "where": "at 127.0.0.1:1", "outages": 0}
    with caplog.at_level(logging.INFO, logger="vitalproof.retry"):
        delays = []
        for _ in range(5):
            delays.append(outage.failed(ConnectionError("refused")))
            clock.t += delays[-1]
        assert delays == [1, 2, 4, 4, 4]
        assert outage.down
        status = outage.status()
        assert status["state"] == "waiting" and status["tries"] == 5
        assert status["down_s"] == 15.0 and status["reason"] == "unreachable"
        outage.succeeded()
        outage.succeeded()  # still up: nothing more to say
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "Kafka at 127.0.0.1:1: unreachable; retrying with backoff" in lines[0]
    assert "back after 5 tries, 15.0 s" in lines[1]
    assert not outage.down and outage.outages == 1
    assert outage.failed(ConnectionError()) == 1  # the backoff starts again


def test_an_error_the_policy_declines_is_raised_again_and_changes_nothing() -> None:
    outage = Outage("chain", "at http://x", lambda e: None)
    with pytest.raises(KeyError):
        outage.failed(KeyError("a bug, not an outage"))
    assert not outage.down and outage.tries == 0


def test_the_disk_full_policy_knows_enospc_in_its_several_shapes() -> None:
    assert disk_full(OSError(errno.ENOSPC, "No space left on device", "/lake/x.parquet")) == (
        "disk full writing /lake/x.parquet ([Errno 28] No space left on device)"
    )
    # pyarrow's OSError has no errno, only the text
    assert disk_full(OSError("Error writing bytes to file. Detail: [errno 28] No space left"))
    assert disk_full(OSError(errno.EACCES, "Permission denied")) is None
    assert disk_full(ValueError("No space left on device")) is None


def test_the_repeat_filter_lets_one_of_each_message_through_per_interval() -> None:
    clock = Clock()
    quiet = RepeatFilter(every_s=30, clock=clock)

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("aiokafka", logging.ERROR, "x", 1, msg, ("n1",), None)

    passed = [quiet.filter(record("Unable connect to node %s")) for _ in range(1000)]
    assert passed.count(True) == 1
    assert quiet.filter(record("Unable to update metadata from %s"))  # another message
    clock.t += 31
    again = record("Unable connect to node %s")
    assert quiet.filter(again)
    assert again.getMessage() == "Unable connect to node n1 (999 more like it in the last 30 s)"
