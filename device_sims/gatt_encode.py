"""Spec-exact encoders: what a simulated BLE peripheral notifies, and round-trip test input.

Each encoder is the mirror of a parser in :mod:`ingest.gatt.parsers` and writes the same GSS
layout (see the parser docstrings for the field tables): the Flags byte is derived from
which optional arguments are given, so a simulator cannot send a flag without its field.
Integer fields take wire units (RR intervals in 1/1024 s, status bit masks); weight,
BMI and height take kg/lb, kg/m2 and m/in and are rounded to the wire resolution; 11073
float fields accept an ``MderFloat`` (exact), a float or an ``ieee11073.Special``.

Bad arguments (a value that does not fit its field) raise ValueError: they are programming
errors in the simulator, not wire-format errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from vitalproof.wire.ieee11073 import (
    MderFloat,
    Special,
    encode_float,
    encode_sfloat,
    float_from_value,
    sfloat_from_value,
)

Num = MderFloat | Special | float

__all__ = [
    "Num",
    "encode_blood_pressure",
    "encode_date_time",
    "encode_glucose",
    "encode_glucose_context",
    "encode_heart_rate",
    "encode_plx_continuous",
    "encode_plx_spot_check",
    "encode_temperature",
    "encode_weight",
    "glucose_mg_dl",
    "glucose_mmol_l",
    "rr_from_ms",
]


def _uint(value: int, size: int, what: str) -> bytes:
    if not 0 <= value < 1 << (8 * size):
        raise ValueError(f"{what} {value} does not fit uint{8 * size}")
    return value.to_bytes(size, "little")


def _sint16(value: int, what: str) -> bytes:
    if not -0x8000 <= value <= 0x7FFF:
        raise ValueError(f"{what} {value} does not fit sint16")
    return value.to_bytes(2, "little", signed=True)


def _mder(x: Num) -> MderFloat:
    if isinstance(x, MderFloat):
        return x
    if isinstance(x, Special):
        return MderFloat.of(x)
    return sfloat_from_value(x)


def _sfloat(x: Num) -> bytes:
    return encode_sfloat(_mder(x)).to_bytes(2, "little")


def _float32(x: Num) -> bytes:
    if isinstance(x, MderFloat):
        m = x
    elif isinstance(x, Special):
        m = MderFloat.of(x)
    else:
        m = float_from_value(x)
    return encode_float(m).to_bytes(4, "little")


def encode_date_time(ts: datetime | None) -> bytes:
    """GSS Date Time (7 bytes); ``None`` encodes "not known" (all zero)."""
    if ts is None:
        return bytes(7)
    if not 1582 <= ts.year <= 9999:
        raise ValueError(f"year {ts.year} outside 1582..9999")
    return ts.year.to_bytes(2, "little") + bytes([ts.month, ts.day, ts.hour, ts.minute, ts.second])


def rr_from_ms(ms: float) -> int:
    """An RR interval in ms as the 1/1024 s integer the HRS carries."""
    return round(ms * 1024 / 1000)


def glucose_mg_dl(value: float) -> MderFloat:
    """mg/dL as the kg/L SFLOAT the wire carries (exponent shifted by -5, exact)."""
    m = sfloat_from_value(value)
    return m if m.is_special else MderFloat(m.mantissa, m.exponent - 5)


def glucose_mmol_l(value: float) -> MderFloat:
    """mmol/L as the mol/L SFLOAT the wire carries (exponent shifted by -3, exact)."""
    m = sfloat_from_value(value)
    return m if m.is_special else MderFloat(m.mantissa, m.exponent - 3)


def encode_heart_rate(
    heart_rate: int,
    *,
    wide: bool | None = None,
    contact: bool | None = None,
    energy_expended: int | None = None,
    rr_intervals: Sequence[int] = (),
) -> bytes:
    """Heart Rate Measurement 0x2A37.

    ``wide`` forces the uint16 format (default: only when the value needs it);
    ``contact`` None = sensor contact not supported, else supported and (not) detected;
    ``rr_intervals`` in 1/1024 s (see :func:`rr_from_ms`).
    """
    if wide is None:
        wide = heart_rate > 0xFF
    flags = 0x01 if wide else 0
    if contact is not None:
        flags |= 0x06 if contact else 0x04
    out = bytearray()
    out += _uint(heart_rate, 2 if wide else 1, "heart rate")
    if energy_expended is not None:
        flags |= 0x08
        out += _uint(energy_expended, 2, "energy expended")
    if rr_intervals:
        flags |= 0x10
        for rr in rr_intervals:
            out += _uint(rr, 2, "RR interval")
    return bytes([flags]) + bytes(out)


def encode_plx_spot_check(
    spo2: Num,
    pulse_rate: Num,
    *,
    timestamp: datetime | None = None,
    measurement_status: int | None = None,
    device_sensor_status: int | None = None,
    pulse_amplitude_index: Num | None = None,
    device_clock_not_set: bool = False,
) -> bytes:
    """PLX Spot-Check Measurement 0x2A5E."""
    flags = 0x10 if device_clock_not_set else 0
    out = bytearray(_sfloat(spo2) + _sfloat(pulse_rate))
    if timestamp is not None:
        flags |= 0x01
        out += encode_date_time(timestamp)
    if measurement_status is not None:
        flags |= 0x02
        out += _uint(measurement_status, 2, "measurement status")
    if device_sensor_status is not None:
        flags |= 0x04
        out += _uint(device_sensor_status, 3, "device and sensor status")
    if pulse_amplitude_index is not None:
        flags |= 0x08
        out += _sfloat(pulse_amplitude_index)
    return bytes([flags]) + bytes(out)


def encode_plx_continuous(
    spo2: Num,
    pulse_rate: Num,
    *,
    fast: tuple[Num, Num] | None = None,
    slow: tuple[Num, Num] | None = None,
    measurement_status: int | None = None,
    device_sensor_status: int | None = None,
    pulse_amplitude_index: Num | None = None,
) -> bytes:
    """PLX Continuous Measurement 0x2A5F; ``fast``/``slow`` are (SpO2, PR) pairs."""
    flags = 0
    out = bytearray(_sfloat(spo2) + _sfloat(pulse_rate))
    if fast is not None:
        flags |= 0x01
        out += _sfloat(fast[0]) + _sfloat(fast[1])
    if slow is not None:
        flags |= 0x02
        out += _sfloat(slow[0]) + _sfloat(slow[1])
    if measurement_status is not None:
        flags |= 0x04
        out += _uint(measurement_status, 2, "measurement status")
    if device_sensor_status is not None:
        flags |= 0x08
        out += _uint(device_sensor_status, 3, "device and sensor status")
    if pulse_amplitude_index is not None:
        flags |= 0x10
        out += _sfloat(pulse_amplitude_index)
    return bytes([flags]) + bytes(out)


def encode_temperature(
    value: Num,
    *,
    fahrenheit: bool = False,
    timestamp: datetime | None = None,
    temperature_type: int | None = None,
) -> bytes:
    """Temperature Measurement 0x2A1C (value is a 32-bit FLOAT)."""
    flags = 0x01 if fahrenheit else 0
    out = bytearray(_float32(value))
    if timestamp is not None:
        flags |= 0x02
        out += encode_date_time(timestamp)
    if temperature_type is not None:
        flags |= 0x04
        out += _uint(temperature_type, 1, "temperature type")
    return bytes([flags]) + bytes(out)


def encode_blood_pressure(
    systolic: Num,
    diastolic: Num,
    mean_arterial: Num,
    *,
    kpa: bool = False,
    timestamp: datetime | None = None,
    pulse_rate: Num | None = None,
    user_id: int | None = None,
    measurement_status: int | None = None,
) -> bytes:
    """Blood Pressure Measurement 0x2A35 (pressures in mmHg, or kPa with ``kpa``)."""
    flags = 0x01 if kpa else 0
    out = bytearray(_sfloat(systolic) + _sfloat(diastolic) + _sfloat(mean_arterial))
    if timestamp is not None:
        flags |= 0x02
        out += encode_date_time(timestamp)
    if pulse_rate is not None:
        flags |= 0x04
        out += _sfloat(pulse_rate)
    if user_id is not None:
        flags |= 0x08
        out += _uint(user_id, 1, "user id")
    if measurement_status is not None:
        flags |= 0x10
        out += _uint(measurement_status, 2, "measurement status")
    return bytes([flags]) + bytes(out)


def encode_weight(
    weight: float | None,
    *,
    imperial: bool = False,
    timestamp: datetime | None = None,
    user_id: int | None = None,
    bmi: float | None = None,
    height: float | None = None,
) -> bytes:
    """Weight Measurement 0x2A9D.

    ``weight`` in kg (SI) or lb (imperial), rounded to 0.005 kg / 0.01 lb; ``None`` sends
    "Measurement Unsuccessful" (0xFFFF). ``bmi`` (kg/m2) and ``height`` (m or in) go
    together, as one flag covers both.
    """
    flags = 0x01 if imperial else 0
    if weight is None:
        raw = 0xFFFF
    else:
        raw = round(weight * 100) if imperial else round(weight * 200)
        if raw == 0xFFFF:
            raise ValueError("weight would encode as 'Measurement Unsuccessful'")
    out = bytearray(_uint(raw, 2, "weight"))
    if timestamp is not None:
        flags |= 0x02
        out += encode_date_time(timestamp)
    if user_id is not None:
        flags |= 0x04
        out += _uint(user_id, 1, "user id")
    if (bmi is None) != (height is None):
        raise ValueError("BMI and height are sent together or not at all")
    if bmi is not None and height is not None:
        flags |= 0x08
        out += _uint(round(bmi * 10), 2, "BMI")
        out += _uint(round(height * 10) if imperial else round(height * 1000), 2, "height")
    return bytes([flags]) + bytes(out)


def encode_glucose(
    sequence_number: int,
    base_time: datetime | None,
    *,
    time_offset: int | None = None,
    concentration: Num | None = None,
    mol_per_litre: bool = False,
    glucose_type: int = 1,
    sample_location: int = 1,
    sensor_status: int | None = None,
    context_follows: bool = False,
) -> bytes:
    """Glucose Measurement 0x2A18.

    ``concentration`` is in wire units, kg/L (or mol/L with ``mol_per_litre``): use
    :func:`glucose_mg_dl` / :func:`glucose_mmol_l` to give clinical units exactly.
    ``time_offset`` in minutes; ``base_time`` None sends "not known".
    """
    flags = 0x04 if mol_per_litre else 0
    if context_follows:
        flags |= 0x10
    out = bytearray(_uint(sequence_number, 2, "sequence number"))
    out += encode_date_time(base_time)
    if time_offset is not None:
        flags |= 0x01
        out += _sint16(time_offset, "time offset")
    if concentration is not None:
        flags |= 0x02
        if not (0 <= glucose_type <= 15 and 0 <= sample_location <= 15):
            raise ValueError("glucose type and sample location are 4-bit values")
        out += _sfloat(concentration) + bytes([glucose_type | sample_location << 4])
    if sensor_status is not None:
        flags |= 0x08
        out += _uint(sensor_status, 2, "sensor status annunciation")
    return bytes([flags]) + bytes(out)


def encode_glucose_context(
    sequence_number: int,
    *,
    extended_flags: int | None = None,
    carbohydrate: tuple[int, Num] | None = None,
    meal: int | None = None,
    tester_health: tuple[int, int] | None = None,
    exercise: tuple[int, int] | None = None,
    medication: tuple[int, Num] | None = None,
    medication_in_litres: bool = False,
    hba1c: Num | None = None,
) -> bytes:
    """Glucose Measurement Context 0x2A34.

    ``carbohydrate`` = (id, kg), ``tester_health`` = (tester, health) nibbles,
    ``exercise`` = (duration s, intensity %), ``medication`` = (id, kg or L).
    """
    flags = 0x20 if medication_in_litres else 0
    out = bytearray(_uint(sequence_number, 2, "sequence number"))
    if extended_flags is not None:
        flags |= 0x80
        out += _uint(extended_flags, 1, "extended flags")
    if carbohydrate is not None:
        flags |= 0x01
        out += _uint(carbohydrate[0], 1, "carbohydrate id") + _sfloat(carbohydrate[1])
    if meal is not None:
        flags |= 0x02
        out += _uint(meal, 1, "meal")
    if tester_health is not None:
        flags |= 0x04
        tester, health = tester_health
        if not (0 <= tester <= 15 and 0 <= health <= 15):
            raise ValueError("tester and health are 4-bit values")
        out += bytes([tester | health << 4])
    if exercise is not None:
        flags |= 0x08
        out += _uint(exercise[0], 2, "exercise duration") + _uint(
            exercise[1], 1, "exercise intensity"
        )
    if medication is not None:
        flags |= 0x10
        out += _uint(medication[0], 1, "medication id") + _sfloat(medication[1])
    if hba1c is not None:
        flags |= 0x40
        out += _sfloat(hba1c)
    return bytes([flags]) + bytes(out)
