"""The per-series fast paths give exactly what the per-sample definitions give.

Proofs depend on the canonical bytes and leaf hashes byte for byte, and normalization's
flags and the wire decode must not depend on which path a batch took, so each fast path is
checked against the straightforward per-sample code over generated batches.
"""

from __future__ import annotations

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from streams.normalize import FUTURE_TOLERANCE_US, PAST_LIMIT_US, _canonicalize
from vitalproof.hashing import salted_leaves
from vitalproof.schema import Quality, SampleBatch
from vitalproof.units import CANONICAL_UNIT, PLAUSIBLE, Metric, conversion_for
from vitalproof_verify.leaves import canonical_reading_bytes, leaf_hash_salted

text = st.text(min_size=1, max_size=12)
metrics = st.sampled_from([m.value for m in Metric])
values = st.one_of(
    st.floats(allow_infinity=False),
    st.integers(-(10**6), 10**6).map(float),
    st.just(math.nan),
)
ints = st.integers(-(2**62), 2**62)


@st.composite
def batches(draw: st.DrawFn) -> SampleBatch:
    b = SampleBatch(device_id=draw(text), patient_id=draw(text))
    for _ in range(draw(st.integers(0, 4))):  # runs of one metric, as series arrive
        metric, unit = draw(metrics), draw(st.one_of(text, st.just("%")))
        for _ in range(draw(st.integers(1, 6))):
            b.add(metric, unit, draw(ints), draw(ints), draw(values), draw(st.integers(0, 127)))
    ids = st.one_of(st.text(max_size=40), st.text("0123456789abcdef", min_size=32, max_size=32))
    b.reading_id = [draw(ids) for _ in range(len(b))]
    return b


def reference_canonical(b: SampleBatch) -> list[bytes]:
    """The definition: :func:`canonical_reading_bytes` of each sample, one at a time."""
    assert b.patient_id is not None
    return [
        canonical_reading_bytes(
            reading_id=b.reading_id[i],
            device_id=b.device_id,
            patient_id=b.patient_id,
            metric=b.metric[i],
            value=b.value[i],
            unit=b.unit[i],
            device_time_us=b.device_time_us[i],
            seq=b.seq[i],
            quality=b.quality[i],
        )
        for i in range(len(b))
    ]


@settings(max_examples=300, deadline=None)
@given(batches())
def test_canonical_bytes_per_sample_equal_canonical_reading_bytes(b: SampleBatch) -> None:
    assert b.canonical_bytes_per_sample() == reference_canonical(b)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=32, max_size=32), st.binary()), max_size=20))
def test_leaf_hashes_salted_equal_leaf_hash_salted(pairs: list[tuple[bytes, bytes]]) -> None:
    salts, data = [s for s, _ in pairs], [d for _, d in pairs]
    assert salted_leaves(salts, data) == [leaf_hash_salted(s, d) for s, d in pairs]


def _reference_canonicalize(b: SampleBatch, received_us: int) -> None:
    """The per-sample rules, as normalize applied them before the per-run version."""
    for i in range(len(b)):
        metric = Metric(b.metric[i])
        q = b.quality[i]
        conv = conversion_for(metric, b.unit[i])
        v = b.value[i]
        if conv is not None:
            v = v * conv[0] + conv[1]
            b.unit[i] = CANONICAL_UNIT[metric]
            q |= Quality.CONVERTED
        if math.isnan(v):
            q |= Quality.INVALID
        else:
            lo, hi = PLAUSIBLE[metric]
            if not lo <= v <= hi:
                q |= Quality.IMPLAUSIBLE
        t = b.device_time_us[i]
        if received_us and t > received_us + FUTURE_TOLERANCE_US:
            q |= Quality.CLOCK_FUTURE
        elif received_us and t < received_us - PAST_LIMIT_US:
            q |= Quality.CLOCK_PAST
        b.value[i] = v
        b.quality[i] = int(q)


@st.composite
def device_batches(draw: st.DrawFn) -> tuple[SampleBatch, int]:
    rx = draw(st.sampled_from([0, 1_732_200_000_000_000]))
    b = SampleBatch(device_id="d")
    for _ in range(draw(st.integers(1, 4))):
        metric = Metric(draw(metrics))
        units = [CANONICAL_UNIT[metric]] + [f for (f, to) in _CONV if to == CANONICAL_UNIT[metric]]
        for _ in range(draw(st.integers(1, 6))):
            lo, hi = PLAUSIBLE[metric]
            v = draw(st.one_of(st.floats(lo - 10, hi + 10), st.just(math.nan)))
            dt = draw(
                st.sampled_from([0, -60_000_000, 2 * FUTURE_TOLERANCE_US, -2 * PAST_LIMIT_US])
            )
            b.add(
                metric.value, draw(st.sampled_from(units)), rx + dt, 1, v, draw(st.integers(0, 3))
            )
    return b, rx


_CONV = list(__import__("vitalproof.units", fromlist=["CONVERSIONS"]).CONVERSIONS)


@settings(max_examples=300, deadline=None)
@given(device_batches())
def test_per_run_canonicalize_equals_per_sample_rules(case: tuple[SampleBatch, int]) -> None:
    b, rx = case
    ref = SampleBatch(device_id=b.device_id)
    for i in range(len(b)):
        ref.add(b.metric[i], b.unit[i], b.device_time_us[i], b.seq[i], b.value[i], b.quality[i])
    _canonicalize(b, rx)
    _reference_canonicalize(ref, rx)
    assert b.unit == ref.unit and b.quality == ref.quality
    assert json.dumps(b.value) == json.dumps(ref.value)  # NaN-aware equality


@settings(max_examples=200, deadline=None)
@given(batches())
def test_wire_round_trip_keeps_every_column(b: SampleBatch) -> None:
    doc = b.to_json_dict()
    if not doc["series"]:
        return
    again = SampleBatch.from_json(json.dumps(doc).encode())

    # series regroup samples by (metric, unit): compare per key, in order
    def per_key(x: SampleBatch) -> dict[tuple[str, str], list[tuple[object, ...]]]:
        out: dict[tuple[str, str], list[tuple[object, ...]]] = {}
        for i in range(len(x)):
            v = x.value[i]
            out.setdefault((x.metric[i], x.unit[i]), []).append(
                (x.device_time_us[i], x.seq[i], None if math.isnan(v) else v, x.reading_id[i])
            )
        return out

    assert per_key(again) == per_key(b)


@settings(max_examples=200, deadline=None)
@given(batches())
def test_fast_and_checked_decode_agree(b: SampleBatch) -> None:
    """A JSON ``true`` anywhere sends the decode down the per-sample path: same result."""
    doc = b.to_json_dict()
    if not doc["series"]:
        return
    fast = SampleBatch.from_json(json.dumps(doc).encode())
    checked = SampleBatch.from_json(json.dumps({**doc, "extra": True}).encode())
    for name in ("metric", "unit", "device_time_us", "seq", "quality", "reading_id"):
        assert getattr(fast, name) == getattr(checked, name), name
    assert json.dumps(fast.value) == json.dumps(checked.value)
