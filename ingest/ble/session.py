"""One BLE device: its connection, its subscriptions, and its notifications as Kafka records.

Split from the gateway (:mod:`ingest.ble.gateway`) because everything here is about one
peripheral and the GATT health profiles it speaks, while the gateway owns the radio scan,
the set of sessions and their lifecycle.

* **Connections** through ``bleak_retry_connector.establish_connection`` with
  ``BleakClientWithServiceCache``: it backs off between attempts, swaps in an already
  connected BlueZ device and clears stale service caches. Stale connections left by a
  previous gateway process are closed first (``close_stale_connections``). After a drop the
  session reconnects with capped exponential backoff.
* **At connect** Battery Level 0x2A19 (a ``battery_level`` reading) and Device Information
  (manufacturer, model, serial, firmware; logged and kept in the session's
  :class:`DeviceInfo`) are read, then every supported measurement characteristic is
  subscribed (bleak prefers notify over indicate when both are offered). Glucose meters only
  send stored records on request: after subscribing to 0x2A18/0x2A34 and the RACP 0x2A52
  indications the session writes "report stored records" to the Record Access Control Point
  and waits for the RACP response; after the first full fetch it asks only for records with
  a sequence number above the last one buffered, so a reconnect does not re-fetch the whole
  memory.
* **Decoding** happens here, unlike MQTT (see ``vitalproof.raw``): normalization accepts
  only the JSON SampleBatch, so GATT bytes are parsed with :func:`ingest.gatt.decode` and
  the samples forwarded as ``CONTENT_TYPE_JSON`` (:class:`ReadingDecoder`). Bytes that do
  not parse cannot be normalized either, so they go straight to ``vitals.dlq`` with the
  original bytes and ``dlq-reason``/``dlq-stage=ble`` headers, and collection goes on.

Sequence numbers: glucose records carry the meter's own Sequence Number, which is used as
``seq`` (a re-fetched record then gets the same reading id and is deduplicated downstream).
Everything else gets a per-device counter persisted in the buffer directory in reserved
blocks (``ble-state.json``, :class:`DeviceState`): a restart skips to the next block, so a
seq is never reused for a different reading. Device time is the characteristic's timestamp
when it has one (the GSS Date Time has no zone: it is read in ``device_tz``, by default the
gateway's local zone, which is what the phone or hub that set the device clock used);
otherwise the receive time, flagged ``Quality.ESTIMATED_TIME``.

Notifications reach :meth:`BleSession._on_notify` exactly as bleak delivers them:
``callback(BleakGATTCharacteristic, bytearray)``, possibly on a backend thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import BaseBleakScanner
from bleak.exc import BleakError
from bleak_retry_connector import (
    BleakClientWithServiceCache,
    close_stale_connections,
    establish_connection,
)

from ingest.buffered_sink import Envelope
from ingest.gatt import GattError, GlucoseMeasurement, decode
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


# -- persistent per-device state --------------------------------------------------------


class DeviceState:
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


Notification = tuple[str, str, bytes, int]  # address, characteristic uuid, bytes, received µs


# -- one device's connection ------------------------------------------------------------


class BleSession:
    """One peripheral: connect, read, subscribe, fetch; on a drop, back off and do it again.

    The gateway hands it what it shares with every other session: the freshest
    ``BLEDevice`` handle (``device``), the bleak client backend, the persistent
    :class:`DeviceState`, the run's :class:`BleStats`, ``enqueue`` (its notification inbox,
    called on the loop), ``call_on_loop`` (runs a callback on the gateway's loop from any
    thread) and the gateway's ``stop`` event.
    """

    def __init__(
        self,
        address: str,
        info: DeviceInfo,
        *,
        device: Callable[[], BLEDevice],
        backend: type[BaseBleakClient] | None,
        state: DeviceState,
        stats: BleStats,
        enqueue: Callable[[Notification], None],
        call_on_loop: Callable[..., None],
        stop: asyncio.Event,
        max_attempts: int,
        reconnect_backoff_s: tuple[float, float],
        racp_timeout_s: float,
    ) -> None:
        self.address = address
        self.info = info
        self._device = device
        self._backend = backend
        self._state = state
        self.stats = stats
        self._enqueue = enqueue
        self._call_on_loop = call_on_loop
        self._stop = stop
        self.max_attempts = max_attempts
        self.reconnect_backoff_s = reconnect_backoff_s
        self.racp_timeout_s = racp_timeout_s
        self._racp_waiter: asyncio.Future[bytes] | None = None

    async def run(self) -> None:
        """Connect, read, subscribe, fetch; on a drop, back off and do it again."""
        address, info = self.address, self.info
        low, high = self.reconnect_backoff_s
        delay = low
        while not self._stop.is_set():
            disconnected = asyncio.Event()

            def on_disconnect(_client: Any, _ev: asyncio.Event = disconnected) -> None:
                self._call_on_loop(_ev.set)

            client: BleakClientWithServiceCache | None = None
            try:
                device = self._device()
                await close_stale_connections(device)
                client = await establish_connection(
                    BleakClientWithServiceCache,
                    device,
                    info.name or address,
                    disconnected_callback=on_disconnect,
                    max_attempts=self.max_attempts,
                    ble_device_callback=self._device,
                    backend=self._backend,
                )
                info.connected = True
                info.connects += 1
                self.stats.connects += 1
                await self._on_connected(client)
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

    async def _on_connected(self, client: BleakClientWithServiceCache) -> None:
        address, info = self.address, self.info
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
        callback = self._on_notify
        for uuid in MEASUREMENTS:
            if uuid in chars:
                await client.start_notify(uuid, callback)
        if GLUCOSE_MEASUREMENT in chars and RACP in chars:
            await self._fetch_glucose(client, callback)

    async def _fetch_glucose(
        self,
        client: BleakClientWithServiceCache,
        callback: Callable[[BleakGATTCharacteristic, bytearray], None],
    ) -> None:
        """Ask the meter for its stored records; they arrive as notifications before the
        RACP response indication, which ends the procedure."""
        await client.start_notify(RACP, callback)
        last = self._state.glucose_last(self.info.device_id)
        request = racp_report_all() if last is None else racp_report_from(last + 1)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bytes] = loop.create_future()
        self._racp_waiter = waiter
        try:
            self.stats.racp_requests += 1
            await client.write_gatt_char(RACP, request, response=True)
            resp = await asyncio.wait_for(waiter, self.racp_timeout_s)
        finally:
            self._racp_waiter = None
        self.stats.racp_responses += 1
        code = resp[3] if len(resp) >= 4 and resp[0] == RACP_RESPONSE_CODE else None
        if code not in (RACP_SUCCESS, RACP_NO_RECORDS):
            log.warning("BLE: %s: RACP answered %s to %s", self.address, resp.hex(), request.hex())

    # -- notifications (bleak callbacks) ------------------------------------------------

    def _on_notify(self, char: BleakGATTCharacteristic, data: bytearray) -> None:
        """The bleak notification callback; may run on a backend thread."""
        received = time.time_ns() // 1000
        item = (self.address, char.uuid.lower(), bytes(data), received)
        if item[1] == RACP:
            self._call_on_loop(self._racp_response, item[2])
        else:
            self._call_on_loop(self._enqueue, item)

    def _racp_response(self, data: bytes) -> None:
        waiter = self._racp_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(data)
        else:
            log.warning("BLE: %s: unsolicited RACP indication %s", self.address, data.hex())


# -- notification -> Kafka record -------------------------------------------------------


class ReadingDecoder:
    """A notification's bytes -> the record for Kafka: a decoded ``SampleBatch`` for
    ``vitals.raw``, or the original bytes for ``vitals.dlq`` when they do not parse."""

    def __init__(
        self, settings: Settings, state: DeviceState, stats: BleStats, device_tz: tzinfo | None
    ) -> None:
        self.settings = settings
        self._state = state
        self.stats = stats
        self.device_tz = device_tz

    def to_envelope(
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
