"""Hypothesis: what the encoders write, the parsers read back, for every characteristic."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from device_sims import gatt_encode as enc
from ingest.gatt.parsers import (
    GattSample,
    SensorContact,
    parse_blood_pressure,
    parse_glucose,
    parse_glucose_context,
    parse_heart_rate,
    parse_plx_continuous,
    parse_plx_spot_check,
    parse_temperature,
    parse_weight,
)
from vitalproof.schema import Quality
from vitalproof.units import Metric
from vitalproof.wire.ieee11073 import MderFloat, Special

specials = st.sampled_from(list(Special)).map(MderFloat.of)
sfloats = st.one_of(
    st.builds(MderFloat, st.integers(-2045, 2045), st.integers(-8, 7)),
    specials,
)
floats32 = st.one_of(
    st.builds(MderFloat, st.integers(-(2**23 - 3), 2**23 - 3), st.integers(-128, 127)),
    specials,
)
times = st.datetimes(min_value=datetime(1582, 1, 1), max_value=datetime(9999, 12, 31)).map(
    lambda d: d.replace(microsecond=0)
)
opt = st.none


def agrees(s: GattSample, x: MderFloat, base: Quality = Quality.NONE, shift: int = 0) -> bool:
    """The sample is x: NaN + INVALID + kind for specials, the exact value otherwise."""
    if x.special is not None:
        return (
            math.isnan(s.value) and s.quality == base | Quality.INVALID and s.special is x.special
        )
    return s.value == x.scaled(shift) and s.quality == base and s.special is None


@given(
    hr=st.integers(0, 0xFFFF),
    wide=st.booleans(),
    contact=st.one_of(opt(), st.booleans()),
    energy=st.one_of(opt(), st.integers(0, 0xFFFF)),
    rr=st.lists(st.integers(0, 0xFFFF), max_size=9),
)
def test_heart_rate(
    hr: int, wide: bool, contact: bool | None, energy: int | None, rr: list[int]
) -> None:
    wide = wide or hr > 0xFF
    r = parse_heart_rate(
        enc.encode_heart_rate(
            hr, wide=wide, contact=contact, energy_expended=energy, rr_intervals=rr
        )
    )
    assert r.heart_rate == hr and r.energy_expended == energy and r.rr_intervals == tuple(rr)
    want = {
        None: SensorContact.NOT_SUPPORTED,
        True: SensorContact.DETECTED,
        False: SensorContact.NOT_DETECTED,
    }
    assert r.sensor_contact is want[contact]
    q = Quality.NO_SENSOR_CONTACT if contact is False else Quality.NONE
    assert r.samples[0] == GattSample(Metric.HEART_RATE, float(hr), "/min", q)
    rr_samples = [s for s in r.samples if s.metric is Metric.RR_INTERVAL]
    assert [s.value for s in rr_samples] == [v * 1000 / 1024 for v in rr]
    assert all(s.quality == q for s in rr_samples)


@given(
    spo2=sfloats,
    pr=sfloats,
    ts=st.one_of(opt(), times),
    ms=st.one_of(opt(), st.integers(0, 0xFFFF)),
    dss=st.one_of(opt(), st.integers(0, 0xFFFFFF)),
    pai=st.one_of(opt(), sfloats),
    clock=st.booleans(),
)
def test_plx_spot_check(
    spo2: MderFloat,
    pr: MderFloat,
    ts: datetime | None,
    ms: int | None,
    dss: int | None,
    pai: MderFloat | None,
    clock: bool,
) -> None:
    data = enc.encode_plx_spot_check(
        spo2,
        pr,
        timestamp=ts,
        measurement_status=ms,
        device_sensor_status=dss,
        pulse_amplitude_index=pai,
        device_clock_not_set=clock,
    )
    r = parse_plx_spot_check(data)
    q = Quality.NO_SENSOR_CONTACT if dss is not None and dss & (1 << 11) else Quality.NONE
    assert agrees(r.samples[0], spo2, q) and agrees(r.samples[1], pr, q)
    assert r.timestamp == ts and all(s.timestamp == ts for s in r.samples)
    assert (None if r.measurement_status is None else int(r.measurement_status)) == ms
    assert (None if r.device_sensor_status is None else int(r.device_sensor_status)) == dss
    assert len(r.samples) == (3 if pai is not None else 2)
    if pai is not None:
        assert agrees(r.samples[2], pai, q)
    assert r.device_clock_not_set is clock


pairs = st.one_of(opt(), st.tuples(sfloats, sfloats))


@given(
    spo2=sfloats,
    pr=sfloats,
    fast=pairs,
    slow=pairs,
    ms=st.one_of(opt(), st.integers(0, 0xFFFF)),
    dss=st.one_of(opt(), st.integers(0, 0xFFFFFF)),
    pai=st.one_of(opt(), sfloats),
)
def test_plx_continuous(
    spo2: MderFloat,
    pr: MderFloat,
    fast: tuple[MderFloat, MderFloat] | None,
    slow: tuple[MderFloat, MderFloat] | None,
    ms: int | None,
    dss: int | None,
    pai: MderFloat | None,
) -> None:
    data = enc.encode_plx_continuous(
        spo2,
        pr,
        fast=fast,
        slow=slow,
        measurement_status=ms,
        device_sensor_status=dss,
        pulse_amplitude_index=pai,
    )
    r = parse_plx_continuous(data)
    q = Quality.NO_SENSOR_CONTACT if dss is not None and dss & (1 << 11) else Quality.NONE
    assert agrees(r.samples[0], spo2, q) and agrees(r.samples[1], pr, q)
    for got, want in ((r.fast, fast), (r.slow, slow)):
        assert (got is None) == (want is None)
        if got is not None and want is not None:
            assert agrees(got.spo2, want[0], q) and agrees(got.pulse_rate, want[1], q)
    assert (None if r.measurement_status is None else int(r.measurement_status)) == ms
    assert (None if r.device_sensor_status is None else int(r.device_sensor_status)) == dss
    if pai is not None:
        assert agrees(r.samples[2], pai, q)


@given(
    value=floats32,
    fahrenheit=st.booleans(),
    ts=st.one_of(opt(), times),
    ttype=st.one_of(opt(), st.integers(0, 255)),
)
def test_temperature(
    value: MderFloat, fahrenheit: bool, ts: datetime | None, ttype: int | None
) -> None:
    data = enc.encode_temperature(
        value, fahrenheit=fahrenheit, timestamp=ts, temperature_type=ttype
    )
    r = parse_temperature(data)
    (s,) = r.samples
    assert agrees(s, value) and s.unit == ("[degF]" if fahrenheit else "Cel")
    assert s.timestamp == r.timestamp == ts
    assert r.temperature_type == ttype


@given(
    values=st.tuples(sfloats, sfloats, sfloats),
    kpa=st.booleans(),
    ts=st.one_of(opt(), times),
    pulse=st.one_of(opt(), sfloats),
    user=st.one_of(opt(), st.integers(0, 255)),
    status=st.one_of(opt(), st.integers(0, 0xFFFF)),
)
def test_blood_pressure(
    values: tuple[MderFloat, MderFloat, MderFloat],
    kpa: bool,
    ts: datetime | None,
    pulse: MderFloat | None,
    user: int | None,
    status: int | None,
) -> None:
    data = enc.encode_blood_pressure(
        *values, kpa=kpa, timestamp=ts, pulse_rate=pulse, user_id=user, measurement_status=status
    )
    r = parse_blood_pressure(data)
    unit = "kPa" if kpa else "mm[Hg]"
    for s, x in zip(r.samples[:3], values, strict=True):
        assert agrees(s, x) and s.unit == unit and s.timestamp == ts
    if pulse is not None:
        assert agrees(r.samples[3], pulse) and r.samples[3].unit == "/min"
    else:
        assert len(r.samples) == 3
    assert r.user_id == user
    assert (None if r.measurement_status is None else r.measurement_status.raw) == status


@given(
    raw=st.integers(0, 0xFFFF),
    imperial=st.booleans(),
    ts=st.one_of(opt(), times),
    user=st.one_of(opt(), st.integers(0, 255)),
    bmi_height=st.one_of(opt(), st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))),
)
def test_weight(
    raw: int,
    imperial: bool,
    ts: datetime | None,
    user: int | None,
    bmi_height: tuple[int, int] | None,
) -> None:
    # The encoder takes kg/lb; wire steps are 0.005 kg / 0.01 lb, 0.1 BMI, 0.001 m / 0.1 in.
    weight = None if raw == 0xFFFF else (raw / 100 if imperial else raw * 5 / 1000)
    bmi = height = None
    if bmi_height is not None:
        bmi = bmi_height[0] / 10
        height = bmi_height[1] / 10 if imperial else bmi_height[1] / 1000
    data = enc.encode_weight(
        weight, imperial=imperial, timestamp=ts, user_id=user, bmi=bmi, height=height
    )
    r = parse_weight(data)
    assert r.weight_raw == raw and r.user_id == user and r.timestamp == ts
    w = r.samples[0]
    if weight is None:
        assert math.isnan(w.value) and w.quality == Quality.INVALID
    else:
        assert w.value == weight and w.quality == Quality.NONE
    if bmi_height is None:
        assert len(r.samples) == 1
    else:
        assert (r.bmi_raw, r.height_raw) == bmi_height
        assert (r.samples[1].value, r.samples[2].value) == (bmi, height)


@given(
    seq=st.integers(0, 0xFFFF),
    base=st.one_of(opt(), times.filter(lambda d: datetime(1700, 1, 1) < d < datetime(9900, 1, 1))),
    offset=st.one_of(opt(), st.integers(-0x8000, 0x7FFF)),
    conc=st.one_of(opt(), sfloats),
    mol=st.booleans(),
    gtype=st.integers(0, 15),
    loc=st.integers(0, 15),
    status=st.one_of(opt(), st.integers(0, 0xFFFF)),
    context=st.booleans(),
)
def test_glucose(
    seq: int,
    base: datetime | None,
    offset: int | None,
    conc: MderFloat | None,
    mol: bool,
    gtype: int,
    loc: int,
    status: int | None,
    context: bool,
) -> None:
    data = enc.encode_glucose(
        seq,
        base,
        time_offset=offset,
        concentration=conc,
        mol_per_litre=mol,
        glucose_type=gtype,
        sample_location=loc,
        sensor_status=status,
        context_follows=context,
    )
    r = parse_glucose(data)
    assert (r.sequence_number, r.base_time, r.time_offset) == (seq, base, offset)
    assert r.context_follows is context and r.mol_per_litre is mol
    assert (None if r.sensor_status is None else int(r.sensor_status)) == status
    if conc is None:
        assert r.samples == () and r.glucose_type is None
        return
    assert (r.glucose_type, r.sample_location) == (gtype, loc)
    (s,) = r.samples
    assert agrees(s, conc, shift=3 if mol else 5)
    assert s.unit == ("mmol/L" if mol else "mg/dL")
    want_ts = None if base is None else base + timedelta(minutes=offset or 0)
    assert s.timestamp == want_ts


def test_glucose_clinical_unit_helpers_are_exact() -> None:
    (s,) = parse_glucose(enc.encode_glucose(1, None, concentration=enc.glucose_mg_dl(95.0))).samples
    assert (s.value, s.unit) == (95.0, "mg/dL")
    (s,) = parse_glucose(
        enc.encode_glucose(1, None, concentration=enc.glucose_mmol_l(5.3), mol_per_litre=True)
    ).samples
    assert (s.value, s.unit) == (5.3, "mmol/L")


nibble = st.integers(0, 15)


@given(
    seq=st.integers(0, 0xFFFF),
    ext=st.one_of(opt(), st.integers(0, 255)),
    carb=st.one_of(opt(), st.tuples(st.integers(0, 255), sfloats)),
    meal=st.one_of(opt(), st.integers(0, 255)),
    th=st.one_of(opt(), st.tuples(nibble, nibble)),
    exercise=st.one_of(opt(), st.tuples(st.integers(0, 0xFFFF), st.integers(0, 255))),
    med=st.one_of(opt(), st.tuples(st.integers(0, 255), sfloats)),
    litres=st.booleans(),
    hba1c=st.one_of(opt(), sfloats),
)
def test_glucose_context(
    seq: int,
    ext: int | None,
    carb: tuple[int, MderFloat] | None,
    meal: int | None,
    th: tuple[int, int] | None,
    exercise: tuple[int, int] | None,
    med: tuple[int, MderFloat] | None,
    litres: bool,
    hba1c: MderFloat | None,
) -> None:
    data = enc.encode_glucose_context(
        seq,
        extended_flags=ext,
        carbohydrate=carb,
        meal=meal,
        tester_health=th,
        exercise=exercise,
        medication=med,
        medication_in_litres=litres,
        hba1c=hba1c,
    )
    r = parse_glucose_context(data)
    assert (r.sequence_number, r.extended_flags, r.meal) == (seq, ext, meal)
    assert (None if carb is None else (r.carbohydrate_id, r.carbohydrate)) == carb
    assert (None if th is None else (r.tester, r.health)) == th
    assert (None if exercise is None else (r.exercise_duration, r.exercise_intensity)) == exercise
    assert (None if med is None else (r.medication_id, r.medication)) == med
    assert r.medication_unit == (None if med is None else ("L" if litres else "kg"))
    assert r.hba1c == hba1c
