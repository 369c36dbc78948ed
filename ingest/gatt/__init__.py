"""Bluetooth GATT health characteristics: IEEE 11073 floats, parsers, encoders, dispatch.

``decode(uuid, data)`` turns a notified value into a typed result with canonical readings;
``GattError`` is the only exception it raises. ``device_sims.gatt_encode`` holds the mirror-image
encoders used by simulated peripherals.
"""

from ingest.gatt.decode import SUPPORTED, ble_decode_cli, decode, normalize_uuid, to_json
from ingest.gatt.parsers import (
    BloodPressureMeasurement,
    GattError,
    GattResult,
    GattSample,
    GlucoseMeasurement,
    GlucoseMeasurementContext,
    HeartRateMeasurement,
    PlxContinuousMeasurement,
    PlxSpotCheckMeasurement,
    TemperatureMeasurement,
    WeightMeasurement,
)
from vitalproof.wire.ieee11073 import MderFloat, Special

__all__ = [
    "SUPPORTED",
    "BloodPressureMeasurement",
    "GattError",
    "GattResult",
    "GattSample",
    "GlucoseMeasurement",
    "GlucoseMeasurementContext",
    "HeartRateMeasurement",
    "MderFloat",
    "PlxContinuousMeasurement",
    "PlxSpotCheckMeasurement",
    "Special",
    "TemperatureMeasurement",
    "WeightMeasurement",
    "ble_decode_cli",
    "decode",
    "normalize_uuid",
    "to_json",
]
