"""Physiology generators: plausible ranges, consistency between metrics, determinism."""

from __future__ import annotations

import itertools
import statistics
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_sims.physiology import PROFILES, SimDevice, circadian, get_profile
from vitalproof.schema import SampleBatch
from vitalproof.units import CANONICAL_UNIT, PLAUSIBLE, Metric

US = 1_000_000
# 2024-11-21 00:00:00 UTC: a midnight, so hours below are easy to reason about.
MIDNIGHT_UTC_US = 1_732_147_200 * US


def _run(dev: SimDevice, seconds: int, step_s: float = 60.0) -> SampleBatch:
    """Tick ``dev`` for ``seconds`` and concatenate all batches."""
    out = SampleBatch(device_id=dev.device_id)
    t, end = dev.start_time_us, dev.start_time_us + seconds * US
    while t < end:
        t = min(end, t + round(step_s * US))
        b = dev.tick(t)
        if b is not None:
            for i in range(len(b)):
                out.add(b.metric[i], b.unit[i], b.device_time_us[i], b.seq[i], b.value[i])
    return out


def _by_metric(b: SampleBatch) -> dict[str, list[float]]:
    d: dict[str, list[float]] = defaultdict(list)
    for m, v in zip(b.metric, b.value, strict=True):
        d[m].append(v)
    return d


@pytest.fixture(scope="module")
def day() -> SampleBatch:
    """A full simulated day of the default adult profile (about one second of CPU)."""
    return _run(SimDevice("wrist-1", seed=7, start_time_us=MIDNIGHT_UTC_US), 86_400, 900.0)


def test_every_value_is_plausible_and_in_canonical_units(day: SampleBatch) -> None:
    for m, unit, v in zip(day.metric, day.unit, day.value, strict=True):
        metric = Metric(m)
        assert unit == CANONICAL_UNIT[metric]
        lo, hi = PLAUSIBLE[metric]
        assert lo <= v <= hi, (m, v)


def test_physiological_ranges(day: SampleBatch) -> None:
    d = _by_metric(day)
    assert min(d["heart_rate"]) >= 40 and max(d["heart_rate"]) <= 185
    assert min(d["spo2"]) >= 88 and max(d["spo2"]) <= 99
    assert statistics.median(d["spo2"]) >= 95  # dips are occasional
    assert min(d["skin_temperature"]) >= 30 and max(d["skin_temperature"]) <= 37
    assert min(d["respiratory_rate"]) >= 6 and max(d["respiratory_rate"]) <= 45
    for sys_, dia, mean in zip(
        d["systolic_bp"], d["diastolic_bp"], d["mean_arterial_pressure"], strict=True
    ):
        assert 85 <= sys_ <= 200 and 45 <= dia <= 120 and dia < mean < sys_
    assert all(s >= 0 and s == int(s) for s in d["step_count"])
    assert sum(d["step_count"]) > 500  # someone who moves during the day


def test_heart_rate_lower_at_night_and_rises_with_activity(day: SampleBatch) -> None:
    night, afternoon, steps_by_hour, hr_by_hour = [], [], defaultdict(float), defaultdict(list)
    tz_s = get_profile("adult").tz_offset_min * 60
    for m, t, v in zip(day.metric, day.device_time_us, day.value, strict=True):
        hour = int(((t // US + tz_s) % 86_400) // 3600)
        if m == "heart_rate":
            hr_by_hour[hour].append(v)
            (night if 1 <= hour < 5 else afternoon if 13 <= hour < 18 else []).append(v)
        elif m == "step_count":
            steps_by_hour[hour] += v
    assert statistics.mean(night) < statistics.mean(afternoon) - 3
    active = max(steps_by_hour, key=lambda h: steps_by_hour[h])
    quiet = range(1, 5)
    assert statistics.mean(hr_by_hour[active]) > max(statistics.mean(hr_by_hour[h]) for h in quiet)
    assert max(hr_by_hour[active]) > 100  # a real bout, not noise


def test_rr_intervals_agree_with_heart_rate(day: SampleBatch) -> None:
    d = _by_metric(day)
    mean_rr = statistics.mean(d["rr_interval"])
    mean_hr_from_rr = 60_000 / mean_rr
    assert abs(mean_hr_from_rr - statistics.mean(d["heart_rate"])) < 5
    assert statistics.stdev(d["rr_interval"][:300]) > 10  # there is variability (HRV)
    # Beat count over the day matches the mean heart rate.
    assert abs(len(d["rr_interval"]) / 1440 - statistics.mean(d["heart_rate"])) < 5


def test_several_rr_per_second_at_high_heart_rate() -> None:
    athlete = get_profile("athlete")
    dev = SimDevice("hi", seed=1, profile=athlete, start_time_us=MIDNIGHT_UTC_US + 15 * 3600 * US)
    dev._state.hr = 170.0  # mid-bout
    dev._state.intensity = dev._state.bout_intensity = 0.85
    dev._state.bout_left_s = 600
    b = _run(dev, 10, 10.0)
    rr = [
        (t, v)
        for m, t, v in zip(b.metric, b.device_time_us, b.value, strict=True)
        if m == "rr_interval"
    ]
    assert len(rr) >= 25  # ~2.8 beats per second
    assert all(300 <= v <= 450 for _, v in rr)
    # Consecutive beats are separated by the reported interval.
    for (t1, _), (t2, v2) in itertools.pairwise(rr):
        assert t2 - t1 == v2 * 1000


def test_blood_pressure_spot_checks_every_few_minutes(day: SampleBatch) -> None:
    times = sorted(
        {t for m, t in zip(day.metric, day.device_time_us, strict=True) if m == "systolic_bp"}
    )
    gaps = {b - a for a, b in itertools.pairwise(times)}
    assert gaps == {get_profile("adult").bp_every_s * US}


def test_accelerometer_rate_and_gravity() -> None:
    dev = SimDevice("acc", seed=3, start_time_us=MIDNIGHT_UTC_US, accel_hz=50)
    b = _run(dev, 4, 0.2)
    d = _by_metric(b)
    # (0 s, 4 s] plus the sample at power-on: both ends are inclusive.
    assert len(d["accel_x"]) == len(d["accel_y"]) == len(d["accel_z"]) == 4 * 50 + 1
    assert 9.0 < statistics.mean(d["accel_z"]) < 10.5  # resting wrist: gravity mostly on z
    ts = sorted(t for m, t in zip(b.metric, b.device_time_us, strict=True) if m == "accel_x")
    assert {b - a for a, b in itertools.pairwise(ts)} == {20_000}


def test_sequence_numbers_unique_and_follow_device_time(day: SampleBatch) -> None:
    assert day.seq == list(range(len(day)))
    assert day.device_time_us == sorted(day.device_time_us)
    day.fill_reading_ids()
    assert len(set(day.reading_id)) == len(day)


def test_same_seed_same_data_other_seed_other_data() -> None:
    a = _run(SimDevice("d", seed=1, start_time_us=MIDNIGHT_UTC_US, accel_hz=10), 600)
    b = _run(SimDevice("d", seed=1, start_time_us=MIDNIGHT_UTC_US, accel_hz=10), 600)
    c = _run(SimDevice("d", seed=2, start_time_us=MIDNIGHT_UTC_US, accel_hz=10), 600)
    assert a.to_json() == b.to_json()
    assert a.value != c.value


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(min_value=0.001, max_value=7.0), min_size=1, max_size=40))
def test_output_does_not_depend_on_tick_schedule(steps: list[float]) -> None:
    """Any tick schedule yields the same stream as one big tick (reproducible fleets)."""
    start = MIDNIGHT_UTC_US + 12 * 3600 * US
    total = sum(steps)
    one = SimDevice("s", seed=5, profile="dense", start_time_us=start, accel_hz=5)
    whole = one.tick(start + round(total * US))
    many = SimDevice("s", seed=5, profile="dense", start_time_us=start, accel_hz=5)
    got = SampleBatch(device_id="s")
    t = start
    for s in steps:
        t += round(s * US)
        b = many.tick(t)
        if b is not None:
            assert min(b.device_time_us) > t - round(s * US) - 1 and max(b.device_time_us) <= t
            for i in range(len(b)):
                got.add(b.metric[i], b.unit[i], b.device_time_us[i], b.seq[i], b.value[i])
    assert whole is not None
    assert got.seq == whole.seq[: len(got)]
    assert got.value == whole.value[: len(got)]


def test_tick_returns_none_when_nothing_is_due_and_never_goes_back() -> None:
    dev = SimDevice("n", seed=0, start_time_us=MIDNIGHT_UTC_US)
    assert dev.tick(MIDNIGHT_UTC_US - US) is None
    first = dev.tick(MIDNIGHT_UTC_US)
    assert first is not None and first.device_time_us == [MIDNIGHT_UTC_US] * len(first)
    assert dev.tick(MIDNIGHT_UTC_US + 1) is None
    assert dev.tick(MIDNIGHT_UTC_US - 5 * US) is None


def test_payload_round_trips_through_the_wire_codec() -> None:
    dev = SimDevice("codec-1", seed=9, profile="dense", start_time_us=MIDNIGHT_UTC_US, accel_hz=25)
    b = dev.tick(MIDNIGHT_UTC_US + 5 * US)
    assert b is not None
    decoded = SampleBatch.from_json(b.to_json(), device_id="codec-1")

    def rows(x: SampleBatch) -> list[tuple[int, str, int, float]]:
        return sorted(zip(x.seq, x.metric, x.device_time_us, x.value, strict=True))

    assert rows(decoded) == rows(b)  # the codec groups by metric; the samples are the same
    assert b'"id"' not in b.to_json()  # devices do not send reading ids
    assert {m.value for m in Metric} >= set(decoded.metric)


def test_profiles_and_errors() -> None:
    assert set(PROFILES) >= {"adult", "athlete", "elderly", "dense"}
    with pytest.raises(ValueError, match="unknown profile 'kid'"):
        get_profile("kid")
    with pytest.raises(ValueError, match="accel_hz"):
        SimDevice("x", 0, accel_hz=-1)
    assert circadian(4 * 3600) == pytest.approx(0.0)
    assert circadian(16 * 3600) == pytest.approx(1.0)
