"""Windowed deduplication by reading id, without Kafka: drops, changelog records, expiry,
and the state rebuilt from the changelog after a restart."""

from __future__ import annotations

import json

import pytest

from streams import dedupe
from streams.dedupe import ChangelogError, DedupeWindows, Record
from streams.normalize import normalize
from vitalproof.raw import RawRecord
from vitalproof.registry import Device, DeviceStatus
from vitalproof.schema import CONTENT_TYPE_JSON, SampleBatch, Transport

MIN = 60 * 1_000_000
T0 = 1_800_000_000_000_000 // MIN * MIN  # a window boundary
DEVICES = {"dev-1": Device("dev-1", "pat-1", DeviceStatus.ACTIVE, 0)}


def batch(seqs: list[int], received_us: int, metric: str = "heart_rate") -> SampleBatch:
    doc = {
        "schema": 1,
        "series": [
            {
                "metric": metric,
                "unit": "/min" if metric == "heart_rate" else "%",
                "t": [T0 + s * 1_000_000 for s in seqs],
                "seq": seqs,
                "v": [70 + s % 5 for s in seqs],
            }
        ],
    }
    rec = RawRecord(
        "dev-1",
        json.dumps(doc).encode(),
        CONTENT_TYPE_JSON,
        Transport.MQTT,
        "gw-1",
        received_us,
        "devices/dev-1/vitals",
    )
    out = normalize(rec, DEVICES.get)
    assert isinstance(out, SampleBatch)
    return out


def replay(records: list[Record], **kw: int) -> DedupeWindows:
    d = DedupeWindows(window_us=MIN, **kw)
    d.load(records)
    return d


def test_drops_retransmissions_whole_and_partial_and_within_one_message():
    d = DedupeWindows(window_us=MIN)
    assert d.drop_seen(batch([0, 1, 2], T0), "0:0") == 0
    again = batch([0, 1, 2], T0 + 5_000_000)
    assert d.drop_seen(again, "0:1") == 3 and len(again) == 0
    partial = batch([2, 3, 3, 4], T0 + 6_000_000)
    assert d.drop_seen(partial, "0:2") == 2
    assert partial.seq == [3, 4] and len(partial.reading_id) == 2
    assert d.dropped == 5 and len(d) == 5


def test_one_changelog_record_per_message_with_packed_ids():
    d = DedupeWindows(window_us=MIN)
    dup = batch(list(range(100)), T0 + 2)
    d.drop_seen(batch(list(range(100)), T0 + 1), "3:41")
    d.drain()
    d.drop_seen(dup, "3:42")  # nothing new: nothing to write, no key taken
    b = batch(list(range(100, 200)), T0 + 3)
    d.drop_seen(b, "3:43")
    records = d.drain()
    assert records == [(f"{T0 // MIN}/3:43".encode(), bytes.fromhex("".join(b.reading_id)))]
    assert len(records[0][1]) == 16 * 100
    assert d.drain() == []


def test_one_changelog_record_per_window_and_partition_per_drain():
    d = DedupeWindows(window_us=MIN)
    w = T0 // MIN
    b1, b2 = batch([0, 1], T0 + 1), batch([2, 3], T0 + 2)
    b3, b4 = batch([4], T0 + MIN), batch([5, 6], T0 + 3)
    d.drop_seen(b1, "0:10")
    d.drop_seen(b3, "0:11")  # the next window
    d.drop_seen(b2, "1:7")  # another partition
    d.drop_seen(b4, "0:12")
    packed = {i: bytes.fromhex("".join(b.reading_id)) for i, b in enumerate([b1, b2, b3, b4])}
    assert sorted(d.drain()) == sorted(
        [
            (f"{w}/0:10".encode(), packed[0] + packed[3]),  # in record order
            (f"{w + 1}/0:11".encode(), packed[2]),
            (f"{w}/1:7".encode(), packed[1]),
        ]
    )
    assert d.drain() == []
    b5 = batch([7], T0 + 4)  # the next take: a key of its own
    d.drop_seen(b5, "0:13")
    assert d.drain() == [(f"{w}/0:13".encode(), bytes.fromhex(b5.reading_id[0]))]


def test_a_take_replayed_after_a_crash_rewrites_its_key_whatever_its_cut():
    # The crashed run: take A (offsets 0-1) written, take B (2-4) lost with the crash.
    w = T0 // MIN
    batches = [batch([2 * i, 2 * i + 1], T0 + i) for i in range(5)]
    packed = [bytes.fromhex("".join(b.reading_id)) for b in batches]
    d = DedupeWindows(window_us=MIN)
    for i in range(2):
        d.drop_seen(batches[i], f"0:{i}")
    take_a = d.drain()
    for i in range(2, 5):
        d.drop_seen(batches[i], f"0:{i}")
    take_b = d.drain()
    assert take_b == [(f"{w}/0:2".encode(), b"".join(packed[2:]))]
    # Replayed from the committed offset 0, cut otherwise: A's ids are known and dropped,
    # B's first record with new ids gives B's key.
    again = [batch([2 * i, 2 * i + 1], T0 + i) for i in range(5)]
    r = replay(take_a)
    for i in range(4):
        r.drop_seen(again[i], f"0:{i}")
    first = r.drain()
    assert first == [(f"{w}/0:2".encode(), b"".join(packed[2:4]))]  # same key, fewer ids
    r.drop_seen(again[4], "0:4")
    second = r.drain()
    assert second == [(f"{w}/0:4".encode(), packed[4])]
    # Whatever the raced write of B did, the compacted changelog holds every id once more.
    for log in (take_a + first + second, take_a + take_b + first + second):
        after = replay(log)
        assert len(after) == 10 and all(
            after.drop_seen(batch([2 * i, 2 * i + 1], T0 + 9), f"0:{9 + i}") == 2 for i in range(5)
        )


def test_restart_rebuilds_the_ids_from_the_changelog():
    d = DedupeWindows(window_us=MIN)
    d.drop_seen(batch([0, 1, 2], T0), "0:0")
    d.drop_seen(batch([3, 4], T0 + MIN), "0:1")
    after = replay(d.drain())
    assert len(after) == 5 and after.windows == [T0 // MIN, T0 // MIN + 1]
    late = batch([1, 4, 5], T0 + MIN + 1)
    assert after.drop_seen(late, "0:2") == 2 and late.seq == [5]


def test_the_same_raw_record_again_rewrites_its_key_and_never_double_counts():
    d = DedupeWindows(window_us=MIN)
    d.drop_seen(batch([0, 1], T0), "0:7")
    first = d.drain()
    # a replay after a crash whose changelog write was lost: a fresh memory, same record
    d2 = DedupeWindows(window_us=MIN)
    d2.drop_seen(batch([0, 1], T0), "0:7")
    assert d2.drain() == first
    both = replay(first + first)
    assert len(both) == 2


def test_old_windows_expire_with_tombstones_and_memory_stays_bounded():
    d = DedupeWindows(window_us=MIN, retain=3)
    sizes = []
    for minute in range(50):
        d.drop_seen(batch(list(range(minute * 60, minute * 60 + 60)), T0 + minute * MIN), "0:0")
        sizes.append(len(d))
    assert max(sizes) == 3 * 60  # never more than `retain` windows of ids
    assert d.windows == [T0 // MIN + 47, T0 // MIN + 48, T0 // MIN + 49]
    records = d.drain()
    tombstones = [k for k, v in records if v is None]
    assert len(tombstones) == 47
    # replaying the changelog (tombstones included) holds only the live windows
    after = replay(records, retain=3)
    assert len(after) == 180 and after.windows == d.windows
    # an expired reading is no longer known to normalize (the sealer's memory is the net)
    old = batch([0, 1], T0 + 50 * MIN)
    assert d.drop_seen(old, "0:99") == 0


def test_a_replay_expires_windows_that_aged_while_the_worker_was_down():
    d = DedupeWindows(window_us=MIN, retain=100)
    d.drop_seen(batch([0], T0), "0:0")
    d.drop_seen(batch([1], T0 + 10 * MIN), "0:1")
    after = replay(d.drain(), retain=5)
    assert after.windows == [T0 // MIN + 10]
    assert after.drain() == [(f"{T0 // MIN}/0:0".encode(), None)]


def test_a_foreign_changelog_record_is_a_clear_error():
    with pytest.raises(ChangelogError, match="not <window>/<partition>:<offset>"):
        replay([(b"garbage", b"\x00" * 16)])
    with pytest.raises(ChangelogError, match="16-byte"):
        replay([(b"1/0:0", b"\x00" * 15)])


def test_keys_written_per_message_before_still_load():
    d = DedupeWindows(window_us=MIN)
    b = batch([0, 1], T0)
    d.load([(f"{T0 // MIN}/0:7/dev-1".encode(), bytes.fromhex("".join(b.reading_id)))])
    assert len(d) == 2 and d.drop_seen(batch([0, 1], T0 + 1), "0:8") == 2


def test_a_record_is_cut_before_it_outgrows_record_bytes(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(dedupe, "RECORD_BYTES", 5 * 16)  # five ids
    d = DedupeWindows(window_us=MIN)
    batches = [batch([2 * i, 2 * i + 1], T0 + i) for i in range(4)]
    for i, b in enumerate(batches):
        d.drop_seen(b, f"0:{i}")
    packed = [bytes.fromhex("".join(b.reading_id)) for b in batches]
    w = T0 // MIN
    assert d.drain() == [
        (f"{w}/0:0".encode(), packed[0] + packed[1]),
        (f"{w}/0:2".encode(), packed[2] + packed[3]),
    ]
