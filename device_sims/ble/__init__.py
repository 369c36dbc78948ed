"""Simulated BLE health peripherals and a simulated radio, as a bleak backend.

Two halves: :mod:`device_sims.ble.peripherals` (what a test configures: the GATT
peripherals, their values and faults) and :mod:`device_sims.ble.radio` (the bleak backend
classes the real ``BleakScanner``/``BleakClient`` code is driven through). Everything a test
uses is importable from here.
"""

from device_sims.ble.peripherals import (
    US,
    BloodPressureSim,
    GlucoseMeterSim,
    HeartRateSim,
    PulseOximeterSim,
    Sent,
    SimPeripheral,
    ThermometerSim,
    WeightScaleSim,
)
from device_sims.ble.radio import SimBleakClient, SimBleakScanner, SimBleBackend

__all__ = [
    "US",
    "BloodPressureSim",
    "GlucoseMeterSim",
    "HeartRateSim",
    "PulseOximeterSim",
    "Sent",
    "SimBleBackend",
    "SimBleakClient",
    "SimBleakScanner",
    "SimPeripheral",
    "ThermometerSim",
    "WeightScaleSim",
]
