"""Parsers for the health characteristics our devices notify: bytes in, dataclasses out.

Layouts follow the Bluetooth GATT Specification Supplement (GSS), cited per parser by the
characteristic's section name and identifier (org.bluetooth.characteristic.*) because section
numbers move between GSS revisions. All multi-byte fields are little-endian. Fields are
present or absent according to the Flags field, so parsing walks the PDU with a cursor and
every read is length-checked: truncated or malformed bytes raise :class:`GattError` naming
the byte, never IndexError or struct.error, because a capture from a misbehaving device has
to be diagnosable from the message alone.

Bits that the GSS marks "Reserved for Future Use" are ignored when set (a newer device may
set them) but kept in the ``flags`` field; bytes left over after the last field the flags
announce are an error, since we could not know what they mean.

Readings are :class:`GattSample` values in the metric names and UCUM units of
:mod:`vitalproof.units`. Units are reported as the device sent them ('[degF]', 'kPa',
'[lb_av]', ...); normalization converts them later, except glucose, which the brief wants as
mg/dL or mmol/L straight away (the wire units kg/L and mol/L are not clinical units).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import IntEnum, IntFlag
from typing import ClassVar, TypeVar

from vitalproof.errors import WireFormatError
from vitalproof.schema import Quality
from vitalproof.units import Metric
from vitalproof.wire.gatt_numbers import Characteristic, full_uuid, short_uuid
from vitalproof.wire.ieee11073 import MderFloat, Special, decode_float, decode_sfloat


class GattError(WireFormatError):
    """A characteristic value that does not follow its GSS layout (or cannot be decoded).

    ``uuid`` is the characteristic (128-bit form when known), ``offset`` the byte where
    decoding stopped (the start of the field that could not be read), ``reason`` the detail
    and ``problem`` the kind ("truncated", "malformed", "bad hex", ...).
    """

    def __init__(
        self,
        uuid: str,
        message: str,
        *,
        offset: int | None = None,
        problem: str = "malformed",
    ) -> None:
        super().__init__(message, offset=offset)
        self.uuid = uuid
        self.problem = problem

    def __str__(self) -> str:
        head = self.problem
        if self.offset is not None:
            head = f"{head} at byte {self.offset}" if head else f"at byte {self.offset}"
        short = short_uuid(self.uuid)
        return f"{short}: {head}: {self.reason}" if head else f"{short}: {self.reason}"

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_gatt_error, (self.uuid, self.reason, self.offset, self.problem))

    def diagnostics(self) -> str:
        return str(self)


def _rebuild_gatt_error(uuid: str, message: str, offset: int | None, problem: str) -> GattError:
    return GattError(uuid, message, offset=offset, problem=problem)


@dataclass(frozen=True, slots=True)
class GattSample:
    """One reading taken from a characteristic value.

    ``value`` is NaN exactly when ``quality`` has ``Quality.INVALID`` (an 11073 special value
    or a "measurement unsuccessful" code); ``special`` then says which one, when it was an
    11073 special. ``timestamp`` is the device's own clock (timezone-naive, as the GSS Date
    Time carries no zone) when the characteristic carries one.
    """

    metric: Metric
    value: float
    unit: str
    quality: Quality = Quality.NONE
    timestamp: datetime | None = None
    special: Special | None = None


@dataclass(frozen=True, slots=True)
class GattResult:
    """Base of every parsed characteristic: its readings plus the raw Flags field."""

    UUID16: ClassVar[int] = 0
    NAME: ClassVar[str] = ""

    samples: tuple[GattSample, ...]
    flags: int


# --------------------------------------------------------------------------------------
# Cursor over the PDU


class _Reader:
    """Length-checked little-endian reads; every failure is a :class:`GattError`."""

    __slots__ = ("data", "pos", "uuid")

    def __init__(self, uuid16: int, data: bytes) -> None:
        self.uuid = full_uuid(uuid16)
        self.data = bytes(data)
        self.pos = 0

    def _take(self, n: int, what: str) -> bytes:
        left = len(self.data) - self.pos
        if left < n:
            raise GattError(
                self.uuid,
                f"{what} needs {n} byte{'s' if n != 1 else ''}, got {left}",
                offset=self.pos,
                problem="truncated",
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, n: int, what: str) -> int:
        return int.from_bytes(self._take(n, what), "little")

    def u8(self, what: str) -> int:
        return self.uint(1, what)

    def u16(self, what: str) -> int:
        return self.uint(2, what)

    def s16(self, what: str) -> int:
        return int.from_bytes(self._take(2, what), "little", signed=True)

    def sfloat(self, what: str) -> MderFloat:
        return decode_sfloat(self.u16(what))

    def float32(self, what: str) -> MderFloat:
        return decode_float(self.uint(4, what))

    def left(self) -> int:
        return len(self.data) - self.pos

    def malformed(self, message: str, offset: int) -> GattError:
        return GattError(self.uuid, message, offset=offset)

    def date_time(self, what: str) -> datetime | None:
        """GSS "Date Time" (org.bluetooth.characteristic.date_time): 7 bytes.

        Year uint16 (1582..9999, 0 = not known), Month uint8 (1..12, 0 = not known),
        Day uint8 (1..31, 0 = not known), Hours 0..23, Minutes 0..59, Seconds 0..59.
        A date the device does not know yields ``None`` (no device time, not an error);
        values out of range or a date that does not exist (Feb 30) are malformed.
        """
        start = self.pos
        year = self.u16(what)
        month, day, hour, minute, second = (self.u8(what) for _ in range(5))
        if year == 0 or month == 0 or day == 0:
            if not (year == 0 or 1582 <= year <= 9999) or month > 12 or day > 31:
                raise self.malformed(f"{what}: invalid date/time fields", start)
            if hour > 23 or minute > 59 or second > 59:
                raise self.malformed(f"{what}: invalid time of day", start + 4)
            return None
        if not 1582 <= year <= 9999:
            raise self.malformed(f"{what}: year {year} outside 1582..9999", start)
        try:
            return datetime(year, month, day, hour, minute, second)
        except ValueError as e:
            raise self.malformed(f"{what}: {e}", start) from None

    def end(self) -> None:
        if self.pos != len(self.data):
            n = len(self.data) - self.pos
            raise self.malformed(
                f"{n} unexpected trailing byte{'s' if n != 1 else ''} after the last field",
                self.pos,
            )


def _mder_sample(
    metric: Metric,
    x: MderFloat,
    unit: str,
    timestamp: datetime | None,
    quality: Quality = Quality.NONE,
    *,
    shift: int = 0,
) -> GattSample:
    """A sample from an 11073 float: specials become NaN + INVALID, never a number."""
    if x.special is not None:
        return GattSample(metric, math.nan, unit, quality | Quality.INVALID, timestamp, x.special)
    return GattSample(metric, x.scaled(shift), unit, quality, timestamp)


_E = TypeVar("_E", bound=IntEnum)


def _enum_or_int(cls: type[_E], raw: int) -> _E | int:
    """The enum member for ``raw``, or ``raw`` itself for reserved values (kept, not lost)."""
    try:
        return cls(raw)
    except ValueError:
        return raw


# --------------------------------------------------------------------------------------
# Heart Rate Measurement 0x2A37


class SensorContact(IntEnum):
    """Flags bits 1-2 of Heart Rate Measurement (value = bits >> 1)."""

    NOT_SUPPORTED = 0  # 0b00 and 0b01 both mean "not supported"
    NOT_DETECTED = 2
    DETECTED = 3


@dataclass(frozen=True, slots=True)
class HeartRateMeasurement(GattResult):
    """Heart Rate Measurement; ``rr_intervals`` are raw, in 1/1024 s (samples carry ms)."""

    UUID16: ClassVar[int] = Characteristic.HEART_RATE_MEASUREMENT
    NAME: ClassVar[str] = "Heart Rate Measurement"

    heart_rate: int
    sensor_contact: SensorContact
    energy_expended: int | None
    rr_intervals: tuple[int, ...]


def parse_heart_rate(data: bytes) -> HeartRateMeasurement:
    """GSS "Heart Rate Measurement" (org.bluetooth.characteristic.heart_rate_measurement).

    Flags: bit 0 value format (0 uint8, 1 uint16 bpm); bits 1-2 sensor contact status
    (0b0x not supported, 0b10 supported & not detected, 0b11 supported & detected);
    bit 3 Energy Expended (uint16 kJ) present; bit 4 RR-Interval present (one or more uint16
    in 1/1024 s, filling the rest of the PDU); bits 5-7 RFU.

    "Supported but not detected" flags the heart-rate and RR samples NO_SENSOR_CONTACT: the
    HRS says the value may then be meaningless, and we flag rather than drop. Energy
    Expended is a counter since the last reset, not a measurement, so it is not flagged.
    """
    r = _Reader(Characteristic.HEART_RATE_MEASUREMENT, data)
    flags = r.u8("Flags")
    hr = (
        r.u16("Heart Rate Measurement Value (uint16)")
        if flags & 0x01
        else r.u8("Heart Rate Measurement Value (uint8)")
    )
    contact_bits = (flags >> 1) & 0x03
    contact = SensorContact.NOT_SUPPORTED if contact_bits < 2 else SensorContact(contact_bits)
    q = Quality.NO_SENSOR_CONTACT if contact is SensorContact.NOT_DETECTED else Quality.NONE
    energy = r.u16("Energy Expended") if flags & 0x08 else None
    rr: list[int] = []
    if flags & 0x10:
        rr.append(r.u16("RR interval"))
        while r.left():
            rr.append(r.u16("RR interval"))
    r.end()
    samples = [GattSample(Metric.HEART_RATE, float(hr), "/min", q)]
    if energy is not None:
        samples.append(GattSample(Metric.ENERGY_EXPENDED, float(energy), "kJ"))
    samples.extend(GattSample(Metric.RR_INTERVAL, v * 1000 / 1024, "ms", q) for v in rr)
    return HeartRateMeasurement(tuple(samples), flags, hr, contact, energy, tuple(rr))


# --------------------------------------------------------------------------------------
# Pulse oximetry: PLX Spot-Check 0x2A5E, PLX Continuous 0x2A5F


class PlxMeasurementStatus(IntFlag):
    """GSS PLX "Measurement Status" field (uint16); bits 0-4 RFU."""

    MEASUREMENT_ONGOING = 1 << 5
    EARLY_ESTIMATED_DATA = 1 << 6
    VALIDATED_DATA = 1 << 7
    FULLY_QUALIFIED_DATA = 1 << 8
    DATA_FROM_MEASUREMENT_STORAGE = 1 << 9
    DATA_FOR_DEMONSTRATION = 1 << 10
    DATA_FOR_TESTING = 1 << 11
    CALIBRATION_ONGOING = 1 << 12
    MEASUREMENT_UNAVAILABLE = 1 << 13
    QUESTIONABLE_MEASUREMENT_DETECTED = 1 << 14
    INVALID_MEASUREMENT_DETECTED = 1 << 15


class PlxDeviceSensorStatus(IntFlag):
    """GSS PLX "Device and Sensor Status" field (uint24); bits 16-23 RFU."""

    EXTENDED_DISPLAY_UPDATE_ONGOING = 1 << 0
    EQUIPMENT_MALFUNCTION_DETECTED = 1 << 1
    SIGNAL_PROCESSING_IRREGULARITY_DETECTED = 1 << 2
    INADEQUATE_SIGNAL_DETECTED = 1 << 3
    POOR_SIGNAL_DETECTED = 1 << 4
    LOW_PERFUSION_DETECTED = 1 << 5
    ERRATIC_SIGNAL_DETECTED = 1 << 6
    NONPULSATILE_SIGNAL_DETECTED = 1 << 7
    QUESTIONABLE_PULSE_DETECTED = 1 << 8
    SIGNAL_ANALYSIS_ONGOING = 1 << 9
    SENSOR_INTERFERENCE_DETECTED = 1 << 10
    SENSOR_UNCONNECTED_TO_USER = 1 << 11
    UNKNOWN_SENSOR_CONNECTED = 1 << 12
    SENSOR_DISPLACED = 1 << 13
    SENSOR_MALFUNCTIONING = 1 << 14
    SENSOR_DISCONNECTED = 1 << 15


def _plx_quality(status: PlxDeviceSensorStatus | None) -> Quality:
    """Flag NO_SENSOR_CONTACT on "Sensor Unconnected to User": that is exactly no skin contact."""
    if status is not None and status & PlxDeviceSensorStatus.SENSOR_UNCONNECTED_TO_USER:
        return Quality.NO_SENSOR_CONTACT
    return Quality.NONE


@dataclass(frozen=True, slots=True)
class SpO2PR:
    """One SpO2/pulse-rate pair (the fast or slow averages of PLX Continuous)."""

    spo2: GattSample
    pulse_rate: GattSample


@dataclass(frozen=True, slots=True)
class PlxSpotCheckMeasurement(GattResult):
    UUID16: ClassVar[int] = Characteristic.PLX_SPOT_CHECK
    NAME: ClassVar[str] = "PLX Spot-Check Measurement"

    timestamp: datetime | None
    measurement_status: PlxMeasurementStatus | None
    device_sensor_status: PlxDeviceSensorStatus | None
    device_clock_not_set: bool


def parse_plx_spot_check(data: bytes) -> PlxSpotCheckMeasurement:
    """GSS "PLX Spot-Check Measurement" (org.bluetooth.characteristic.plx_spot_check_measurement).

    Flags uint8: bit 0 Timestamp present, bit 1 Measurement Status present, bit 2 Device and
    Sensor Status present, bit 3 Pulse Amplitude Index present, bit 4 Device Clock is Not
    Set; bits 5-7 RFU. Fields: SpO2 (SFLOAT %), PR (SFLOAT bpm), Timestamp (Date Time),
    Measurement Status (uint16), Device and Sensor Status (uint24), PAI (SFLOAT %).
    The timestamp is kept on the samples even with "clock not set" (normalization's clock
    checks judge it); ``device_clock_not_set`` tells the caller.
    """
    r = _Reader(Characteristic.PLX_SPOT_CHECK, data)
    flags = r.u8("Flags")
    spo2 = r.sfloat("SpO2")
    pr = r.sfloat("PR")
    ts = r.date_time("Timestamp") if flags & 0x01 else None
    ms = PlxMeasurementStatus(r.u16("Measurement Status")) if flags & 0x02 else None
    dss = PlxDeviceSensorStatus(r.uint(3, "Device and Sensor Status")) if flags & 0x04 else None
    pai = r.sfloat("Pulse Amplitude Index") if flags & 0x08 else None
    r.end()
    q = _plx_quality(dss)
    samples = [
        _mder_sample(Metric.SPO2, spo2, "%", ts, q),
        _mder_sample(Metric.PULSE_RATE, pr, "/min", ts, q),
    ]
    if pai is not None:
        samples.append(_mder_sample(Metric.PULSE_AMPLITUDE_INDEX, pai, "%", ts, q))
    return PlxSpotCheckMeasurement(tuple(samples), flags, ts, ms, dss, bool(flags & 0x10))


@dataclass(frozen=True, slots=True)
class PlxContinuousMeasurement(GattResult):
    """PLX Continuous; ``samples`` hold the Normal values, ``fast``/``slow`` the others.

    Fast and slow are other averaging windows of the same moment; keeping them out of
    ``samples`` keeps one spo2 and one pulse_rate reading per notification.
    """

    UUID16: ClassVar[int] = Characteristic.PLX_CONTINUOUS
    NAME: ClassVar[str] = "PLX Continuous Measurement"

    fast: SpO2PR | None
    slow: SpO2PR | None
    measurement_status: PlxMeasurementStatus | None
    device_sensor_status: PlxDeviceSensorStatus | None


def parse_plx_continuous(data: bytes) -> PlxContinuousMeasurement:
    """GSS "PLX Continuous Measurement" (org.bluetooth.characteristic.plx_continuous_measurement).

    Flags uint8: bit 0 SpO2PR-Fast present, bit 1 SpO2PR-Slow present, bit 2 Measurement
    Status present, bit 3 Device and Sensor Status present, bit 4 Pulse Amplitude Index
    present; bits 5-7 RFU. Fields: SpO2PR-Normal (SpO2, PR SFLOATs), SpO2PR-Fast,
    SpO2PR-Slow, Measurement Status (uint16), Device and Sensor Status (uint24), PAI (SFLOAT).
    No timestamp: the values are current.
    """
    r = _Reader(Characteristic.PLX_CONTINUOUS, data)
    flags = r.u8("Flags")
    spo2 = r.sfloat("SpO2PR-Normal SpO2")
    pr = r.sfloat("SpO2PR-Normal PR")
    fast = (r.sfloat("SpO2PR-Fast SpO2"), r.sfloat("SpO2PR-Fast PR")) if flags & 0x01 else None
    slow = (r.sfloat("SpO2PR-Slow SpO2"), r.sfloat("SpO2PR-Slow PR")) if flags & 0x02 else None
    ms = PlxMeasurementStatus(r.u16("Measurement Status")) if flags & 0x04 else None
    dss = PlxDeviceSensorStatus(r.uint(3, "Device and Sensor Status")) if flags & 0x08 else None
    pai = r.sfloat("Pulse Amplitude Index") if flags & 0x10 else None
    r.end()
    q = _plx_quality(dss)

    def pair(p: tuple[MderFloat, MderFloat] | None) -> SpO2PR | None:
        if p is None:
            return None
        return SpO2PR(
            _mder_sample(Metric.SPO2, p[0], "%", None, q),
            _mder_sample(Metric.PULSE_RATE, p[1], "/min", None, q),
        )

    samples = [
        _mder_sample(Metric.SPO2, spo2, "%", None, q),
        _mder_sample(Metric.PULSE_RATE, pr, "/min", None, q),
    ]
    if pai is not None:
        samples.append(_mder_sample(Metric.PULSE_AMPLITUDE_INDEX, pai, "%", None, q))
    return PlxContinuousMeasurement(tuple(samples), flags, pair(fast), pair(slow), ms, dss)


# --------------------------------------------------------------------------------------
# Temperature Measurement 0x2A1C


class TemperatureType(IntEnum):
    """GSS "Temperature Type" (org.bluetooth.characteristic.temperature_type); 0, 10-255 RFU."""

    ARMPIT = 1
    BODY = 2
    EAR = 3
    FINGER = 4
    GASTROINTESTINAL_TRACT = 5
    MOUTH = 6
    RECTUM = 7
    TOE = 8
    TYMPANUM = 9


@dataclass(frozen=True, slots=True)
class TemperatureMeasurement(GattResult):
    UUID16: ClassVar[int] = Characteristic.TEMPERATURE_MEASUREMENT
    NAME: ClassVar[str] = "Temperature Measurement"

    fahrenheit: bool
    timestamp: datetime | None
    temperature_type: TemperatureType | int | None


def parse_temperature(data: bytes) -> TemperatureMeasurement:
    """GSS "Temperature Measurement" (org.bluetooth.characteristic.temperature_measurement).

    Flags uint8: bit 0 units (0 Celsius, 1 Fahrenheit), bit 1 Time Stamp present, bit 2
    Temperature Type present; bits 3-7 RFU. Fields: Temperature (FLOAT), Time Stamp
    (Date Time), Temperature Type (uint8). Reported as body_temperature in 'Cel' or
    '[degF]' whatever the site: every GSS site is a body site.
    """
    r = _Reader(Characteristic.TEMPERATURE_MEASUREMENT, data)
    flags = r.u8("Flags")
    unit = "[degF]" if flags & 0x01 else "Cel"
    value = r.float32("Temperature Measurement Value")
    ts = r.date_time("Time Stamp") if flags & 0x02 else None
    ttype = _enum_or_int(TemperatureType, r.u8("Temperature Type")) if flags & 0x04 else None
    r.end()
    sample = _mder_sample(Metric.BODY_TEMPERATURE, value, unit, ts)
    return TemperatureMeasurement((sample,), flags, bool(flags & 0x01), ts, ttype)


# --------------------------------------------------------------------------------------
# Blood Pressure Measurement 0x2A35


class PulseRateRange(IntEnum):
    """Measurement Status bits 3-4 of Blood Pressure Measurement."""

    WITHIN_RANGE = 0
    EXCEEDS_UPPER_LIMIT = 1
    BELOW_LOWER_LIMIT = 2
    RESERVED = 3


@dataclass(frozen=True, slots=True)
class BloodPressureStatus:
    """GSS Blood Pressure Measurement "Measurement Status" (uint16); bits 6-15 RFU."""

    raw: int
    body_movement_detected: bool  # bit 0
    cuff_too_loose: bool  # bit 1
    irregular_pulse_detected: bool  # bit 2
    pulse_rate_range: PulseRateRange  # bits 3-4
    improper_measurement_position: bool  # bit 5

    @classmethod
    def from_raw(cls, raw: int) -> BloodPressureStatus:
        return cls(
            raw,
            bool(raw & 0x01),
            bool(raw & 0x02),
            bool(raw & 0x04),
            PulseRateRange((raw >> 3) & 0x03),
            bool(raw & 0x20),
        )


@dataclass(frozen=True, slots=True)
class BloodPressureMeasurement(GattResult):
    UUID16: ClassVar[int] = Characteristic.BLOOD_PRESSURE_MEASUREMENT
    NAME: ClassVar[str] = "Blood Pressure Measurement"

    kpa: bool
    timestamp: datetime | None
    user_id: int | None
    measurement_status: BloodPressureStatus | None


def parse_blood_pressure(data: bytes) -> BloodPressureMeasurement:
    """GSS "Blood Pressure Measurement" (org.bluetooth.characteristic.blood_pressure_measurement).

    Flags uint8: bit 0 units (0 mmHg, 1 kPa), bit 1 Time Stamp present, bit 2 Pulse Rate
    present, bit 3 User ID present, bit 4 Measurement Status present; bits 5-7 RFU.
    Fields: Systolic, Diastolic, Mean Arterial Pressure (SFLOATs in the flagged unit), Time
    Stamp (Date Time), Pulse Rate (SFLOAT bpm), User ID (uint8, 0xFF = unknown user),
    Measurement Status (uint16). A cuff that fails sends NaN: flagged INVALID, kept.
    """
    r = _Reader(Characteristic.BLOOD_PRESSURE_MEASUREMENT, data)
    flags = r.u8("Flags")
    unit = "kPa" if flags & 0x01 else "mm[Hg]"
    sys_ = r.sfloat("Systolic")
    dia = r.sfloat("Diastolic")
    mean = r.sfloat("Mean Arterial Pressure")
    ts = r.date_time("Time Stamp") if flags & 0x02 else None
    pulse = r.sfloat("Pulse Rate") if flags & 0x04 else None
    user = r.u8("User ID") if flags & 0x08 else None
    status = BloodPressureStatus.from_raw(r.u16("Measurement Status")) if flags & 0x10 else None
    r.end()
    samples = [
        _mder_sample(Metric.SYSTOLIC_BP, sys_, unit, ts),
        _mder_sample(Metric.DIASTOLIC_BP, dia, unit, ts),
        _mder_sample(Metric.MEAN_ARTERIAL_PRESSURE, mean, unit, ts),
    ]
    if pulse is not None:
        samples.append(_mder_sample(Metric.PULSE_RATE, pulse, "/min", ts))
    return BloodPressureMeasurement(tuple(samples), flags, bool(flags & 0x01), ts, user, status)


# --------------------------------------------------------------------------------------
# Weight Measurement 0x2A9D

WEIGHT_UNSUCCESSFUL = 0xFFFF


@dataclass(frozen=True, slots=True)
class WeightMeasurement(GattResult):
    """Weight Measurement; ``weight_raw`` etc. are the wire integers, samples the values."""

    UUID16: ClassVar[int] = Characteristic.WEIGHT_MEASUREMENT
    NAME: ClassVar[str] = "Weight Measurement"

    imperial: bool
    weight_raw: int
    timestamp: datetime | None
    user_id: int | None
    bmi_raw: int | None
    height_raw: int | None


def parse_weight(data: bytes) -> WeightMeasurement:
    """GSS "Weight Measurement" (org.bluetooth.characteristic.weight_measurement).

    Flags uint8: bit 0 units (0 SI, 1 imperial), bit 1 Time Stamp present, bit 2 User ID
    present, bit 3 BMI and Height present; bits 4-7 RFU. Fields: Weight uint16 (SI
    0.005 kg, imperial 0.01 lb; 0xFFFF = "Measurement Unsuccessful"), Time Stamp (Date
    Time), User ID uint8 (0xFF unknown), BMI uint16 (0.1 kg/m2), Height uint16 (SI 0.001 m,
    imperial 0.1 in). Units: 'kg'/'[lb_av]', 'm'/'[in_i]', 'kg/m2'.
    """
    r = _Reader(Characteristic.WEIGHT_MEASUREMENT, data)
    flags = r.u8("Flags")
    imperial = bool(flags & 0x01)
    weight = r.u16("Weight")
    ts = r.date_time("Time Stamp") if flags & 0x02 else None
    user = r.u8("User ID") if flags & 0x04 else None
    bmi = r.u16("BMI") if flags & 0x08 else None
    height = r.u16("Height") if flags & 0x08 else None
    r.end()
    if weight == WEIGHT_UNSUCCESSFUL:
        w = GattSample(
            Metric.BODY_WEIGHT, math.nan, "[lb_av]" if imperial else "kg", Quality.INVALID, ts
        )
    elif imperial:
        w = GattSample(Metric.BODY_WEIGHT, weight / 100, "[lb_av]", Quality.NONE, ts)
    else:
        w = GattSample(Metric.BODY_WEIGHT, weight * 5 / 1000, "kg", Quality.NONE, ts)
    samples = [w]
    if bmi is not None and height is not None:
        samples.append(GattSample(Metric.BMI, bmi / 10, "kg/m2", Quality.NONE, ts))
        samples.append(
            GattSample(Metric.BODY_HEIGHT, height / 10, "[in_i]", Quality.NONE, ts)
            if imperial
            else GattSample(Metric.BODY_HEIGHT, height / 1000, "m", Quality.NONE, ts)
        )
    return WeightMeasurement(tuple(samples), flags, imperial, weight, ts, user, bmi, height)


# --------------------------------------------------------------------------------------
# Glucose Measurement 0x2A18 and Glucose Measurement Context 0x2A34


class GlucoseType(IntEnum):
    """Glucose Measurement "Type" nibble; 0 and 11-15 RFU."""

    CAPILLARY_WHOLE_BLOOD = 1
    CAPILLARY_PLASMA = 2
    VENOUS_WHOLE_BLOOD = 3
    VENOUS_PLASMA = 4
    ARTERIAL_WHOLE_BLOOD = 5
    ARTERIAL_PLASMA = 6
    UNDETERMINED_WHOLE_BLOOD = 7
    UNDETERMINED_PLASMA = 8
    INTERSTITIAL_FLUID = 9
    CONTROL_SOLUTION = 10


class SampleLocation(IntEnum):
    """Glucose Measurement "Sample Location" nibble; 0, 5-14 RFU."""

    FINGER = 1
    ALTERNATE_SITE_TEST = 2
    EARLOBE = 3
    CONTROL_SOLUTION = 4
    NOT_AVAILABLE = 15


class GlucoseSensorStatus(IntFlag):
    """Glucose Measurement "Sensor Status Annunciation" (uint16); bits 12-15 RFU."""

    DEVICE_BATTERY_LOW = 1 << 0
    SENSOR_MALFUNCTION = 1 << 1
    SAMPLE_SIZE_INSUFFICIENT = 1 << 2
    STRIP_INSERTION_ERROR = 1 << 3
    STRIP_TYPE_INCORRECT = 1 << 4
    RESULT_TOO_HIGH = 1 << 5
    RESULT_TOO_LOW = 1 << 6
    TEMPERATURE_TOO_HIGH = 1 << 7
    TEMPERATURE_TOO_LOW = 1 << 8
    READ_INTERRUPTED = 1 << 9
    GENERAL_DEVICE_FAULT = 1 << 10
    TIME_FAULT = 1 << 11


@dataclass(frozen=True, slots=True)
class GlucoseMeasurement(GattResult):
    UUID16: ClassVar[int] = Characteristic.GLUCOSE_MEASUREMENT
    NAME: ClassVar[str] = "Glucose Measurement"

    sequence_number: int
    base_time: datetime | None
    time_offset: int | None  # minutes
    mol_per_litre: bool
    glucose_type: GlucoseType | int | None
    sample_location: SampleLocation | int | None
    sensor_status: GlucoseSensorStatus | None
    context_follows: bool


def parse_glucose(data: bytes) -> GlucoseMeasurement:
    """GSS "Glucose Measurement" (org.bluetooth.characteristic.glucose_measurement).

    Flags uint8: bit 0 Time Offset present, bit 1 Glucose Concentration + Type-Sample
    Location present, bit 2 concentration units (0 kg/L, 1 mol/L), bit 3 Sensor Status
    Annunciation present, bit 4 Context Information Follows; bits 5-7 RFU. Fields: Sequence
    Number uint16, Base Time (Date Time), Time Offset sint16 minutes, Concentration SFLOAT,
    Type (low nibble) and Sample Location (high nibble) uint8, Sensor Status uint16.

    Device time = Base Time + Time Offset. Concentration is converted exactly (decimal
    exponent shift): kg/L x 100000 -> 'mg/dL', mol/L x 1000 -> 'mmol/L'.
    """
    r = _Reader(Characteristic.GLUCOSE_MEASUREMENT, data)
    flags = r.u8("Flags")
    seq = r.u16("Sequence Number")
    base_at = r.pos
    base = r.date_time("Base Time")
    offset = r.s16("Time Offset") if flags & 0x01 else None
    conc: MderFloat | None = None
    gtype: GlucoseType | int | None = None
    loc: SampleLocation | int | None = None
    if flags & 0x02:
        conc = r.sfloat("Glucose Concentration")
        tsl = r.u8("Type-Sample Location")
        gtype = _enum_or_int(GlucoseType, tsl & 0x0F)
        loc = _enum_or_int(SampleLocation, tsl >> 4)
    status = GlucoseSensorStatus(r.u16("Sensor Status Annunciation")) if flags & 0x08 else None
    r.end()
    ts = base
    if base is not None and offset is not None:
        try:
            ts = base + timedelta(minutes=offset)
        except OverflowError:
            raise r.malformed("Base Time + Time Offset is outside years 1..9999", base_at) from None
    mol = bool(flags & 0x04)
    samples: tuple[GattSample, ...] = ()
    if conc is not None:
        unit, shift = ("mmol/L", 3) if mol else ("mg/dL", 5)
        samples = (_mder_sample(Metric.BLOOD_GLUCOSE, conc, unit, ts, shift=shift),)
    return GlucoseMeasurement(
        samples, flags, seq, base, offset, mol, gtype, loc, status, bool(flags & 0x10)
    )


class Meal(IntEnum):
    PREPRANDIAL = 1
    POSTPRANDIAL = 2
    FASTING = 3
    CASUAL = 4
    BEDTIME = 5


class GlucoseTester(IntEnum):
    SELF = 1
    HEALTH_CARE_PROFESSIONAL = 2
    LAB_TEST = 3
    NOT_AVAILABLE = 15


class GlucoseHealth(IntEnum):
    MINOR_HEALTH_ISSUES = 1
    MAJOR_HEALTH_ISSUES = 2
    DURING_MENSES = 3
    UNDER_STRESS = 4
    NO_HEALTH_ISSUES = 5
    NOT_AVAILABLE = 15


class CarbohydrateId(IntEnum):
    BREAKFAST = 1
    LUNCH = 2
    DINNER = 3
    SNACK = 4
    DRINK = 5
    SUPPER = 6
    BRUNCH = 7


class MedicationId(IntEnum):
    RAPID_ACTING_INSULIN = 1
    SHORT_ACTING_INSULIN = 2
    INTERMEDIATE_ACTING_INSULIN = 3
    LONG_ACTING_INSULIN = 4
    PREMIXED_INSULIN = 5


@dataclass(frozen=True, slots=True)
class GlucoseMeasurementContext(GattResult):
    """Glucose Measurement Context: no vital-sign readings, only context for a sequence number.

    Amounts are ``MderFloat`` (wire value, special values preserved): carbohydrate in kg,
    medication in kg or L (``medication_unit``), HbA1c in %.
    """

    UUID16: ClassVar[int] = Characteristic.GLUCOSE_CONTEXT
    NAME: ClassVar[str] = "Glucose Measurement Context"

    sequence_number: int
    extended_flags: int | None
    carbohydrate_id: CarbohydrateId | int | None
    carbohydrate: MderFloat | None
    meal: Meal | int | None
    tester: GlucoseTester | int | None
    health: GlucoseHealth | int | None
    exercise_duration: int | None  # seconds; 0xFFFF = overrun
    exercise_intensity: int | None  # percent
    medication_id: MedicationId | int | None
    medication: MderFloat | None
    medication_unit: str | None  # 'kg' or 'L'
    hba1c: MderFloat | None


def parse_glucose_context(data: bytes) -> GlucoseMeasurementContext:
    """GSS "Glucose Measurement Context" (org.bluetooth.characteristic.glucose_measurement_context).

    Flags uint8: bit 0 Carbohydrate ID + Carbohydrate present, bit 1 Meal present, bit 2
    Tester-Health present, bit 3 Exercise Duration + Intensity present, bit 4 Medication ID +
    Medication present, bit 5 medication units (0 kg, 1 litres), bit 6 HbA1c present, bit 7
    Extended Flags present. Fields in order: Sequence Number uint16, Extended Flags uint8,
    Carbohydrate ID uint8, Carbohydrate SFLOAT kg, Meal uint8, Tester (low nibble) -
    Health (high nibble) uint8, Exercise Duration uint16 s, Exercise Intensity uint8 %, Medication
    ID uint8, Medication SFLOAT, HbA1c SFLOAT %.
    """
    r = _Reader(Characteristic.GLUCOSE_CONTEXT, data)
    flags = r.u8("Flags")
    seq = r.u16("Sequence Number")
    ext = r.u8("Extended Flags") if flags & 0x80 else None
    carb_id: CarbohydrateId | int | None = None
    carb: MderFloat | None = None
    if flags & 0x01:
        carb_id = _enum_or_int(CarbohydrateId, r.u8("Carbohydrate ID"))
        carb = r.sfloat("Carbohydrate")
    meal = _enum_or_int(Meal, r.u8("Meal")) if flags & 0x02 else None
    tester: GlucoseTester | int | None = None
    health: GlucoseHealth | int | None = None
    if flags & 0x04:
        th = r.u8("Tester-Health")
        tester, health = (
            _enum_or_int(GlucoseTester, th & 0x0F),
            _enum_or_int(GlucoseHealth, th >> 4),
        )
    duration = intensity = None
    if flags & 0x08:
        duration = r.u16("Exercise Duration")
        intensity = r.u8("Exercise Intensity")
    med_id: MedicationId | int | None = None
    med: MderFloat | None = None
    med_unit: str | None = None
    if flags & 0x10:
        med_id = _enum_or_int(MedicationId, r.u8("Medication ID"))
        med = r.sfloat("Medication")
        med_unit = "L" if flags & 0x20 else "kg"
    hba1c = r.sfloat("HbA1c") if flags & 0x40 else None
    r.end()
    return GlucoseMeasurementContext(
        (), flags, seq, ext, carb_id, carb, meal, tester, health, duration, intensity,
        med_id, med, med_unit, hba1c,
    )  # fmt: skip


#: Every characteristic we parse, by 16-bit UUID.
PARSERS: dict[int, tuple[type[GattResult], Callable[[bytes], GattResult]]] = {
    cls.UUID16: (cls, fn)
    for cls, fn in (
        (HeartRateMeasurement, parse_heart_rate),
        (PlxSpotCheckMeasurement, parse_plx_spot_check),
        (PlxContinuousMeasurement, parse_plx_continuous),
        (TemperatureMeasurement, parse_temperature),
        (BloodPressureMeasurement, parse_blood_pressure),
        (WeightMeasurement, parse_weight),
        (GlucoseMeasurement, parse_glucose),
        (GlucoseMeasurementContext, parse_glucose_context),
    )
}
