"""The BLE gateway: health-profile peripherals -> GATT decode -> disk buffer -> Kafka.

What it does, and why each piece is there:

* **Discovery** with ``bleak.BleakScanner(service_uuids=[...])`` filtered on the standard
  health services (Heart Rate 0x180D, Pulse Oximeter 0x1822, Health Thermometer 0x1809,
  Blood Pressure 0x1810, Weight Scale 0x181D, Glucose 0x1808), so the radio reports only
  devices we could use, plus an optional allow-list (address -> device id) because a ward
  is full of other patients' sensors.
* **Connections** through ``bleak_retry_connector.establish_connection`` with
  ``BleakClientWithServiceCache``: it backs off between attempts, swaps in an already
  connected BlueZ device and clears stale service caches. Stale connections left by a
  previous gateway process are closed first (``close_stale_connections``). After a drop the
  session reconnects with capped exponential backoff; several devices run side by side,
  one task each (references kept, so none is garbage-collected mid-flight).
* **At connect** Battery Level 0x2A19 (a ``battery_level`` reading) and Device Information
  (manufacturer, model, serial, firmware; logged and kept in :attr:`BleCollector.devices`)
  are read, then every supported measurement characteristic is subscribed (bleak prefers
  notify over indicate when both are offered). Glucose meters only send stored records on
  request: after subscribing to 0x2A18/0x2A34 and the RACP 0x2A52 indications the session
  writes "report stored records" to the Record Access Control Point and waits for the RACP
  response; after the first full fetch it asks only for records with a sequence number
  above the last one buffered, so a reconnect does not re-fetch the whole memory.
* **Decoding** happens here, unlike MQTT (see ``vitalproof.raw``): normalization accepts
  only the JSON SampleBatch, so GATT bytes are parsed with :func:`ingest.gatt.decode` and
  the samples forwarded as ``CONTENT_TYPE_JSON``. Bytes that do not parse cannot be
  normalized either, so they go straight to ``vitals.dlq`` with the original bytes and
  ``dlq-reason``/``dlq-stage=ble`` headers, and collection goes on.
* **Durability**: every record is appended (fsync'd, one fsync per group) to
  :class:`ingest.buffer.DiskBuffer` before anything else, and leaves it only after Kafka
  acknowledged it (``durable_producer``: acks=all, idempotent). While Kafka is unreachable
  records accumulate on disk; a restarted gateway drains what the previous one buffered,
  in order. When the bound is hit the oldest are evicted, counted in
  :attr:`BleStats.evicted` and logged.

Sequence numbers: glucose records carry the meter's own Sequence Number, which is used as
``seq`` (a re-fetched record then gets the same reading id and is deduplicated downstream).
Everything else gets a per-device counter persisted in the buffer directory in reserved
blocks (``ble-state.json``): a restart skips to the next block, so a seq is never reused
for a different reading. Device time is the characteristic's timestamp when it has one (the
GSS Date Time has no zone: it is read in ``device_tz``, by default the gateway's local zone,
which is what the phone or hub that set the device clock used); otherwise the receive time,
flagged ``Quality.ESTIMATED_TIME``.

Delivery is at-least-once: a batch whose produce failed is sent again, and a crash between
Kafka's ack and the buffer's ack resends a few records; normalization and sealing dedupe by
reading id.

The radio is abstracted the way bleak itself does it: :class:`BleBackend` names the bleak
scanner and client *backend classes* (``None`` = the platform's), so a simulated radio
(``device_sims.ble``) runs under the real ``BleakScanner``, ``BleakClient`` and
``establish_connection`` code, and notifications reach :meth:`_on_notify` exactly as
bleak delivers them: ``callback(BleakGATTCharacteristic, bytearray)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from bleak import BleakScanner
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.exc import BleakError
from bleak_retry_connector import (
    BleakClientWithServiceCache,
    close_stale_connections,
    establish_connection,
)

from ingest.buffer import DiskBuffer
from ingest.gatt import GattError, GlucoseMeasurement, decode
from ingest.kafka_sink import durable_producer
from vitalproof.durable import write_atomic
from vitalproof.raw import (
    H_DEVICE,
    H_DLQ_REASON,
    H_DLQ_STAGE,
    H_GATEWAY,
    H_RECEIVED,
    H_SOURCE,
    H_TRANSPORT,
    RawRecord,
)
from vitalproof.schema import CONTENT_TYPE_JSON, Quality, SampleBatch, Transport
from vitalproof.settings import Settings
from vitalproof.units import Metric
from vitalproof.wire.gatt_numbers import Characteristic, Service, full_uuid

log = logging.getLogger(__name__)

# -- assigned numbers -------------------------------------------------------------------

HEART_RATE_SERVICE = full_uuid(Service.HEART_RATE)
PULSE_OXIMETER_SERVICE = full_uuid(Service.PULSE_OXIMETER)
HEALTH_THERMOMETER_SERVICE = full_uuid(Service.HEALTH_THERMOMETER)
BLOOD_PRESSURE_SERVICE = full_uuid(Service.BLOOD_PRESSURE)
WEIGHT_SCALE_SERVICE = full_uuid(Service.WEIGHT_SCALE)
GLUCOSE_SERVICE = full_uuid(Service.GLUCOSE)
BATTERY_SERVICE = full_uuid(Service.BATTERY)
DEVICE_INFORMATION_SERVICE = full_uuid(Service.DEVICE_INFORMATION)

#: What we scan for: a device advertising any of these is a candidate.
HEALTH_SERVICES: tuple[str, ...] = (
    HEART_RATE_SERVICE,
    PULSE_OXIMETER_SERVICE,
    HEALTH_THERMOMETER_SERVICE,
    BLOOD_PRESSURE_SERVICE,
    WEIGHT_SCALE_SERVICE,
    GLUCOSE_SERVICE,
)

HEART_RATE_MEASUREMENT = full_uuid(Characteristic.HEART_RATE_MEASUREMENT)
PLX_SPOT_CHECK = full_uuid(Characteristic.PLX_SPOT_CHECK)
PLX_CONTINUOUS = full_uuid(Characteristic.PLX_CONTINUOUS)
TEMPERATURE_MEASUREMENT = full_uuid(Characteristic.TEMPERATURE_MEASUREMENT)
BLOOD_PRESSURE_MEASUREMENT = full_uuid(Characteristic.BLOOD_PRESSURE_MEASUREMENT)
WEIGHT_MEASUREMENT = full_uuid(Characteristic.WEIGHT_MEASUREMENT)
GLUCOSE_MEASUREMENT = full_uuid(Characteristic.GLUCOSE_MEASUREMENT)
GLUCOSE_CONTEXT = full_uuid(Characteristic.GLUCOSE_CONTEXT)
RACP = full_uuid(Characteristic.RACP)
BATTERY_LEVEL = full_uuid(Characteristic.BATTERY_LEVEL)
MANUFACTURER_NAME = full_uuid(Characteristic.MANUFACTURER_NAME)
MODEL_NUMBER = full_uuid(Characteristic.MODEL_NUMBER)
SERIAL_NUMBER = full_uuid(Characteristic.SERIAL_NUMBER)
FIRMWARE_REVISION = full_uuid(Characteristic.FIRMWARE_REVISION)

#: Measurement characteristics we subscribe to, in subscription order (RACP last).
MEASUREMENTS: tuple[str, ...] = (
    HEART_RATE_MEASUREMENT,
    PLX_CONTINUOUS,
    PLX_SPOT_CHECK,
    TEMPERATURE_MEASUREMENT,
    BLOOD_PRESSURE_MEASUREMENT,
    WEIGHT_MEASUREMENT,
    GLUCOSE_MEASUREMENT,
    GLUCOSE_CONTEXT,
)

# Record Access Control Point (Glucose Profile / GSS "Record Access Control Point").
RACP_REPORT_STORED_RECORDS = 0x01
RACP_RESPONSE_CODE = 0x06
RACP_OPERATOR_NULL = 0x00
RACP_OPERATOR_ALL = 0x01
RACP_OPERATOR_GREATER_OR_EQUAL = 0x03
RACP_FILTER_SEQUENCE_NUMBER = 0x01
RACP_SUCCESS = 0x01
RACP_NO_RECORDS = 0x06

DLQ_STAGE = "ble"

SEQ_BLOCK = 1024
"""Sequence numbers reserved per state-file write: a restart resumes at the next block."""


def racp_report_all() -> bytes:
    """RACP "Report stored records", operator "All records"."""
    return bytes([RACP_REPORT_STORED_RECORDS, RACP_OPERATOR_ALL])


def racp_report_from(seq: int) -> bytes:
    """RACP "Report stored records" with sequence number >= ``seq``."""
    return bytes(
        [RACP_REPORT_STORED_RECORDS, RACP_OPERATOR_GREATER_OR_EQUAL, RACP_FILTER_SEQUENCE_NUMBER]
    ) + struct.pack("<H", seq)


def device_id_for(address: str) -> str:
    """Stable id for a device not on the allow-list: ``ble-`` + address, lowercase, no colons."""
    return "ble-" + address.lower().replace(":", "").replace("-", "")


# -- configuration and reporting --------------------------------------------------------


@dataclass(frozen=True)
class BleBackend:
    """Which bleak backend classes drive the radio; ``None`` means the platform's own.

    bleak picks the platform backend lazily when a scanner or client is created, and
    accepts a ``backend=`` class for anything else: this is that hook, nothing more.
    """

    scanner: type[BaseBleakScanner] | None = None
    client: type[BaseBleakClient] | None = None


@dataclass
class DeviceInfo:
    address: str
    device_id: str
    name: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    serial: str | None = None
    firmware: str | None = None
    battery_level: int | None = None
    services: tuple[str, ...] = ()
    connected: bool = False
    connects: int = 0
    disconnects: int = 0
    last_glucose_seq: int | None = None


@dataclass
class BleStats:
    """Counters of one collector run (the gateway's metrics)."""

    discovered: int = 0
    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    notifications: int = 0
    readings: int = 0
    decode_errors: int = 0
    buffered: int = 0
    produced: int = 0
    produced_dlq: int = 0
    produce_errors: int = 0
    evicted: int = 0
    racp_requests: int = 0
    racp_responses: int = 0
    started_at: float = field(default_factory=time.monotonic)


# -- what travels through the buffer ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Envelope:
    """One Kafka record as it waits in the disk buffer: topic, key, value, headers."""

    topic: str
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...]

    def encode(self) -> bytes:
        t = self.topic.encode()
        out = bytearray(struct.pack("<BH", 1, len(t)) + t)
        out += struct.pack("<I", len(self.key)) + self.key
        out += struct.pack("<I", len(self.value)) + self.value
        out += struct.pack("<H", len(self.headers))
        for name, val in self.headers:
            n = name.encode()
            out += struct.pack("<H", len(n)) + n + struct.pack("<I", len(val)) + val
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> Envelope:
        pos = 0

        def take(fmt: str) -> int:
            nonlocal pos
            (v,) = struct.unpack_from(fmt, data, pos)
            pos += struct.calcsize(fmt)
            return int(v)

        def chunk(n: int) -> bytes:
            nonlocal pos
            b = data[pos : pos + n]
            if len(b) != n:
                raise ValueError("truncated envelope")
            pos += n
            return b

        if take("<B") != 1:
            raise ValueError("unknown envelope version")
        topic = chunk(take("<H")).decode()
        key = chunk(take("<I"))
        value = chunk(take("<I"))
        headers = []
        for _ in range(take("<H")):
            name = chunk(take("<H")).decode()
            headers.append((name, chunk(take("<I"))))
        return cls(topic, key, value, tuple(headers))


# -- persistent per-device state --------------------------------------------------------


class _DeviceState:
    """Seq counters and glucose high-water marks, in ``ble-state.json`` (atomic writes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._doc: dict[str, dict[str, int]] = {}
        if path.exists():
            self._doc = json.loads(path.read_text())
        self._next: dict[str, int] = {d: v.get("reserved", 0) for d, v in self._doc.items()}

    def next_seq(self, device_id: str) -> int:
        n = self._next.get(device_id, 0)
        entry = self._doc.setdefault(device_id, {})
        if n >= entry.get("reserved", 0):
            entry["reserved"] = n + SEQ_BLOCK
            self._save()
        self._next[device_id] = n + 1
        return n

    def glucose_last(self, device_id: str) -> int | None:
        v = self._doc.get(device_id, {}).get("glucose_last")
        return None if v is None else int(v)

    def set_glucose_last(self, device_id: str, seq: int) -> None:
        entry = self._doc.setdefault(device_id, {})
        if entry.get("glucose_last", -1) < seq:
            entry["glucose_last"] = seq
            self._save()

    def _save(self) -> None:
        write_atomic(self.path, json.dumps(self._doc).encode())


# -- the collector ----------------------------------------------------------------------

_Notification = tuple[str, str, bytes, int]  # address, characteristic uuid, bytes, received µs


class BleCollector:
    """BLE health peripherals -> ``vitals.raw`` (decoded) / ``vitals.dlq`` (undecodable).

    ``allow_list`` maps BLE addresses (any case) to device ids; when given, nothing else is
    connected. ``buffer_dir`` defaults to ``<home>/ble-buffer/<gateway id>``.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        backend: BleBackend | None = None,
        allow_list: Mapping[str, str] | None = None,
        buffer_dir: Path | None = None,
        buffer_max_bytes: int | None = 64 << 20,
        buffer_max_records: int | None = None,
        producer_factory: Callable[[Settings], AIOKafkaProducer] | None = None,
        max_attempts: int = 3,
        reconnect_backoff_s: tuple[float, float] = (0.2, 30.0),
        racp_timeout_s: float = 30.0,
        device_tz: tzinfo | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend or BleBackend()
        self.allow_list = (
            None if allow_list is None else {a.upper(): d for a, d in allow_list.items()}
        )
        self.buffer_dir = buffer_dir or settings.paths.home / "ble-buffer" / settings.gateway.id
        self.buffer = DiskBuffer(
            self.buffer_dir, max_bytes=buffer_max_bytes, max_records=buffer_max_records
        )
        self._state = _DeviceState(self.buffer_dir / "ble-state.json")
        self._producer_factory = producer_factory or durable_producer
        self.max_attempts = max_attempts
        self.reconnect_backoff_s = reconnect_backoff_s
        self.racp_timeout_s = racp_timeout_s
        self.device_tz = device_tz
        self.stats = BleStats()
        self.devices: dict[str, DeviceInfo] = {}
        """By address (upper case): what we know of every device we connected."""
        self.kafka_ready = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._inbox: asyncio.Queue[_Notification] = asyncio.Queue()
        self._buffered = asyncio.Event()
        self._empty = asyncio.Event()  # set by the drainer whenever the buffer is empty
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sessions: dict[str, asyncio.Task[None]] = {}
        self._ble_devices: dict[str, BLEDevice] = {}
        self._racp_waiters: dict[str, asyncio.Future[bytes]] = {}

    # -- public -------------------------------------------------------------------------

    async def run(
        self,
        *,
        stop: asyncio.Event | None = None,
        duration_s: float | None = None,
        until: Callable[[BleStats], bool] | None = None,
        drain_on_stop_s: float = 10.0,
    ) -> BleStats:
        """Scan, connect, collect and forward until ``stop``, ``duration_s`` or ``until``.

        On the way out the sessions disconnect, the inbox is buffered, and for up to
        ``drain_on_stop_s`` the buffer keeps draining; what is left stays on disk for
        the next run.
        """
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.stats = BleStats(evicted=0)
        writer = self._spawn(self._writer(), "ble-writer")
        drainer = self._spawn(self._drainer(), "ble-drainer")
        scanner = BleakScanner(
            self._on_advertisement,
            service_uuids=list(HEALTH_SERVICES),
            backend=self.backend.scanner,
        )
        await scanner.start()
        deadline = None if duration_s is None else time.monotonic() + duration_s
        try:
            while True:
                if stop is not None and stop.is_set():
                    break
                if until is not None and until(self.stats):
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
                for t in (writer, drainer):
                    if t.done() and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
                await asyncio.sleep(0.05)
        finally:
            with contextlib.suppress(BleakError):
                await scanner.stop()
            sessions = list(self._sessions.values())
            for t in sessions:
                t.cancel()
            await asyncio.gather(*sessions, return_exceptions=True)
            await self._inbox.join()
            if self.kafka_ready.is_set() and len(self.buffer):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._empty.wait(), drain_on_stop_s)
            self._stop.set()
            self._buffered.set()
            writer.cancel()
            await asyncio.gather(writer, drainer, return_exceptions=True)
        return self.stats

    # -- discovery ----------------------------------------------------------------------

    def _device_id(self, address: str) -> str | None:
        if self.allow_list is None:
            return device_id_for(address)
        return self.allow_list.get(address.upper())

    def _on_advertisement(self, device: BLEDevice, adv: AdvertisementData) -> None:
        """bleak detection callback (on the loop): start a session per new allowed device."""
        address = device.address.upper()
        device_id = self._device_id(address)
        if device_id is None:
            return
        self._ble_devices[address] = device  # the freshest handle, for reconnects
        if address in self._sessions or self._stop.is_set():
            return
        self.stats.discovered += 1
        info = self.devices.setdefault(address, DeviceInfo(address, device_id))
        info.name = adv.local_name or device.name
        info.services = tuple(u for u in adv.service_uuids if u in HEALTH_SERVICES)
        log.info("BLE: found %s (%s) as %s: %s", address, info.name, device_id, info.services)
        self._sessions[address] = self._spawn(self._session(address, info), f"ble-{address}")

    # -- one device ---------------------------------------------------------------------

    async def _session(self, address: str, info: DeviceInfo) -> None:
        """Connect, read, subscribe, fetch; on a drop, back off and do it again."""
        low, high = self.reconnect_backoff_s
        delay = low
        while not self._stop.is_set():
            disconnected = asyncio.Event()

            def on_disconnect(_client: Any, _ev: asyncio.Event = disconnected) -> None:
                self._call_on_loop(_ev.set)

            client: BleakClientWithServiceCache | None = None
            try:
                device = self._ble_devices[address]
                await close_stale_connections(device)
                client = await establish_connection(
                    BleakClientWithServiceCache,
                    device,
                    info.name or address,
                    disconnected_callback=on_disconnect,
                    max_attempts=self.max_attempts,
                    ble_device_callback=lambda: self._ble_devices[address],
                    backend=self.backend.client,
                )
                info.connected = True
                info.connects += 1
                self.stats.connects += 1
                await self._on_connected(client, address, info)
                delay = low  # a good connection resets the backoff
                await disconnected.wait()
                log.warning("BLE: %s (%s) disconnected", address, info.device_id)
            except asyncio.CancelledError:
                if client is not None:
                    with contextlib.suppress(Exception):
                        await client.disconnect()
                raise
            except (BleakError, TimeoutError, OSError, EOFError) as e:
                self.stats.connect_failures += 1
                log.warning("BLE: %s: %s; retrying in %.1f s", address, e, delay)
                if client is not None:
                    with contextlib.suppress(Exception):
                        await client.disconnect()
            if info.connected:
                info.connected = False
                info.disconnects += 1
                self.stats.disconnects += 1
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(high, delay * 2)

    async def _on_connected(
        self, client: BleakClientWithServiceCache, address: str, info: DeviceInfo
    ) -> None:
        services = client.services
        chars = {c.uuid for c in services.characteristics.values()}

        async def read_text(uuid: str) -> str | None:
            if uuid not in chars:
                return None
            raw = await client.read_gatt_char(uuid)
            return bytes(raw).split(b"\0", 1)[0].decode("utf-8", "replace") or None

        info.manufacturer = await read_text(MANUFACTURER_NAME)
        info.model = await read_text(MODEL_NUMBER)
        info.serial = await read_text(SERIAL_NUMBER)
        info.firmware = await read_text(FIRMWARE_REVISION)
        if BATTERY_LEVEL in chars:
            raw = bytes(await client.read_gatt_char(BATTERY_LEVEL))
            info.battery_level = raw[0] if len(raw) == 1 else None
            self._enqueue((address, BATTERY_LEVEL, raw, time.time_ns() // 1000))
        log.info(
            "BLE: connected %s (%s): %s %s serial %s firmware %s",
            address, info.device_id, info.manufacturer, info.model, info.serial, info.firmware,
        )  # fmt: skip
        callback = self._notify_callback(address)
        for uuid in MEASUREMENTS:
            if uuid in chars:
                await client.start_notify(uuid, callback)
        if GLUCOSE_MEASUREMENT in chars and RACP in chars:
            await self._fetch_glucose(client, address, info, callback)

    async def _fetch_glucose(
        self,
        client: BleakClientWithServiceCache,
        address: str,
        info: DeviceInfo,
        callback: Callable[[BleakGATTCharacteristic, bytearray], None],
    ) -> None:
        """Ask the meter for its stored records; they arrive as notifications before the
        RACP response indication, which ends the procedure."""
        await client.start_notify(RACP, callback)
        last = self._state.glucose_last(info.device_id)
        request = racp_report_all() if last is None else racp_report_from(last + 1)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bytes] = loop.create_future()
        self._racp_waiters[address] = waiter
        try:
            self.stats.racp_requests += 1
            await client.write_gatt_char(RACP, request, response=True)
            resp = await asyncio.wait_for(waiter, self.racp_timeout_s)
        finally:
            self._racp_waiters.pop(address, None)
        self.stats.racp_responses += 1
        code = resp[3] if len(resp) >= 4 and resp[0] == RACP_RESPONSE_CODE else None
        if code not in (RACP_SUCCESS, RACP_NO_RECORDS):
            log.warning("BLE: %s: RACP answered %s to %s", address, resp.hex(), request.hex())

    # -- notifications (bleak callbacks) ------------------------------------------------

    def _notify_callback(
        self, address: str
    ) -> Callable[[BleakGATTCharacteristic, bytearray], None]:
        def on_notify(char: BleakGATTCharacteristic, data: bytearray) -> None:
            self._on_notify(address, char, data)

        return on_notify

    def _on_notify(self, address: str, char: BleakGATTCharacteristic, data: bytearray) -> None:
        """The bleak notification callback; may run on a backend thread."""
        received = time.time_ns() // 1000
        item = (address, char.uuid.lower(), bytes(data), received)
        if item[1] == RACP:
            self._call_on_loop(self._racp_response, address, item[2])
        else:
            self._call_on_loop(self._enqueue, item)

    def _racp_response(self, address: str, data: bytes) -> None:
        waiter = self._racp_waiters.get(address)
        if waiter is not None and not waiter.done():
            waiter.set_result(data)
        else:
            log.warning("BLE: %s: unsolicited RACP indication %s", address, data.hex())

    def _enqueue(self, item: _Notification) -> None:
        self.stats.notifications += 1
        self._inbox.put_nowait(item)

    def _call_on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    # -- decode + buffer ----------------------------------------------------------------

    async def _writer(self) -> None:
        """Turn queued notifications into envelopes and append them, one fsync per group."""
        while True:
            items = [await self._inbox.get()]
            while not self._inbox.empty() and len(items) < 500:
                items.append(self._inbox.get_nowait())
            envelopes: list[bytes] = []
            glucose: dict[str, int] = {}
            for address, uuid, data, received in items:
                device_id = self.devices[address].device_id
                env, gseq = self._to_envelope(device_id, uuid, data, received)
                if env is not None:
                    envelopes.append(env.encode())
                if gseq is not None:
                    glucose[device_id] = max(gseq, glucose.get(device_id, gseq))
            if envelopes:
                before = self.buffer.evicted
                self.buffer.append_many(envelopes)
                self._empty.clear()
                self.stats.buffered += len(envelopes)
                self.stats.evicted += self.buffer.evicted - before
                self._buffered.set()
            for device_id, gseq in glucose.items():  # only once the records are durable
                self._state.set_glucose_last(device_id, gseq)
            for _ in items:
                self._inbox.task_done()

    def _to_envelope(
        self, device_id: str, uuid: str, data: bytes, received_us: int
    ) -> tuple[Envelope | None, int | None]:
        """(record for Kafka or None when the value holds no reading, glucose seq)."""
        gw = self.settings.gateway.id
        gseq: int | None = None
        if uuid == BATTERY_LEVEL:
            if len(data) != 1 or data[0] > 100:
                return self._dlq(device_id, uuid, data, received_us, "2a19: battery level "
                                 f"must be one byte 0..100, got {data.hex()}"), None  # fmt: skip
            batch = SampleBatch(device_id=device_id)
            batch.add(
                Metric.BATTERY_LEVEL.value, "%", received_us, self._state.next_seq(device_id),
                float(data[0]), int(Quality.ESTIMATED_TIME),
            )  # fmt: skip
        else:
            try:
                result = decode(uuid, data)
            except GattError as e:
                self.stats.decode_errors += 1
                log.warning("BLE: %s %s: undecodable value %s: %s", device_id, uuid, data.hex(), e)
                return self._dlq(device_id, uuid, data, received_us, str(e)), None
            gseq = result.sequence_number if isinstance(result, GlucoseMeasurement) else None
            if not result.samples:
                return None, gseq
            batch = SampleBatch(device_id=device_id)
            for s in result.samples:
                if s.timestamp is not None:
                    t_us = self._device_time_us(s.timestamp)
                    q = int(s.quality)
                else:
                    t_us, q = received_us, int(s.quality | Quality.ESTIMATED_TIME)
                seq = gseq if gseq is not None else self._state.next_seq(device_id)
                batch.add(s.metric.value, s.unit, t_us, seq, s.value, q)
        self.stats.readings += len(batch)
        batch.tz_offset_min = self._tz_offset_min(received_us)
        record = RawRecord(
            device_id=device_id,
            payload=batch.to_json(),
            content_type=CONTENT_TYPE_JSON,
            transport=Transport.BLE,
            gateway_id=gw,
            received_us=received_us,
            source=uuid,
        )
        env = Envelope(
            self.settings.kafka.topic_raw,
            device_id.encode(),
            record.payload,
            tuple(record.headers()),
        )
        return env, gseq

    def _dlq(
        self, device_id: str, uuid: str, data: bytes, received_us: int, reason: str
    ) -> Envelope:
        headers = (
            (H_DEVICE, device_id.encode()),
            (H_SOURCE, uuid.encode()),
            (H_TRANSPORT, Transport.BLE.value.encode()),
            (H_GATEWAY, self.settings.gateway.id.encode()),
            (H_RECEIVED, str(received_us).encode()),
            (H_DLQ_REASON, reason.encode()),
            (H_DLQ_STAGE, DLQ_STAGE.encode()),
        )
        return Envelope(self.settings.kafka.topic_dlq, device_id.encode(), bytes(data), headers)

    def _device_time_us(self, ts: datetime) -> int:
        aware = ts.replace(tzinfo=self.device_tz) if self.device_tz else ts.astimezone()
        return int(aware.timestamp()) * 1_000_000 + aware.microsecond

    def _tz_offset_min(self, received_us: int) -> int:
        now = datetime.fromtimestamp(received_us / 1e6, self.device_tz) if self.device_tz else (
            datetime.fromtimestamp(received_us / 1e6).astimezone()
        )  # fmt: skip
        off = now.utcoffset()
        return 0 if off is None else int(off.total_seconds() // 60)

    # -- drain to Kafka -----------------------------------------------------------------

    async def _drainer(self) -> None:
        """Buffer -> Kafka, oldest first; a record is acked in the buffer after Kafka's ack."""
        delay = 0.2
        producer: AIOKafkaProducer | None = None
        try:
            while not self._stop.is_set():
                if producer is None:
                    producer = self._producer_factory(self.settings)
                    try:
                        await producer.start()
                    except Exception as e:  # aiokafka raises several kinds while unreachable
                        log.warning("BLE: Kafka unreachable (%s); buffering on disk", e)
                        with contextlib.suppress(Exception):
                            await producer.stop()
                        producer = None
                        await self._sleep_or_stop(delay)
                        delay = min(5.0, delay * 2)
                        continue
                    self.kafka_ready.set()
                    delay = 0.2
                batch = self.buffer.peek()
                if not batch:
                    self._buffered.clear()
                    if not len(self.buffer):
                        self._empty.set()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._buffered.wait(), 0.5)
                    continue
                if not await self._send(producer, batch):
                    await self._sleep_or_stop(delay)
                    delay = min(5.0, delay * 2)
                else:
                    delay = 0.2
        finally:
            self.kafka_ready.clear()
            if producer is not None:
                with contextlib.suppress(Exception):
                    await producer.stop()

    async def _send(self, producer: AIOKafkaProducer, batch: list[Any]) -> bool:
        """Produce a batch; ack the longest acknowledged prefix. True if all went."""
        futures = []
        envs = []
        try:
            for rec in batch:
                env = Envelope.decode(rec.payload)
                envs.append(env)
                futures.append(
                    await producer.send(
                        env.topic, value=env.value, key=env.key, headers=list(env.headers)
                    )
                )
        except Exception as e:
            log.warning("BLE: produce failed (%s); will retry", e)
            self.stats.produce_errors += 1
        results = await asyncio.gather(*futures, return_exceptions=True)
        acked_upto = None
        for rec, env, res in zip(batch, envs, results, strict=False):
            if isinstance(res, BaseException):
                log.warning("BLE: Kafka refused a record (%s); will retry", res)
                self.stats.produce_errors += 1
                break
            acked_upto = rec.index
            if env.topic == self.settings.kafka.topic_dlq:
                self.stats.produced_dlq += 1
            else:
                self.stats.produced += 1
        if acked_upto is not None:
            self.buffer.ack(acked_upto)
        return acked_upto == batch[-1].index

    async def _sleep_or_stop(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
