"""Sequence gaps and resets: lost readings and reboots become events, reordering does not."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from streams.sequence import SequenceTracker
from vitalproof.schema import SampleBatch


def batch(seqs: list[int], t0: int = 1_000, device: str = "d1") -> SampleBatch:
    b = SampleBatch(device_id=device, patient_id="p1", receive_time_us=5)
    for i, s in enumerate(seqs):
        b.add("heart_rate", "/min", t0 + i, s, 60.0)
    return b


def test_consecutive_messages_raise_nothing():
    tr = SequenceTracker()
    assert tr.observe(batch([0, 1, 2])) == []
    assert tr.observe(batch([3, 4], t0=2_000)) == []
    assert (tr.gaps, tr.missing, tr.resets) == (0, 0, 0)


def test_a_lost_message_is_a_gap_with_its_size():
    tr = SequenceTracker()
    tr.observe(batch([0, 1, 2]))
    (ev,) = tr.observe(batch([6, 7], t0=2_000))
    assert (ev.kind, ev.last_seq, ev.seq, ev.missing) == ("gap", 2, 6, 3)
    assert ev.device_id == "d1" and ev.patient_id == "p1"
    assert b'"kind":"gap"' in ev.to_json()


def test_a_reboot_is_a_reset_and_reordering_is_nothing():
    tr = SequenceTracker()
    tr.observe(batch([10, 11], t0=1_000))
    assert tr.observe(batch([8, 9], t0=500)) == []  # late and older: reordering
    (ev,) = tr.observe(batch([0, 1], t0=9_000))  # lower seq, later time: reboot
    assert (ev.kind, ev.last_seq, ev.seq) == ("reset", 11, 0)
    assert tr.observe(batch([2, 3], t0=9_100)) == []


def test_devices_are_tracked_separately():
    tr = SequenceTracker()
    tr.observe(batch([0], device="a"))
    tr.observe(batch([0], device="b"))
    assert tr.observe(batch([1], device="a", t0=2_000)) == []
    assert [e.kind for e in tr.observe(batch([5], device="b", t0=2_000))] == ["gap"]


@given(st.lists(st.integers(1, 20), min_size=1, max_size=40), st.sets(st.integers(0, 39)))
def test_missing_counts_exactly_the_dropped_messages_before_the_last(
    sizes: list[int], dropped: set[int]
) -> None:
    """Messages of consecutive numbers, some dropped: the gaps add up to what was lost
    (except drops at the very end, which nothing after them can reveal)."""
    tr = SequenceTracker()
    seq = t = lost = 0
    delivered = [i for i in range(len(sizes)) if i not in dropped]
    last_delivered = delivered[-1] if delivered else -1
    for i, n in enumerate(sizes):
        seqs = list(range(seq, seq + n))
        seq += n
        if i in dropped:
            if delivered and delivered[0] < i < last_delivered:
                lost += n
            continue
        tr.observe(batch(seqs, t0=t))
        t += 1_000
    assert tr.missing == lost
    assert tr.resets == 0
