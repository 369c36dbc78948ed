"""Spec vectors for every characteristic and every combination of its flag bits.

The bytes are built by hand here, with struct, from the GSS field tables (not with
``device_sims.gatt_encode``), so a layout mistake shared by the parser and the encoder still
shows. 11073 float fields are written as raw hex worked out by hand in the comments.
"""

from __future__ import annotations

import math
import struct
from datetime import datetime

import pytest

from ingest.gatt.parsers import (
    BloodPressureMeasurement,
    GattError,
    GattResult,
    GattSample,
    GlucoseHealth,
    GlucoseMeasurement,
    GlucoseMeasurementContext,
    GlucoseSensorStatus,
    GlucoseTester,
    GlucoseType,
    HeartRateMeasurement,
    Meal,
    PlxDeviceSensorStatus,
    PlxMeasurementStatus,
    PulseRateRange,
    SampleLocation,
    SensorContact,
    TemperatureType,
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
from vitalproof.wire.ieee11073 import Special

TS = datetime(2024, 3, 15, 8, 30, 45)
TS_BYTES = struct.pack("<HBBBBB", 2024, 3, 15, 8, 30, 45)


def by_metric(result: GattResult) -> dict[Metric, list[GattSample]]:
    out: dict[Metric, list[GattSample]] = {}
    for s in result.samples:
        out.setdefault(s.metric, []).append(s)
    return out


def only(result: GattResult, metric: Metric) -> GattSample:
    (s,) = by_metric(result)[metric]
    return s


# -- Heart Rate Measurement 0x2A37 -------------------------------------------------------


def hr_bytes(flags: int) -> bytes:
    b = bytes([flags])
    b += struct.pack("<H", 328) if flags & 0x01 else bytes([72])
    if flags & 0x08:
        b += struct.pack("<H", 1234)
    if flags & 0x10:
        b += struct.pack("<HH", 800, 1024)
    return b


@pytest.mark.parametrize("flags", range(32))
def test_heart_rate_all_flags(flags: int) -> None:
    r = parse_heart_rate(hr_bytes(flags))
    assert isinstance(r, HeartRateMeasurement)
    assert r.flags == flags
    contact = (flags >> 1) & 3
    no_contact = contact == 0b10
    q = Quality.NO_SENSOR_CONTACT if no_contact else Quality.NONE
    expected_contact = SensorContact.NOT_SUPPORTED if contact < 2 else SensorContact(contact)
    assert r.sensor_contact is expected_contact
    hr = only(r, Metric.HEART_RATE)
    assert (hr.value, hr.unit, hr.quality, hr.timestamp) == (
        328.0 if flags & 1 else 72.0,
        "/min",
        q,
        None,
    )
    m = by_metric(r)
    if flags & 0x08:
        e = only(r, Metric.ENERGY_EXPENDED)
        assert (e.value, e.unit, e.quality) == (1234.0, "kJ", Quality.NONE)
        assert r.energy_expended == 1234
    else:
        assert Metric.ENERGY_EXPENDED not in m and r.energy_expended is None
    if flags & 0x10:
        rr = m[Metric.RR_INTERVAL]
        assert [s.value for s in rr] == [781.25, 1000.0]  # 800/1024 s, 1024/1024 s
        assert all(s.unit == "ms" and s.quality == q for s in rr)
        assert r.rr_intervals == (800, 1024)
    else:
        assert Metric.RR_INTERVAL not in m and r.rr_intervals == ()


def test_heart_rate_many_rr_intervals() -> None:
    data = bytes([0x10, 60]) + struct.pack("<4H", 1, 512, 1000, 65535)
    r = parse_heart_rate(data)
    assert [s.value for s in r.samples[1:]] == [1000 / 1024, 500.0, 1000000 / 1024, 65535000 / 1024]


def test_heart_rate_rr_flag_without_rr_is_truncated() -> None:
    with pytest.raises(GattError) as ei:
        parse_heart_rate(bytes([0x11, 0x48, 0x00]))
    e = ei.value
    assert (e.offset, e.problem) == (3, "truncated")
    assert str(e) == "2a37: truncated at byte 3: RR interval needs 2 bytes, got 0"
    assert e.uuid == "00002a37-0000-1000-8000-00805f9b34fb"


def test_heart_rate_odd_rr_byte() -> None:
    with pytest.raises(GattError) as ei:
        parse_heart_rate(bytes([0x10, 0x48, 0x00, 0x03, 0x01]))
    assert ei.value.offset == 4
    assert "RR interval needs 2 bytes, got 1" in str(ei.value)


# -- PLX Spot-Check 0x2A5E --------------------------------------------------------------

SPO2_98 = struct.pack("<H", 0x0062)  # (98, 0)
PR_72_5 = struct.pack("<H", 0xF2D5)  # (725, -1): exponent 0xF, mantissa 0x2D5
PAI_4_2 = struct.pack("<H", 0xF02A)  # (42, -1)
DSS_UNCONNECTED = (0x000800).to_bytes(3, "little")  # bit 11 Sensor Unconnected to User


def spot_bytes(flags: int) -> bytes:
    b = bytes([flags]) + SPO2_98 + PR_72_5
    if flags & 0x01:
        b += TS_BYTES
    if flags & 0x02:
        b += struct.pack("<H", 0x0180)
    if flags & 0x04:
        b += DSS_UNCONNECTED
    if flags & 0x08:
        b += PAI_4_2
    return b


@pytest.mark.parametrize("flags", range(32))
def test_plx_spot_check_all_flags(flags: int) -> None:
    r = parse_plx_spot_check(spot_bytes(flags))
    ts = TS if flags & 0x01 else None
    q = Quality.NO_SENSOR_CONTACT if flags & 0x04 else Quality.NONE
    assert only(r, Metric.SPO2) == GattSample(Metric.SPO2, 98.0, "%", q, ts)
    assert only(r, Metric.PULSE_RATE) == GattSample(Metric.PULSE_RATE, 72.5, "/min", q, ts)
    assert r.timestamp == ts
    assert r.measurement_status == (
        PlxMeasurementStatus.VALIDATED_DATA | PlxMeasurementStatus.FULLY_QUALIFIED_DATA
        if flags & 0x02
        else None
    )
    assert r.device_sensor_status == (
        PlxDeviceSensorStatus.SENSOR_UNCONNECTED_TO_USER if flags & 0x04 else None
    )
    if flags & 0x08:
        assert only(r, Metric.PULSE_AMPLITUDE_INDEX) == GattSample(
            Metric.PULSE_AMPLITUDE_INDEX, 4.2, "%", q, ts
        )
    else:
        assert Metric.PULSE_AMPLITUDE_INDEX not in by_metric(r)
    assert r.device_clock_not_set is bool(flags & 0x10)


def test_plx_spot_check_nan_spo2() -> None:
    r = parse_plx_spot_check(bytes([0]) + struct.pack("<H", 0x07FF) + PR_72_5)
    s = only(r, Metric.SPO2)
    assert math.isnan(s.value) and s.quality == Quality.INVALID and s.special is Special.NAN
    assert only(r, Metric.PULSE_RATE).value == 72.5


# -- PLX Continuous 0x2A5F --------------------------------------------------------------


def cont_bytes(flags: int) -> bytes:
    b = bytes([flags]) + struct.pack("<HH", 0x0061, 0x003C)  # 97 %, 60 bpm
    if flags & 0x01:
        b += struct.pack("<HH", 0x0060, 0x003D)  # fast: 96 %, 61 bpm
    if flags & 0x02:
        b += struct.pack("<HH", 0xF3D6, 0x003B)  # slow: (982, -1) = 98.2 %, 59 bpm
    if flags & 0x04:
        b += struct.pack("<H", 0x2020)  # bit 5 ongoing, bit 13 unavailable
    if flags & 0x08:
        b += (0x000020).to_bytes(3, "little")  # bit 5 low perfusion
    if flags & 0x10:
        b += struct.pack("<H", 0xF00F)  # (15, -1) = 1.5 %
    return b


@pytest.mark.parametrize("flags", range(32))
def test_plx_continuous_all_flags(flags: int) -> None:
    r = parse_plx_continuous(cont_bytes(flags))
    assert only(r, Metric.SPO2) == GattSample(Metric.SPO2, 97.0, "%")
    assert only(r, Metric.PULSE_RATE) == GattSample(Metric.PULSE_RATE, 60.0, "/min")
    if flags & 0x01:
        assert r.fast is not None
        assert (r.fast.spo2.value, r.fast.pulse_rate.value) == (96.0, 61.0)
    else:
        assert r.fast is None
    if flags & 0x02:
        assert r.slow is not None
        assert (r.slow.spo2.value, r.slow.pulse_rate.value) == (98.2, 59.0)
        assert (r.slow.spo2.metric, r.slow.pulse_rate.unit) == (Metric.SPO2, "/min")
    else:
        assert r.slow is None
    assert r.measurement_status == (
        PlxMeasurementStatus.MEASUREMENT_ONGOING | PlxMeasurementStatus.MEASUREMENT_UNAVAILABLE
        if flags & 0x04
        else None
    )
    assert r.device_sensor_status == (
        PlxDeviceSensorStatus.LOW_PERFUSION_DETECTED if flags & 0x08 else None
    )
    pai = by_metric(r).get(Metric.PULSE_AMPLITUDE_INDEX)
    assert ([s.value for s in pai] if pai else None) == ([1.5] if flags & 0x10 else None)


# -- Temperature Measurement 0x2A1C -----------------------------------------------------


def temp_bytes(flags: int) -> bytes:
    # FLOAT: exponent byte 0xFF (-1), mantissa 0x00016D (365) -> 36.5; 0x0003D1 (977) -> 97.7
    b = bytes([flags]) + struct.pack("<I", 0xFF0003D1 if flags & 0x01 else 0xFF00016D)
    if flags & 0x02:
        b += TS_BYTES
    if flags & 0x04:
        b += bytes([3])  # ear
    return b


@pytest.mark.parametrize("flags", range(8))
def test_temperature_all_flags(flags: int) -> None:
    r = parse_temperature(temp_bytes(flags))
    ts = TS if flags & 0x02 else None
    s = only(r, Metric.BODY_TEMPERATURE)
    if flags & 0x01:
        assert (s.value, s.unit) == (97.7, "[degF]") and r.fahrenheit
    else:
        assert (s.value, s.unit) == (36.5, "Cel") and not r.fahrenheit
    assert s.timestamp == r.timestamp == ts
    assert r.temperature_type == (TemperatureType.EAR if flags & 0x04 else None)


def test_temperature_reserved_type_kept_as_int_and_nres() -> None:
    r = parse_temperature(bytes([0x04]) + struct.pack("<I", 0x00800000) + bytes([42]))
    assert r.temperature_type == 42
    s = r.samples[0]
    assert math.isnan(s.value) and s.quality == Quality.INVALID and s.special is Special.NRES


# -- Blood Pressure Measurement 0x2A35 --------------------------------------------------


def bp_bytes(flags: int) -> bytes:
    if flags & 0x01:  # kPa: (160,-1) (107,-1) (124,-1)
        b = bytes([flags]) + struct.pack("<3H", 0xF0A0, 0xF06B, 0xF07C)
    else:  # mmHg: 120, 80, (933,-1)
        b = bytes([flags]) + struct.pack("<3H", 0x0078, 0x0050, 0xF3A5)
    if flags & 0x02:
        b += TS_BYTES
    if flags & 0x04:
        b += struct.pack("<H", 0x0048)  # 72 bpm
    if flags & 0x08:
        b += bytes([3])
    if flags & 0x10:
        b += struct.pack("<H", 0b001101)  # movement, irregular pulse, rate above range
    return b


@pytest.mark.parametrize("flags", range(32))
def test_blood_pressure_all_flags(flags: int) -> None:
    r = parse_blood_pressure(bp_bytes(flags))
    assert isinstance(r, BloodPressureMeasurement)
    ts = TS if flags & 0x02 else None
    unit = "kPa" if flags & 0x01 else "mm[Hg]"
    want = (16.0, 10.7, 12.4) if flags & 0x01 else (120.0, 80.0, 93.3)
    got = [only(r, m) for m in (Metric.SYSTOLIC_BP, Metric.DIASTOLIC_BP)]
    got.append(only(r, Metric.MEAN_ARTERIAL_PRESSURE))
    assert [s.value for s in got] == list(want)
    assert all(s.unit == unit and s.timestamp == ts and s.quality == 0 for s in got)
    assert r.kpa is bool(flags & 0x01) and r.timestamp == ts
    pulse = by_metric(r).get(Metric.PULSE_RATE)
    assert ([(s.value, s.unit) for s in pulse] if pulse else None) == (
        [(72.0, "/min")] if flags & 0x04 else None
    )
    assert r.user_id == (3 if flags & 0x08 else None)
    if flags & 0x10:
        st = r.measurement_status
        assert st is not None
        assert st.body_movement_detected and not st.cuff_too_loose
        assert st.irregular_pulse_detected and not st.improper_measurement_position
        assert st.pulse_rate_range is PulseRateRange.EXCEEDS_UPPER_LIMIT
    else:
        assert r.measurement_status is None


@pytest.mark.parametrize(
    ("raw", "special"),
    [
        (0x07FF, Special.NAN),
        (0x07FE, Special.POSITIVE_INFINITY),
        (0x0802, Special.NEGATIVE_INFINITY),
        (0x0801, Special.RESERVED),
    ],
)
def test_blood_pressure_failed_cuff(raw: int, special: Special) -> None:
    r = parse_blood_pressure(bytes([0]) + struct.pack("<3H", raw, raw, raw))
    for s in r.samples:
        assert math.isnan(s.value) and Quality.INVALID in s.quality and s.special is special


# -- Weight Measurement 0x2A9D ----------------------------------------------------------


def weight_bytes(flags: int) -> bytes:
    imperial = flags & 0x01
    b = bytes([flags]) + struct.pack("<H", 15540 if imperial else 14100)  # 155.40 lb / 70.5 kg
    if flags & 0x02:
        b += TS_BYTES
    if flags & 0x04:
        b += bytes([2])
    if flags & 0x08:
        b += struct.pack("<HH", 225, 697 if imperial else 1770)  # 22.5; 69.7 in / 1.770 m
    return b


@pytest.mark.parametrize("flags", range(16))
def test_weight_all_flags(flags: int) -> None:
    r = parse_weight(weight_bytes(flags))
    ts = TS if flags & 0x02 else None
    imperial = bool(flags & 0x01)
    w = only(r, Metric.BODY_WEIGHT)
    assert (w.value, w.unit) == ((155.4, "[lb_av]") if imperial else (70.5, "kg"))
    assert w.timestamp == ts and w.quality == Quality.NONE
    assert r.user_id == (2 if flags & 0x04 else None)
    m = by_metric(r)
    if flags & 0x08:
        assert (only(r, Metric.BMI).value, only(r, Metric.BMI).unit) == (22.5, "kg/m2")
        h = only(r, Metric.BODY_HEIGHT)
        assert (h.value, h.unit) == ((69.7, "[in_i]") if imperial else (1.77, "m"))
    else:
        assert Metric.BMI not in m and Metric.BODY_HEIGHT not in m


def test_weight_unsuccessful() -> None:
    r = parse_weight(bytes([0x00, 0xFF, 0xFF]))
    w = r.samples[0]
    assert math.isnan(w.value) and w.quality == Quality.INVALID and w.unit == "kg"


# -- Glucose Measurement 0x2A18 ---------------------------------------------------------


BASE = datetime(2024, 3, 15, 8, 0, 0)
BASE_BYTES = struct.pack("<HBBBBB", 2024, 3, 15, 8, 0, 0)


def glucose_bytes(flags: int) -> bytes:
    b = bytes([flags]) + struct.pack("<H", 7) + BASE_BYTES
    if flags & 0x01:
        b += struct.pack("<h", -30)
    if flags & 0x02:
        # kg/L: (95, -5) = 0xB05F -> 95 mg/dL; mol/L: (53, -4) = 0xC035 -> 5.3 mmol/L
        b += struct.pack("<H", 0xC035 if flags & 0x04 else 0xB05F)
        b += bytes([0x12])  # type 2 capillary plasma (low nibble), location 1 finger
    if flags & 0x08:
        b += struct.pack("<H", 0x0041)  # battery low, result too low
    return b


@pytest.mark.parametrize("flags", range(32))
def test_glucose_all_flags(flags: int) -> None:
    r = parse_glucose(glucose_bytes(flags))
    assert isinstance(r, GlucoseMeasurement)
    assert r.sequence_number == 7 and r.base_time == BASE
    assert r.time_offset == (-30 if flags & 0x01 else None)
    ts = datetime(2024, 3, 15, 7, 30) if flags & 0x01 else BASE
    if flags & 0x02:
        g = only(r, Metric.BLOOD_GLUCOSE)
        assert (g.value, g.unit) == ((5.3, "mmol/L") if flags & 0x04 else (95.0, "mg/dL"))
        assert g.timestamp == ts and g.quality == Quality.NONE
        assert r.glucose_type is GlucoseType.CAPILLARY_PLASMA
        assert r.sample_location is SampleLocation.FINGER
    else:
        assert r.samples == () and r.glucose_type is None and r.sample_location is None
    assert r.mol_per_litre is bool(flags & 0x04)
    assert r.sensor_status == (
        GlucoseSensorStatus.DEVICE_BATTERY_LOW | GlucoseSensorStatus.RESULT_TOO_LOW
        if flags & 0x08
        else None
    )
    assert r.context_follows is bool(flags & 0x10)


def test_glucose_unknown_base_time_has_no_timestamp() -> None:
    data = bytes([0x03]) + struct.pack("<H", 1) + bytes(7) + struct.pack("<hHB", 5, 0xB05F, 0x11)
    r = parse_glucose(data)
    assert r.base_time is None and r.samples[0].timestamp is None


def test_glucose_time_offset_overflow_is_gatt_error() -> None:
    base = struct.pack("<HBBBBB", 9999, 12, 31, 23, 59, 0)
    with pytest.raises(GattError):
        parse_glucose(bytes([0x01]) + struct.pack("<H", 1) + base + struct.pack("<h", 32767))


# -- Glucose Measurement Context 0x2A34 -------------------------------------------------


def context_bytes(flags: int) -> bytes:
    b = bytes([flags]) + struct.pack("<H", 7)
    if flags & 0x80:
        b += bytes([0x00])
    if flags & 0x01:
        b += bytes([1]) + struct.pack("<H", 0xE005)  # breakfast, (5, -2) = 0.05 kg
    if flags & 0x02:
        b += bytes([1])  # preprandial
    if flags & 0x04:
        b += bytes([0x51])  # tester 1 self (low), health 5 no issues (high)
    if flags & 0x08:
        b += struct.pack("<HB", 1800, 60)
    if flags & 0x10:
        b += bytes([1]) + struct.pack("<H", 0xA014)  # rapid-acting, (20, -6)
    if flags & 0x40:
        b += struct.pack("<H", 0xF041)  # (65, -1) = 6.5 %
    return b


@pytest.mark.parametrize("flags", range(256))
def test_glucose_context_all_flags(flags: int) -> None:
    r = parse_glucose_context(context_bytes(flags))
    assert isinstance(r, GlucoseMeasurementContext)
    assert r.samples == () and r.sequence_number == 7 and r.flags == flags
    assert r.extended_flags == (0 if flags & 0x80 else None)
    if flags & 0x01:
        assert r.carbohydrate_id == 1 and r.carbohydrate is not None
        assert r.carbohydrate.value == 0.05
    else:
        assert r.carbohydrate_id is None and r.carbohydrate is None
    assert r.meal == (Meal.PREPRANDIAL if flags & 0x02 else None)
    if flags & 0x04:
        assert (r.tester, r.health) == (GlucoseTester.SELF, GlucoseHealth.NO_HEALTH_ISSUES)
    else:
        assert (r.tester, r.health) == (None, None)
    assert (r.exercise_duration, r.exercise_intensity) == (
        (1800, 60) if flags & 0x08 else (None, None)
    )
    if flags & 0x10:
        assert r.medication is not None and r.medication.value == 20e-6
        assert r.medication_unit == ("L" if flags & 0x20 else "kg")
    else:
        assert r.medication is None and r.medication_unit is None
    assert (r.hba1c.value if r.hba1c else None) == (6.5 if flags & 0x40 else None)


# -- Errors shared by all parsers --------------------------------------------------------

ALL_FLAGS = [
    (parse_heart_rate, hr_bytes(0x1F)),
    (parse_plx_spot_check, spot_bytes(0x1F)),
    (parse_plx_continuous, cont_bytes(0x1F)),
    (parse_temperature, temp_bytes(0x07)),
    (parse_blood_pressure, bp_bytes(0x1F)),
    (parse_weight, weight_bytes(0x0F)),
    (parse_glucose, glucose_bytes(0x1F)),
    (parse_glucose_context, context_bytes(0xFF)),
]


@pytest.mark.parametrize(("parse", "data"), ALL_FLAGS)
def test_every_prefix_is_truncated(parse: object, data: bytes) -> None:
    assert callable(parse)
    parse(data)
    for n in range(len(data)):
        if parse is parse_heart_rate and n == len(data) - 2:
            continue  # one RR interval fewer is still a valid PDU
        with pytest.raises(GattError) as ei:
            parse(data[:n])
        assert ei.value.problem == "truncated"
        assert ei.value.offset is not None and ei.value.offset <= n


@pytest.mark.parametrize(("parse", "data"), [a for a in ALL_FLAGS if a[0] is not parse_heart_rate])
def test_trailing_byte_is_malformed(parse: object, data: bytes) -> None:
    assert callable(parse)
    with pytest.raises(GattError) as ei:
        parse(data + b"\x00")
    assert ei.value.problem == "malformed" and ei.value.offset == len(data)


@pytest.mark.parametrize(
    ("dt", "offset"),
    [
        (struct.pack("<HBBBBB", 2024, 2, 30, 0, 0, 0), 5),  # Feb 30
        (struct.pack("<HBBBBB", 2024, 13, 1, 0, 0, 0), 5),
        (struct.pack("<HBBBBB", 2024, 1, 1, 24, 0, 0), 5),
        (struct.pack("<HBBBBB", 1000, 1, 1, 0, 0, 0), 5),
        (struct.pack("<HBBBBB", 0, 13, 0, 0, 0, 0), 5),
    ],
)
def test_bad_date_time_is_malformed(dt: bytes, offset: int) -> None:
    with pytest.raises(GattError) as ei:
        parse_temperature(bytes([0x02]) + struct.pack("<I", 0xFF00016D) + dt)
    assert ei.value.problem == "malformed" and ei.value.offset == offset


def test_gatt_error_is_wire_format_error_and_pickles() -> None:
    import pickle

    from vitalproof.errors import WireFormatError

    with pytest.raises(WireFormatError) as ei:
        parse_weight(b"\x00")
    e = ei.value
    assert isinstance(e, GattError)
    e2 = pickle.loads(pickle.dumps(e))
    assert str(e2) == str(e) == "2a9d: truncated at byte 1: Weight needs 2 bytes, got 0"
    assert e.diagnostics() == str(e)
