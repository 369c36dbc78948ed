"""Simulated BLE health peripherals and a simulated radio, as a bleak backend.

No radio on a build machine, so the radio is what we fake, and only the radio: the
simulated peripherals sit behind a bleak *backend* (``bleak.backends.scanner.BaseBleakScanner``
and ``bleak.backends.client.BaseBleakClient`` subclasses, passed as ``backend=``), so the
collector runs the real ``BleakScanner``, ``BleakClient`` and
``bleak_retry_connector.establish_connection`` code, and notifications travel the path
bleak's own backends use (backend callback -> ``BleakClient.start_notify`` wrapper ->
``callback(BleakGATTCharacteristic, bytearray)``).

Peripherals notify spec-exact characteristic values written with :mod:`device_sims.gatt_encode`
from :class:`device_sims.physiology.SimDevice` samples (heart rate and RR, SpO2 and pulse,
blood pressure, temperature); weight and glucose, which the physiology model does not
produce, come from the peripheral's own seeded generator. Simulated device time is
compressed: each emission advances the device clock by ``step_s`` while real time
advances by ``interval_s``.

Fault injection: ``malformed_every`` replaces every n-th notification with a truncated
value; ``drop_link()`` (or ``drop_every``) cuts the link as a radio dropout would (the
peripheral advertises again, the client's disconnected callback fires);
``refuse_connects`` makes the next n connection attempts fail like a busy adapter.

Every value a peripheral sends is kept in ``sent`` (characteristic, bytes, malformed?) so
tests can compare what reached Kafka with what went over the air.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from bleak.assigned_numbers import CharacteristicPropertyName
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient, NotifyCallback
from bleak.backends.descriptor import BleakGATTDescriptor
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, AdvertisementDataCallback, BaseBleakScanner
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import BleakError

from device_sims import gatt_encode as enc
from device_sims.physiology import SimDevice
from vitalproof.units import Metric
from vitalproof.wire.gatt_numbers import Characteristic as C
from vitalproof.wire.gatt_numbers import Service, full_uuid

US = 1_000_000


_DEVICE_INFORMATION = (C.MANUFACTURER_NAME, C.MODEL_NUMBER, C.SERIAL_NUMBER, C.FIRMWARE_REVISION)


def _u(short: int) -> str:
    return full_uuid(short)


@dataclass(frozen=True, slots=True)
class Sent:
    uuid: str
    data: bytes
    malformed: bool


@dataclass(slots=True)
class _Char:
    uuid: str
    properties: tuple[str, ...]
    value: bytes = b""


class SimPeripheral:
    """A BLE peripheral: GATT table, advertising, notifications, faults.

    Subclasses define ``SERVICE``, their measurement characteristics and
    :meth:`measurements` (the values of one emission).
    """

    SERVICE: int = 0
    MEASUREMENTS: tuple[tuple[int, str], ...] = ()  # (uuid16, "notify" | "indicate")

    def __init__(
        self,
        address: str,
        *,
        name: str | None = None,
        seed: int = 1,
        interval_s: float = 0.05,
        step_s: float = 1.0,
        battery: int = 87,
        malformed_every: int = 0,
        drop_every: int = 0,
        refuse_connects: int = 0,
        start_time_us: int | None = None,
        tz_offset_min: int = 0,
    ) -> None:
        self.address = address.upper()
        self.name = name or f"{type(self).__name__}-{self.address[-5:].replace(':', '')}"
        self.rng = random.Random(f"{seed}/{address}")
        self.interval_s = interval_s
        self.step_s = step_s
        self.malformed_every = malformed_every
        self.drop_every = drop_every
        self.refuse_connects = refuse_connects
        self.start_time_us = time.time_ns() // 1000 if start_time_us is None else start_time_us
        self.device_time_us = self.start_time_us
        self.tz = timedelta(minutes=tz_offset_min)
        self.sim = SimDevice(self.address, seed, profile="dense", start_time_us=self.start_time_us)
        self.sent: list[Sent] = []
        self.connections = 0
        self.link_drops = 0
        self._emitted = 0
        self._client: SimBleakClient | None = None
        self.chars: dict[str, _Char] = {}
        for short, prop in self.MEASUREMENTS:
            self.chars[_u(short)] = _Char(_u(short), (prop,))
        self.chars[_u(C.BATTERY_LEVEL)] = _Char(
            _u(C.BATTERY_LEVEL), ("read", "notify"), bytes([battery])
        )
        serial = f"SN{self.rng.randrange(10**8):08d}"
        for short, text in (
            (C.MANUFACTURER_NAME, "Vitalproof Sim"),
            (C.MODEL_NUMBER, type(self).__name__),
            (C.SERIAL_NUMBER, serial),
            (C.FIRMWARE_REVISION, "1.4.2"),
        ):
            self.chars[_u(short)] = _Char(_u(short), ("read",), text.encode())

    # -- what a subclass provides ------------------------------------------------------

    def measurements(self) -> list[tuple[str, bytes]]:
        """Values for one emission: (characteristic uuid, bytes)."""
        raise NotImplementedError

    def malformed(self, uuid: str, good: bytes) -> bytes:
        """A value that cannot parse: cut to the flags byte plus one (always too short)."""
        return good[:1] + b"\xff" if len(good) > 2 else b""

    def on_write(self, uuid: str, data: bytes) -> None:
        raise BleakError(f"sim {self.address}: {uuid} is not writable")

    # -- device-local time ------------------------------------------------------------

    def local_time(self, t_us: int) -> datetime:
        """Device clock as the naive local Date Time a GATT characteristic carries."""
        return (datetime.fromtimestamp(t_us / US, UTC) + self.tz).replace(tzinfo=None)

    def samples(self, metrics: Iterable[str]) -> dict[str, list[tuple[int, float]]]:
        """Advance the device clock by ``step_s`` and return its samples by metric."""
        self.device_time_us += int(self.step_s * US)
        batch = self.sim.tick(self.device_time_us)
        out: dict[str, list[tuple[int, float]]] = {m: [] for m in metrics}
        if batch is not None:
            for m, t, v in zip(batch.metric, batch.device_time_us, batch.value, strict=True):
                if m in out:
                    out[m].append((t, v))
        return out

    # -- the air ----------------------------------------------------------------------

    @property
    def advertising(self) -> bool:
        return self._client is None

    def advertisement(self) -> AdvertisementData:
        return AdvertisementData(
            local_name=self.name,
            manufacturer_data={},
            service_data={},
            service_uuids=[_u(self.SERVICE)],
            tx_power=0,
            rssi=-60 - self.rng.randrange(20),
            platform_data=(),
        )

    def drop_link(self) -> None:
        """Radio dropout: the connection is gone without a disconnect request."""
        client = self._client
        if client is not None:
            self.link_drops += 1
            client._link_lost()

    def _attach(self, client: SimBleakClient) -> None:
        self._client = client
        self.connections += 1

    def _detach(self) -> None:
        self._client = None

    async def run(self, deliver: Callable[[str, bytes], bool]) -> None:
        """Emission loop while connected: notify subscribed characteristics."""
        while True:
            await asyncio.sleep(self.interval_s)
            for uuid, good in self.measurements():
                self._emitted += 1
                bad = bool(self.malformed_every) and self._emitted % self.malformed_every == 0
                data = self.malformed(uuid, good) if bad else good
                if deliver(uuid, data):  # unsubscribed values are lost, as over the air
                    self.sent.append(Sent(uuid, data, bad))
            if self.drop_every and self._emitted >= self.drop_every * (self.link_drops + 1):
                self.drop_link()
                return


class HeartRateSim(SimPeripheral):
    """Heart Rate service 0x180D: Heart Rate Measurement with RR intervals, notified."""

    SERVICE = Service.HEART_RATE
    MEASUREMENTS = ((C.HEART_RATE_MEASUREMENT, "notify"),)

    def measurements(self) -> list[tuple[str, bytes]]:
        s = self.samples((Metric.HEART_RATE.value, Metric.RR_INTERVAL.value))
        hr = s[Metric.HEART_RATE.value]
        if not hr:
            return []
        rr = [enc.rr_from_ms(v) for _, v in s[Metric.RR_INTERVAL.value]][:9]
        return [
            (
                _u(C.HEART_RATE_MEASUREMENT),
                enc.encode_heart_rate(int(hr[-1][1]), contact=True, rr_intervals=rr),
            )
        ]


class PulseOximeterSim(SimPeripheral):
    """Pulse Oximeter 0x1822: continuous (notify) every emission, spot-check (indicate)
    every fifth, with its device time stamp."""

    SERVICE = Service.PULSE_OXIMETER
    MEASUREMENTS = ((C.PLX_CONTINUOUS, "notify"), (C.PLX_SPOT_CHECK, "indicate"))

    def measurements(self) -> list[tuple[str, bytes]]:
        s = self.samples((Metric.SPO2.value, Metric.HEART_RATE.value))
        if not s[Metric.SPO2.value] or not s[Metric.HEART_RATE.value]:
            return []
        (t, spo2), pr = s[Metric.SPO2.value][-1], s[Metric.HEART_RATE.value][-1][1]
        out = [(_u(C.PLX_CONTINUOUS), enc.encode_plx_continuous(spo2, pr))]
        if (t // US) % 5 == 0:
            stamp = self.local_time(t)
            out.append((_u(C.PLX_SPOT_CHECK), enc.encode_plx_spot_check(spo2, pr, timestamp=stamp)))
        return out


class ThermometerSim(SimPeripheral):
    """Health Thermometer 0x1809: Temperature Measurement (indicate), body site, stamped."""

    SERVICE = Service.HEALTH_THERMOMETER
    MEASUREMENTS = ((C.TEMPERATURE_MEASUREMENT, "indicate"),)

    def measurements(self) -> list[tuple[str, bytes]]:
        s = self.samples((Metric.SKIN_TEMPERATURE.value,))
        if not s[Metric.SKIN_TEMPERATURE.value]:
            return []
        t, skin = s[Metric.SKIN_TEMPERATURE.value][-1]
        core = round(36.4 + (skin - 33.5) * 0.2, 1)  # core moves a little with the skin
        value = enc.encode_temperature(core, timestamp=self.local_time(t), temperature_type=2)
        return [(_u(C.TEMPERATURE_MEASUREMENT), value)]


class BloodPressureSim(SimPeripheral):
    """Blood Pressure 0x1810: Blood Pressure Measurement (indicate) with pulse, stamped."""

    SERVICE = Service.BLOOD_PRESSURE
    MEASUREMENTS = ((C.BLOOD_PRESSURE_MEASUREMENT, "indicate"),)

    def measurements(self) -> list[tuple[str, bytes]]:
        keys = (Metric.SYSTOLIC_BP.value, Metric.DIASTOLIC_BP.value, Metric.HEART_RATE.value)
        s = self.samples((*keys, Metric.MEAN_ARTERIAL_PRESSURE.value))
        if not s[Metric.SYSTOLIC_BP.value]:
            return []
        t, sys_ = s[Metric.SYSTOLIC_BP.value][-1]
        dia = s[Metric.DIASTOLIC_BP.value][-1][1]
        mean = round(s[Metric.MEAN_ARTERIAL_PRESSURE.value][-1][1])
        pulse = s[Metric.HEART_RATE.value][-1][1] if s[Metric.HEART_RATE.value] else None
        value = enc.encode_blood_pressure(
            sys_, dia, float(mean), timestamp=self.local_time(t), pulse_rate=pulse
        )
        return [(_u(C.BLOOD_PRESSURE_MEASUREMENT), value)]


class WeightScaleSim(SimPeripheral):
    """Weight Scale 0x181D: Weight Measurement (indicate) in kg with BMI and height."""

    SERVICE = Service.WEIGHT_SCALE
    MEASUREMENTS = ((C.WEIGHT_MEASUREMENT, "indicate"),)
    HEIGHT_M = 1.74

    def measurements(self) -> list[tuple[str, bytes]]:
        self.device_time_us += int(self.step_s * US)
        kg = round(72.0 + self.rng.gauss(0, 0.4), 2)
        bmi = round(kg / self.HEIGHT_M**2, 1)
        value = enc.encode_weight(
            kg, timestamp=self.local_time(self.device_time_us), bmi=bmi, height=self.HEIGHT_M
        )
        return [(_u(C.WEIGHT_MEASUREMENT), value)]


class GlucoseMeterSim(SimPeripheral):
    """Glucose 0x1808: stored records served through the Record Access Control Point.

    Nothing is notified spontaneously: the collector writes "report stored records" to
    RACP 0x2A52 (which must have indications enabled, as the profile requires), the meter
    notifies each record (0x2A18, and 0x2A34 context for every third) and then indicates
    the RACP response. Operators supported: all records (0x01) and greater than or equal
    to a sequence number (0x03 with filter type 0x01). A new record is stored every
    ``new_record_every`` emissions while connected, as if the patient measured.
    """

    SERVICE = Service.GLUCOSE
    MEASUREMENTS = (
        (C.GLUCOSE_MEASUREMENT, "notify"),
        (C.GLUCOSE_CONTEXT, "notify"),
        (C.RACP, "write"),
    )

    def __init__(self, address: str, *, records: int = 5, new_record_every: int = 0,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(address, **kwargs)
        self.chars[_u(C.RACP)] = _Char(_u(C.RACP), ("write", "indicate"))
        self.new_record_every = new_record_every
        self.records: list[tuple[int, bytes, bytes | None]] = []  # seq, measurement, context
        self.racp_requests: list[bytes] = []
        for _ in range(records):
            self.store_record()

    def store_record(self) -> int:
        seq = len(self.records)
        self.device_time_us += int(self.step_s * US)
        mg_dl = round(95 + self.rng.gauss(0, 12))
        meas = enc.encode_glucose(
            seq, self.local_time(self.device_time_us), time_offset=0,
            concentration=enc.glucose_mg_dl(mg_dl), context_follows=seq % 3 == 0,
        )  # fmt: skip
        ctx = enc.encode_glucose_context(seq, meal=1) if seq % 3 == 0 else None
        self.records.append((seq, meas, ctx))
        return seq

    def measurements(self) -> list[tuple[str, bytes]]:
        if self.new_record_every and self.rng.randrange(self.new_record_every) == 0:
            seq = self.store_record()
            _, meas, ctx = self.records[seq]
            return [(_u(C.GLUCOSE_MEASUREMENT), meas)] + (
                [(_u(C.GLUCOSE_CONTEXT), ctx)] if ctx else []
            )
        return []

    def on_write(self, uuid: str, data: bytes) -> None:
        if uuid != _u(C.RACP):
            super().on_write(uuid, data)
        client = self._client
        if client is None:
            raise BleakError("not connected")
        if _u(C.RACP) not in client._subscribed:
            # ATT error 0xFD: Client Characteristic Configuration Descriptor Improperly Configured
            raise BleakError("sim: RACP written without indications enabled (ATT error 0xFD)")
        self.racp_requests.append(bytes(data))
        client._spawn(self._report(client, bytes(data)))

    async def _report(self, client: SimBleakClient, req: bytes) -> None:
        op = req[0] if req else 0
        operator = req[1] if len(req) > 1 else 0
        if op != 0x01:
            code, selected = 0x02, []  # op code not supported
        elif operator == 0x01 and len(req) == 2:
            code, selected = 0x01, list(self.records)
        elif operator == 0x03 and len(req) == 5 and req[2] == 0x01:
            (low,) = struct.unpack_from("<H", req, 3)
            selected = [r for r in self.records if r[0] >= low]
            code = 0x01
        else:
            code, selected = 0x04, []  # operator not supported
        if code == 0x01 and not selected:
            code = 0x06  # no records found
        for _seq, meas, ctx in selected:
            await asyncio.sleep(0)
            if client._deliver(_u(C.GLUCOSE_MEASUREMENT), meas):
                self.sent.append(Sent(_u(C.GLUCOSE_MEASUREMENT), meas, False))
            if ctx is not None and client._deliver(_u(C.GLUCOSE_CONTEXT), ctx):
                self.sent.append(Sent(_u(C.GLUCOSE_CONTEXT), ctx, False))
        await asyncio.sleep(0)
        client._deliver(_u(C.RACP), bytes([0x06, 0x00, op, code]))


# -- the radio, as a bleak backend ------------------------------------------------------


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
