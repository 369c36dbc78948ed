"""The BLE gateway: health-profile peripherals -> GATT decode -> disk buffer -> Kafka.

The front of ``vitalproof collect ble``. It scans, runs one
:class:`ingest.ble.session.BleSession` per device, turns their notifications into Kafka
records in one writer task, and hands those to a :class:`ingest.buffered_sink.BufferedKafkaSink`;
it starts and stops all of them together. What one device does (connect, read, subscribe,
decode) is in :mod:`ingest.ble.session`; how records survive Kafka being away is in
:mod:`ingest.buffered_sink`.

* **Discovery** with ``bleak.BleakScanner(service_uuids=[...])`` filtered on the standard
  health services (Heart Rate 0x180D, Pulse Oximeter 0x1822, Health Thermometer 0x1809,
  Blood Pressure 0x1810, Weight Scale 0x181D, Glucose 0x1808), so the radio reports only
  devices we could use, plus an optional allow-list (address -> device id) because a ward
  is full of other patients' sensors. Several devices run side by side, one session task
  each (references kept, so none is garbage-collected mid-flight); what is known of each is
  kept in :attr:`BleCollector.devices`.
* **Durability**: every record is appended (fsync'd, one fsync per group of notifications)
  to the disk buffer before anything else, and leaves it only after Kafka acknowledged it.
  While Kafka is unreachable records accumulate on disk; a restarted gateway drains what the
  previous one buffered, in order. When the bound is hit the oldest are evicted, counted in
  :attr:`BleStats.evicted` and logged. A glucose meter's high-water mark is saved only once
  its records are durable.

The radio is abstracted the way bleak itself does it: :class:`BleBackend` names the bleak
scanner and client *backend classes* (``None`` = the platform's), so a simulated radio
(``device_sims.ble``) runs under the real ``BleakScanner``, ``BleakClient`` and
``establish_connection`` code, and notifications reach the session exactly as bleak
delivers them: ``callback(BleakGATTCharacteristic, bytearray)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import tzinfo
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from bleak import BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakError

from ingest.ble.session import (
    HEALTH_SERVICES,
    BleBackend,
    BleSession,
    BleStats,
    DeviceInfo,
    DeviceState,
    Notification,
    ReadingDecoder,
)
from ingest.buffer import DiskBuffer
from ingest.buffered_sink import BufferedKafkaSink, Envelope
from vitalproof.settings import Settings

log = logging.getLogger(__name__)


def device_id_for(address: str) -> str:
    """Stable id for a device not on the allow-list: ``ble-`` + address, lowercase, no colons."""
    return "ble-" + address.lower().replace(":", "").replace("-", "")


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
        self._state = DeviceState(self.buffer_dir / "ble-state.json")
        self.max_attempts = max_attempts
        self.reconnect_backoff_s = reconnect_backoff_s
        self.racp_timeout_s = racp_timeout_s
        self.device_tz = device_tz
        self.stats = BleStats()
        self.sink = BufferedKafkaSink(
            settings, self.buffer, self.stats, producer_factory=producer_factory, label="BLE"
        )
        self.devices: dict[str, DeviceInfo] = {}
        """By address (upper case): what we know of every device we connected."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._inbox: asyncio.Queue[Notification] = asyncio.Queue()
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sessions: dict[str, asyncio.Task[None]] = {}
        self._ble_devices: dict[str, BLEDevice] = {}

    @property
    def kafka_ready(self) -> asyncio.Event:
        """Set while the sink's producer is started (Kafka reachable)."""
        return self.sink.kafka_ready

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
        self.sink.counters = self.stats  # the sink counts into this run's stats
        decoder = ReadingDecoder(self.settings, self._state, self.stats, self.device_tz)
        writer = self._spawn(self._writer(decoder), "ble-writer")
        drainer = self._spawn(self.sink.run(), "ble-drainer")
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
            await self.sink.drain(drain_on_stop_s)
            self._stop.set()
            self.sink.stop()
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
        session = BleSession(
            address,
            info,
            device=lambda: self._ble_devices[address],
            backend=self.backend.client,
            state=self._state,
            stats=self.stats,
            enqueue=self._enqueue,
            call_on_loop=self._call_on_loop,
            stop=self._stop,
            max_attempts=self.max_attempts,
            reconnect_backoff_s=self.reconnect_backoff_s,
            racp_timeout_s=self.racp_timeout_s,
        )
        self._sessions[address] = self._spawn(session.run(), f"ble-{address}")

    # -- notifications (from the sessions) ----------------------------------------------

    def _enqueue(self, item: Notification) -> None:
        self.stats.notifications += 1
        self._inbox.put_nowait(item)

    def _call_on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    # -- decode + buffer ----------------------------------------------------------------

    async def _writer(self, decoder: ReadingDecoder) -> None:
        """Turn queued notifications into envelopes and append them, one fsync per group."""
        while True:
            items = [await self._inbox.get()]
            while not self._inbox.empty() and len(items) < 500:
                items.append(self._inbox.get_nowait())
            envelopes: list[Envelope] = []
            glucose: dict[str, int] = {}
            for address, uuid, data, received in items:
                device_id = self.devices[address].device_id
                env, gseq = decoder.to_envelope(device_id, uuid, data, received)
                if env is not None:
                    envelopes.append(env)
                if gseq is not None:
                    glucose[device_id] = max(gseq, glucose.get(device_id, gseq))
            if envelopes:
                self.sink.append(envelopes)
            for device_id, gseq in glucose.items():  # only once the records are durable
                self._state.set_glucose_last(device_id, gseq)
            for _ in items:
                self._inbox.task_done()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
