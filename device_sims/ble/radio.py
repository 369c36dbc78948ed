"""The simulated radio: a bleak *backend* in front of the simulated peripherals.

No radio on a build machine, so the radio is what we fake, and only the radio: the
simulated peripherals (:mod:`device_sims.ble.peripherals`) sit behind a bleak backend
(``bleak.backends.scanner.BaseBleakScanner`` and ``bleak.backends.client.BaseBleakClient``
subclasses, passed as ``backend=``), so the collector runs the real ``BleakScanner``,
``BleakClient`` and ``bleak_retry_connector.establish_connection`` code, and notifications
travel the path bleak's own backends use (backend callback -> ``BleakClient.start_notify``
wrapper -> ``callback(BleakGATTCharacteristic, bytearray)``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any, cast

from bleak.assigned_numbers import CharacteristicPropertyName
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient, NotifyCallback
from bleak.backends.descriptor import BleakGATTDescriptor
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementDataCallback, BaseBleakScanner
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import BleakError

from device_sims.ble.peripherals import _DEVICE_INFORMATION, SimPeripheral, _Char, _u
from vitalproof.wire.gatt_numbers import Characteristic as C
from vitalproof.wire.gatt_numbers import Service


class SimBleBackend:
    """The simulated air: ``scanner`` and ``client`` are bleak backend classes bound to it.

    Usage: ``BleCollector(settings, backend=BleBackend(sim.scanner, sim.client))`` or
    ``BleakScanner(cb, service_uuids, backend=sim.scanner)`` directly.
    """

    def __init__(
        self, peripherals: Iterable[SimPeripheral] = (), *, advertise_every_s: float = 0.05
    ):
        self.peripherals: dict[str, SimPeripheral] = {}
        self.advertise_every_s = advertise_every_s
        for p in peripherals:
            self.add(p)
        air = self
        self.scanner: type[SimBleakScanner] = type(
            "BoundSimBleakScanner", (SimBleakScanner,), {"air": air}
        )
        self.client: type[SimBleakClient] = type(
            "BoundSimBleakClient", (SimBleakClient,), {"air": air}
        )

    def add(self, peripheral: SimPeripheral) -> SimPeripheral:
        self.peripherals[peripheral.address] = peripheral
        return peripheral

    def remove(self, address: str) -> None:
        p = self.peripherals.pop(address.upper(), None)
        if p is not None:
            p.drop_link()


class SimBleakScanner(BaseBleakScanner):
    """Reports every advertising peripheral of ``air`` every ``advertise_every_s``."""

    air: SimBleBackend

    def __init__(
        self,
        detection_callback: AdvertisementDataCallback | None,
        service_uuids: list[str] | None,
        scanning_mode: str = "active",
        **kwargs: Any,
    ) -> None:
        super().__init__(detection_callback, service_uuids)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.seen_devices = {}
        self._task = asyncio.create_task(self._advertise())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _advertise(self) -> None:
        while True:
            for p in list(self.air.peripherals.values()):
                if not p.advertising:
                    continue
                adv = p.advertisement()
                if not self.is_allowed_uuid(adv.service_uuids):
                    continue
                device = self.create_or_update_device(p.address, p.address, p.name, p, adv)
                self.call_detection_callbacks(device, adv)
            await asyncio.sleep(self.air.advertise_every_s)


class SimBleakClient(BaseBleakClient):
    """A GATT client connection to a simulated peripheral of ``air``."""

    air: SimBleBackend

    def __init__(self, address_or_ble_device: BLEDevice | str, **kwargs: Any) -> None:
        super().__init__(
            address_or_ble_device,
            disconnected_callback=kwargs.get("disconnected_callback"),
            timeout=kwargs.get("timeout", 10.0),
        )
        self._connected = False
        self._peripheral: SimPeripheral | None = None
        self._subscribed: dict[str, NotifyCallback] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._chars: dict[str, BleakGATTCharacteristic] = {}

    @property
    def mtu_size(self) -> int:
        return 247

    @property
    def name(self) -> str:
        return self._peripheral.name if self._peripheral else self.address

    @property
    def is_connected(self) -> bool:
        return self._connected

    async def connect(self, pair: bool, **kwargs: Any) -> None:
        await asyncio.sleep(0.01)
        p = self.air.peripherals.get(self.address.upper())
        if p is None:
            raise BleakError(f"sim: device {self.address} not found")
        if p.refuse_connects > 0:
            p.refuse_connects -= 1
            raise BleakError("sim: le-connection-abort-by-local")
        if not p.advertising:
            raise BleakError(f"sim: {self.address} already connected to another central")
        self._peripheral = p
        self.services = self._build_services(p)
        self._connected = True
        p._attach(self)
        self._spawn(p.run(self._deliver))

    def _build_services(self, p: SimPeripheral) -> BleakGATTServiceCollection:
        coll = BleakGATTServiceCollection()
        handle = 1
        groups: dict[str, list[_Char]] = {
            _u(p.SERVICE): [],
            _u(Service.BATTERY): [],
            _u(Service.DEVICE_INFORMATION): [],
        }
        for c in p.chars.values():
            short = int(c.uuid[:8], 16)
            if short == C.BATTERY_LEVEL:
                key = _u(Service.BATTERY)
            elif short in _DEVICE_INFORMATION:
                key = _u(Service.DEVICE_INFORMATION)
            else:
                key = _u(p.SERVICE)
            groups[key].append(c)
        for suuid, chars in groups.items():
            svc = BleakGATTService(None, handle, suuid)
            coll.add_service(svc)
            handle += 1
            for c in chars:
                ch = BleakGATTCharacteristic(
                    c,
                    handle + 1,
                    c.uuid,
                    cast("list[CharacteristicPropertyName]", list(c.properties)),
                    lambda: 244,
                    svc,
                )
                coll.add_characteristic(ch)  # also adds it to its service
                self._chars[c.uuid] = ch
                handle += 3
        return coll

    async def disconnect(self) -> None:
        if self._connected:
            self._teardown()
            if self._disconnected_callback is not None:
                self._disconnected_callback()

    def _link_lost(self) -> None:
        if self._connected:
            self._teardown()
            if self._disconnected_callback is not None:
                self._disconnected_callback()

    def _teardown(self) -> None:
        self._connected = False
        for t in list(self._tasks):
            t.cancel()
        self._subscribed.clear()
        if self._peripheral is not None:
            self._peripheral._detach()

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        """Simulated peripherals need no bonding."""

    async def unpair(self) -> None:
        """Simulated peripherals need no bonding."""

    def _require(self, characteristic: BleakGATTCharacteristic, prop: str) -> _Char:
        if not self._connected or self._peripheral is None:
            raise BleakError("Not connected")
        c = self._peripheral.chars[characteristic.uuid]
        if prop not in c.properties and not (prop == "notify" and "indicate" in c.properties):
            raise BleakError(f"sim: {characteristic.uuid} does not support {prop}")
        return c

    async def read_gatt_char(
        self, characteristic: BleakGATTCharacteristic, *, use_cached: bool = False, **kwargs: Any
    ) -> bytearray:
        return bytearray(self._require(characteristic, "read").value)

    async def read_gatt_descriptor(
        self, descriptor: BleakGATTDescriptor, *, use_cached: bool = False, **kwargs: Any
    ) -> bytearray:
        raise BleakError("sim: descriptors are not simulated")

    async def write_gatt_char(
        self, characteristic: BleakGATTCharacteristic, data: Any, response: bool
    ) -> None:
        self._require(characteristic, "write")
        assert self._peripheral is not None
        self._peripheral.on_write(characteristic.uuid, bytes(data))

    async def write_gatt_descriptor(self, descriptor: BleakGATTDescriptor, data: Any) -> None:
        raise BleakError("sim: descriptors are not simulated")

    async def start_notify(
        self, characteristic: BleakGATTCharacteristic, callback: NotifyCallback, **kwargs: Any
    ) -> None:
        self._require(characteristic, "notify")
        self._subscribed[characteristic.uuid] = callback

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        self._subscribed.pop(characteristic.uuid, None)

    # -- delivery -----------------------------------------------------------------------

    def _deliver(self, uuid: str, data: bytes) -> bool:
        """Hand a value to bleak's notify wrapper, as an OS backend does; False if the
        client is not subscribed (the value is lost, as over the air)."""
        cb = self._subscribed.get(uuid)
        if cb is None or not self._connected:
            return False
        cb(bytearray(data))
        return True

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
