"""The binary encoding of vitals.clean: every SampleBatch field round-trips, and a damaged
record is a clear WireFormatError (which the sealer sends to the DLQ)."""

from __future__ import annotations

import dataclasses
import math
import struct

import pytest

from streams.agents import bundle_by_patient
from vitalproof.errors import WireFormatError
from vitalproof.schema import Quality, SampleBatch, Transport
from vitalproof.wire import clean


def normalized() -> SampleBatch:
    b = SampleBatch(device_id="dev-é1")
    t = 1_800_000_000_000_000
    for i in range(5):
        b.add("heart_rate", "/min", t + i * 1_000_000, 40 + i, 60.0 + i)
    b.add("spo2", "%", t, 45, math.nan, int(Quality.INVALID))
    b.add("spo2", "%", t + 1, 46, 97.5, int(Quality.IMPLAUSIBLE | Quality.CLOCK_PAST))
    b.add("heart_rate", "/min", t + 9, 47, 61.0)
    b.patient_id = "pat-1"
    b.gateway_id = "gw-1"
    b.transport = Transport.BLE
    b.receive_time_us = t + 10_000_000
    b.tz_offset_min = -300
    b.clock_offset_us = -1_234_567
    b.fill_reading_ids()
    return b


def same(a: SampleBatch, b: SampleBatch) -> None:
    for f in dataclasses.fields(SampleBatch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "value":
            assert [repr(v) for v in x] == [repr(v) for v in y]
        else:
            assert x == y, f.name


def test_every_field_round_trips_and_equals_the_json_codec():
    b = normalized()
    data = clean.encode(b)
    assert clean.is_clean_binary(data) and clean.sample_count(data) == len(b)
    back = clean.decode(data)
    same(back, b)
    assert back.metric[-1] == "heart_rate"  # sample order kept (the JSON codec regroups)
    # records written as JSON by an older worker still decode
    (old,) = clean.decode_record(b.to_json())
    same(old, SampleBatch.from_json(b.to_json()))
    assert len(data) < len(b.to_json())


def test_optional_fields_stay_absent_and_ids_are_optional():
    b = SampleBatch(device_id="dev-1")
    b.add("heart_rate", "/min", 1, 2, 3.0)
    back = clean.decode(clean.encode(b))
    same(back, b)
    assert back.patient_id is None and back.transport is None and back.reading_id == []


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda d: d[:5], "shorter than its fixed header"),
        (lambda d: b"XX" + d[2:], "not a clean record"),
        (lambda d: d[:2] + b"\x07" + d[3:], "unsupported clean record version 7"),
        (lambda d: d[:-1], "bytes, not"),
        (lambda d: d[:3] + struct.pack("<I", 9) + d[7:], "bytes, not"),
        (lambda d: d.replace(b'"heart_rate"', b'"heart_rata"'), "unknown metric"),
        (lambda d: d.replace(b'"transport":"ble"', b'"transport":"bl!"'), "unknown transport"),
        (lambda d: d.replace(b'"rx":', b'"rx":"'), "header"),
    ],
)
def test_a_damaged_record_says_what_is_wrong(mangle, message):
    with pytest.raises(WireFormatError, match=message):
        clean.decode(mangle(clean.encode(normalized())))


def test_a_bundle_carries_many_batches_in_order():
    a, b = normalized(), normalized()
    b.patient_id, b.device_id = "pat-2", "dev-2"
    b.fill_reading_ids()  # another device: other ids
    data = clean.encode_bundle([a, b, a])
    assert clean.sample_count(data) == 3 * len(a)
    back = clean.decode_record(data)
    assert len(back) == 3
    for x, y in zip(back, [a, b, a], strict=True):
        same(x, y)


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda d: d[:-1], "runs past the end"),
        (lambda d: d + b"\0", "bytes after its batches"),
        (lambda d: d[:3] + struct.pack("<I", 1) + d[7:], "hold 16 samples, not 1"),
        (lambda d: d[:7] + struct.pack("<I", 3) + d[11:], "ends before batch 2"),
    ],
)
def test_a_damaged_bundle_says_what_is_wrong(mangle, message):
    data = clean.encode_bundle([normalized(), normalized()])
    with pytest.raises(WireFormatError, match=message):
        clean.decode_any(mangle(data))


def test_bundles_per_patient_keep_order_and_stay_under_the_size_cap():
    def one(patient: str, n: int) -> SampleBatch:
        b = SampleBatch(device_id=f"d-{patient}", patient_id=patient)
        for i in range(n):
            b.add("heart_rate", "/min", i, i, 60.0)
        return b

    batches = [one("p1", 5), one("p2", 3), one("p1", 4), one("p1", 2), one("p2", 9)]
    out = bundle_by_patient(batches, max_samples=9)
    assert [(p, [len(b) for b in chunk]) for p, chunk in out] == [
        ("p1", [5, 4]),
        ("p1", [2]),
        ("p2", [3]),
        ("p2", [9]),
    ]
    with pytest.raises(ValueError, match="not normalized"):
        bundle_by_patient([SampleBatch(device_id="d")], 10)


def test_reading_ids_are_derived_not_stored_and_stored_ones_still_decode():
    b = normalized()
    derived, stored = clean.encode(b), clean.encode(b, store_ids=True)
    assert len(stored) - len(derived) == 16 * len(b) - len(b'"derive"') + len(b"true")
    assert b'"ids":"derive"' in derived
    same(clean.decode(derived), b)
    same(clean.decode(stored), b)  # records of workers that stored them
    (one,) = clean.decode_any(clean.encode_bundle([b]))
    assert one.reading_id == b.reading_id
