"""The wire schema: round trips, and clear errors that say what and where."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vitalproof.errors import WireFormatError
from vitalproof.schema import Quality, SampleBatch, Transport
from vitalproof.units import CANONICAL_UNIT, Metric
from vitalproof_verify.leaves import canonical_reading_bytes, reading_id

metrics = st.sampled_from(list(Metric))
samples = st.lists(
    st.tuples(
        metrics,
        st.integers(0, 2**53),
        st.integers(0, 2**32),
        st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.just(math.nan)),
    ),
    min_size=1,
    max_size=40,
)


@given(samples, st.booleans())
def test_json_round_trip_keeps_every_sample(rows: list[tuple[Metric, int, int, float]], ids: bool):
    b = SampleBatch(device_id="dev-1")
    for m, t, seq, v in rows:
        b.add(m.value, CANONICAL_UNIT[m], t, seq, v)
    if ids:
        b.fill_reading_ids()
        b.patient_id, b.gateway_id, b.transport, b.receive_time_us = "p1", "gw", Transport.MQTT, 5
    back = SampleBatch.from_json(b.to_json())
    # Series grouping may reorder samples across metrics; compare as multisets per field.
    key = lambda x: (x[0], x[1], x[2], x[3], repr(x[4]))  # noqa: E731
    mine = sorted(zip(b.metric, b.unit, b.device_time_us, b.seq, b.value, strict=True), key=key)
    theirs = sorted(
        zip(back.metric, back.unit, back.device_time_us, back.seq, back.value, strict=True),
        key=key,
    )
    assert [key(x) for x in mine] == [key(x) for x in theirs]
    assert sorted(back.reading_id) == sorted(b.reading_id)
    nan_q = [q for q, v in zip(back.quality, back.value, strict=True) if math.isnan(v)]
    assert all(q & Quality.INVALID for q in nan_q)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_wire_format_error(data: bytes):
    with contextlib.suppress(WireFormatError):
        SampleBatch.from_json(data, device_id="d")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"{not json", "invalid JSON"),
        (b'{"schema": 2, "series": []}', "unsupported schema 2"),
        (b'{"schema": 1, "series": []}', "series missing or empty"),
        (
            b'{"schema": 1, "series": [{"metric": "heart_rat", "unit": "/min", '
            b'"t": [1], "seq": [1], "v": [60]}]}',
            "unknown metric 'heart_rat'",
        ),
        (
            b'{"schema": 1, "series": [{"metric": "heart_rate", "unit": "/min", '
            b'"t": [1], "seq": [1], "v": ["60"]}]}',
            "series[0][0]: value '60' is not a number",
        ),
        (
            b'{"schema": 1, "device_id": "other", "series": [{"metric": "heart_rate", '
            b'"unit": "/min", "t": [1], "seq": [1], "v": [60]}]}',
            "payload names device 'other' but came from 'dev'",
        ),
    ],
)
def test_errors_say_what_is_wrong(payload: bytes, message: str):
    with pytest.raises(WireFormatError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SampleBatch.from_json(payload, device_id="dev")


def test_invalid_json_error_names_the_offset():
    with pytest.raises(WireFormatError) as e:
        SampleBatch.from_json(b'{"schema": 1,, }', device_id="d")
    assert e.value.offset == 13
    assert "at byte 13" in str(e.value)


def test_reading_id_is_deterministic_and_covers_every_part():
    base = reading_id("d", "heart_rate", 1, 100)
    assert base == reading_id("d", "heart_rate", 1, 100)
    others = {
        reading_id("e", "heart_rate", 1, 100),
        reading_id("d", "spo2", 1, 100),
        reading_id("d", "heart_rate", 2, 100),
        reading_id("d", "heart_rate", 1, 101),
    }
    assert base not in others and len(others) == 4


def test_canonical_bytes_are_sorted_compact_and_nan_free():
    b = canonical_reading_bytes(
        reading_id="r",
        device_id="d",
        patient_id="p",
        metric="spo2",
        value=math.nan,
        unit="%",
        device_time_us=1,
        seq=2,
        quality=1,
    )
    assert b == (
        b'{"device_id":"d","device_time_us":1,"metric":"spo2","patient_id":"p","quality":1,'
        b'"reading_id":"r","seq":2,"unit":"%","value":null}'
    )


def test_quality_absent_is_all_zero_and_a_bad_one_still_an_error() -> None:
    series = {"metric": "heart_rate", "unit": "/min", "t": [1, 2], "seq": [1, 2], "v": [60, 61]}
    b = SampleBatch.from_json(
        json.dumps({"schema": 1, "device_id": "d", "series": [series]}).encode()
    )
    assert b.quality == [0, 0] and b.value == [60.0, 61.0]
    for q in (None, [0], "0"):
        doc = {"schema": 1, "device_id": "d", "series": [{**series, "q": q}]}
        with pytest.raises(WireFormatError, match="q differs in length"):
            SampleBatch.from_json(json.dumps(doc).encode())
    doc = {"schema": 1, "device_id": "d", "series": [{**series, "v": [None, 61]}]}
    b = SampleBatch.from_json(json.dumps(doc).encode())  # the careful path, no q either
    assert b.quality == [int(Quality.INVALID), 0]
