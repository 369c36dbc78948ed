"""The BLE gateway (``vitalproof collect ble``): :class:`BleCollector` and what it takes and
returns. The front is in :mod:`ingest.ble.gateway`, one device's connection and decoding in
:mod:`ingest.ble.session`."""

from ingest.ble.gateway import BleCollector, device_id_for
from ingest.ble.session import BleBackend, BleStats, DeviceInfo

__all__ = ["BleBackend", "BleCollector", "BleStats", "DeviceInfo", "device_id_for"]
