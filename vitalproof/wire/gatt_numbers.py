"""Bluetooth SIG assigned numbers of the health profiles we speak, in one place.

The BLE gateway (ingest) scans for the services and parses the characteristics; the
simulated peripherals (device_sims) advertise and encode the same ones. Both use these
names, so a number is written once. Values are the 16-bit assigned numbers (Bluetooth SIG,
"Assigned Numbers", sections 3.4 and 3.8); :func:`full_uuid` gives the 128-bit form that
bleak speaks.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["BLUETOOTH_BASE_SUFFIX", "Characteristic", "Service", "full_uuid", "short_uuid"]

BLUETOOTH_BASE_SUFFIX = "-0000-1000-8000-00805f9b34fb"


class Service(IntEnum):
    HEART_RATE = 0x180D
    PULSE_OXIMETER = 0x1822
    HEALTH_THERMOMETER = 0x1809
    BLOOD_PRESSURE = 0x1810
    WEIGHT_SCALE = 0x181D
    GLUCOSE = 0x1808
    BATTERY = 0x180F
    DEVICE_INFORMATION = 0x180A


class Characteristic(IntEnum):
    HEART_RATE_MEASUREMENT = 0x2A37
    PLX_SPOT_CHECK = 0x2A5E
    PLX_CONTINUOUS = 0x2A5F
    TEMPERATURE_MEASUREMENT = 0x2A1C
    BLOOD_PRESSURE_MEASUREMENT = 0x2A35
    WEIGHT_MEASUREMENT = 0x2A9D
    GLUCOSE_MEASUREMENT = 0x2A18
    GLUCOSE_CONTEXT = 0x2A34
    RACP = 0x2A52  # Record Access Control Point
    BATTERY_LEVEL = 0x2A19
    MANUFACTURER_NAME = 0x2A29
    MODEL_NUMBER = 0x2A24
    SERIAL_NUMBER = 0x2A25
    FIRMWARE_REVISION = 0x2A26


def full_uuid(short: int) -> str:
    """The 128-bit form of a 16-bit SIG-assigned UUID (Core Spec Vol 3 Part B 2.5.1)."""
    return f"{short:08x}{BLUETOOTH_BASE_SUFFIX}"


def short_uuid(uuid: str) -> str:
    """'2a37' for a SIG base UUID, otherwise the UUID unchanged (for messages)."""
    u = uuid.lower()
    if len(u) == 36 and u.endswith(BLUETOOTH_BASE_SUFFIX) and u.startswith("0000"):
        return u[4:8]
    return uuid
