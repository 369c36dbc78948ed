"""Normalization rules, without Kafka: accept, convert, flag, reject with a reason."""

from __future__ import annotations

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from streams.normalize import (
    ENROLLMENT_TOLERANCE_US,
    FUTURE_TOLERANCE_US,
    PAST_LIMIT_US,
    Rejection,
    _canonicalize,
    normalize,
)
from vitalproof.raw import RawRecord
from vitalproof.registry import Device, DeviceStatus
from vitalproof.schema import CONTENT_TYPE_JSON, Quality, SampleBatch, Transport
from vitalproof.units import CANONICAL_UNIT, CONVERSIONS, PLAUSIBLE, Metric, conversion_for

NOW = 1_800_000_000_000_000
DEVICES = {
    "dev-1": Device("dev-1", "pat-1", DeviceStatus.ACTIVE, 0),
    "dev-old": Device("dev-old", "pat-2", DeviceStatus.RETIRED, 0, 1),
}


def raw(payload: dict | bytes, device: str = "dev-1", ctype: str = CONTENT_TYPE_JSON) -> RawRecord:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return RawRecord(device, body, ctype, Transport.MQTT, "gw-1", NOW, f"devices/{device}/vitals")


def series(metric: str, unit: str, values: list, t0: int = NOW) -> dict:
    n = len(values)
    return {
        "metric": metric,
        "unit": unit,
        "t": [t0 + i for i in range(n)],
        "seq": list(range(n)),
        "v": values,
    }


def test_accepts_and_fills_patient_ids_and_transport():
    out = normalize(
        raw({"schema": 1, "series": [series("heart_rate", "/min", [60, 61])]}), DEVICES.get
    )
    assert isinstance(out, SampleBatch)
    assert out.patient_id == "pat-1" and out.gateway_id == "gw-1"
    assert out.transport is Transport.MQTT and out.receive_time_us == NOW
    assert len(set(out.reading_id)) == 2 and out.quality == [0, 0]


def test_converts_units_and_flags_the_conversion():
    out = normalize(
        raw({"schema": 1, "series": [series("body_temperature", "[degF]", [98.6])]}), DEVICES.get
    )
    assert isinstance(out, SampleBatch)
    assert out.unit == ["Cel"] and abs(out.value[0] - 37.0) < 1e-9
    assert out.quality[0] & Quality.CONVERTED


def test_implausible_and_future_readings_are_flagged_not_dropped():
    doc = {
        "schema": 1,
        "series": [
            series("heart_rate", "/min", [400]),
            series("spo2", "%", [97], t0=NOW + 3600 * 10**6),
        ],
    }
    out = normalize(raw(doc), DEVICES.get)
    assert isinstance(out, SampleBatch) and len(out) == 2
    by_metric = dict(zip(out.metric, out.quality, strict=True))
    assert by_metric["heart_rate"] & Quality.IMPLAUSIBLE
    assert by_metric["spo2"] & Quality.CLOCK_FUTURE


def test_rejections_carry_reason_and_original_bytes():
    cases = {
        "unknown device dev-x": raw({"schema": 1}, device="dev-x"),
        "retired device dev-old": raw({"schema": 1}, device="dev-old"),
        "unsupported content type 'text/plain'": raw(b"hi", ctype="text/plain"),
        "invalid JSON": raw(b"{oops"),
        "unit 'mmol/L' is not valid for heart_rate": raw(
            {"schema": 1, "series": [series("heart_rate", "mmol/L", [1])]}
        ),
    }
    for reason, record in cases.items():
        out = normalize(record, DEVICES.get)
        assert isinstance(out, Rejection), reason
        assert reason in out.reason
        assert out.raw.payload == record.payload


# -- the per-run flagging against the rules applied sample by sample ------------------------

_CONVERSIONS = list(CONVERSIONS)


def _reference(b: SampleBatch, received_us: int, enrolled_us: int | None) -> None:
    """Every rule of normalize's units and flags, one sample at a time, in Quality terms."""
    for i in range(len(b)):
        metric = Metric(b.metric[i])
        q = Quality(b.quality[i])
        v = b.value[i]
        conv = conversion_for(metric, b.unit[i])
        if conv is not None:
            v = v * conv[0] + conv[1]
            b.unit[i] = CANONICAL_UNIT[metric]
            q |= Quality.CONVERTED
        lo, hi = PLAUSIBLE[metric]
        if math.isnan(v):
            q |= Quality.INVALID
        elif not lo <= v <= hi:
            q |= Quality.IMPLAUSIBLE
        t = b.device_time_us[i]
        if received_us and t > received_us + FUTURE_TOLERANCE_US:
            q |= Quality.CLOCK_FUTURE
        if received_us and t < received_us - PAST_LIMIT_US:
            q |= Quality.CLOCK_PAST
        if enrolled_us is not None and t < enrolled_us - ENROLLMENT_TOLERANCE_US:
            q |= Quality.BEFORE_ENROLLMENT
        b.value[i] = v
        b.quality[i] = int(q)


# Device times relative to receipt, on and around every bound.
_OFFSETS = [0, -60_000_000, FUTURE_TOLERANCE_US, FUTURE_TOLERANCE_US + 1, -PAST_LIMIT_US]
_OFFSETS += [-PAST_LIMIT_US - 1, -2 * PAST_LIMIT_US, 3 * FUTURE_TOLERANCE_US]


@st.composite
def _cases(draw: st.DrawFn) -> tuple[SampleBatch, int, int | None]:
    rx = draw(st.sampled_from([0, NOW]))
    enrolled = draw(
        st.one_of(
            st.none(),
            st.just(0),
            st.sampled_from(_OFFSETS).map(lambda dt: NOW + dt + ENROLLMENT_TOLERANCE_US),
            st.integers(NOW - 2 * PAST_LIMIT_US, NOW + 2 * PAST_LIMIT_US),
        )
    )
    b = SampleBatch(device_id="dev-1")
    for _ in range(draw(st.integers(1, 4))):  # runs of one metric, as series arrive
        metric = Metric(draw(st.sampled_from([m.value for m in Metric])))
        canonical = CANONICAL_UNIT[metric]
        units = [canonical] + [f for (f, to) in _CONVERSIONS if to == canonical]
        lo, hi = PLAUSIBLE[metric]
        values = st.one_of(
            st.floats(lo - 10, hi + 10),
            st.sampled_from([lo, hi, math.nan, math.inf, -math.inf]),
        )
        shared_dt = draw(st.sampled_from(_OFFSETS))  # a run mostly shares its clock state
        unit = draw(st.sampled_from(units))
        for _ in range(draw(st.integers(1, 8))):
            dt = draw(st.one_of(st.just(shared_dt), st.sampled_from(_OFFSETS)))
            if draw(st.integers(0, 9)) == 0:
                unit = draw(st.sampled_from(units))
            b.add(metric.value, unit, NOW + dt, 1, draw(values), draw(st.integers(0, 255)))
    return b, rx, enrolled


@settings(max_examples=500, deadline=None)
@given(_cases())
def test_canonicalize_equals_the_rules_sample_by_sample(
    case: tuple[SampleBatch, int, int | None],
) -> None:
    b, rx, enrolled = case
    ref = SampleBatch(device_id=b.device_id)
    for i in range(len(b)):
        ref.add(b.metric[i], b.unit[i], b.device_time_us[i], b.seq[i], b.value[i], b.quality[i])
    _canonicalize(b, rx, enrolled_us=enrolled)
    _reference(ref, rx, enrolled)
    assert b.unit == ref.unit and b.quality == ref.quality
    assert all(type(q) is int for q in b.quality)  # no Quality objects leak into the batch
    assert json.dumps(b.value) == json.dumps(ref.value)  # NaN-aware equality


def test_a_metric_that_is_not_a_string_is_a_rejection_not_a_crash():
    """Found by bench/fuzz.py (json): `"metric": [0, 1]` raised TypeError out of the decoder,
    which would have stopped the worker on every retry of that one record."""
    doc = {
        "schema": 1,
        "series": [{"metric": [0, 1], "unit": "/min", "t": [1], "seq": [0], "v": [60]}],
    }
    out = normalize(raw(doc), DEVICES.get)
    assert isinstance(out, Rejection) and "unknown metric [0, 1]" in out.reason
    assert out.raw.payload == json.dumps(doc).encode()
