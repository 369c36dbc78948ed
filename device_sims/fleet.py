"""A fleet of simulated wearables publishing to a real MQTT v5 broker.

Each device is what a real one would be to the broker: its own connection, its own
credential (username = device id), QoS 1 publishes of JSON ``SampleBatch`` payloads to
``devices/<device_id>/vitals`` with the MQTT v5 content type set.

Why asyncio with paho's external-loop callbacks instead of ``loop_start()``: one network
thread per client does not scale to a thousand devices on two cores (and the GIL would
serialize them anyway). Here every client's socket is registered with the event loop
(``add_reader``/``add_writer``), so a single thread drives all connections; keepalives are
serviced by one shared timer that calls ``loop_misc`` on every client.

Connects are made with bounded concurrency so that 1,000 devices do not stampede the
broker's accept queue. ``client.connect()`` itself is a blocking TCP connect (and TLS
handshake), which takes well under a millisecond against a broker on the same host; the
wait for CONNACK is asynchronous.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import resource
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from device_sims.faults import Drop, FaultInjector, FaultSpec, Send, Storm, parse_fault_spec
from device_sims.physiology import Profile, SimDevice
from device_sims.record import GroundTruthWriter, valid_reading_ids
from vitalproof import binary
from vitalproof.schema import CONTENT_TYPE_JSON, SampleBatch, reading_id

TOPIC_FORMAT = "devices/{device_id}/vitals"
#: Payload encodings a fleet can publish, by the name ``Fleet(encoding=...)`` takes.
ENCODINGS = {"json": CONTENT_TYPE_JSON, "binary": binary.CONTENT_TYPE_BINARY}
# Faults that rewrite a payload (they parse and re-serialize JSON).
_JSON_ONLY_FAULTS = ("malformed", "skew", "jump", "reset")
# CONNACK reason codes after which retrying the same credential is pointless.
_PERMANENT_REFUSALS = {0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C}
_MAX_ERRORS_KEPT = 100


@dataclass(frozen=True, slots=True)
class FleetProgress:
    """A snapshot for progress displays (the CLI renders it with rich)."""

    phase: str  # connecting | running | draining | closing | done
    elapsed_s: float
    devices: int
    connected: int  # devices connected right now
    sent: int
    acked: int
    errors: int
    reconnects: int


@dataclass(slots=True)
class FleetReport:
    devices: int
    connected: int  # devices that connected at least once
    messages_sent: int  # publishes handed to the clients (duplicates, malformed included)
    messages_acked: int  # PUBACKs with a success reason code
    readings_sent: int  # distinct reading ids published
    malformed_sent: int
    duplicates_sent: int
    dropped: int  # messages lost by fault injection (never published)
    storms: int
    reconnects: int
    elapsed_s: float  # of the running phase
    error_count: int = 0
    errors: list[str] = field(default_factory=list)  # the first few, one line each

    @property
    def unacked(self) -> int:
        return self.messages_sent - self.messages_acked

    @property
    def ok(self) -> bool:
        return self.error_count == 0 and self.unacked == 0


class _PackedProperties(Properties):
    """PUBLISH properties serialized once: every message carries the same content type.

    paho re-serializes properties on every publish; with thousands of publishes a second
    that is a noticeable share of the CPU, and the bytes never change.
    """

    def __init__(self, content_type: str) -> None:
        super().__init__(PacketTypes.PUBLISH)
        self.ContentType = content_type
        # Properties.__setattr__ only admits MQTT property names.
        object.__setattr__(self, "_packed", super().pack())

    def pack(self) -> bytes:
        packed: bytes = self.__dict__["_packed"]
        return packed


class _Device:
    """Runtime state of one simulated device and its MQTT client."""

    __slots__ = (
        "client",
        "connack",
        "connected",
        "device_id",
        "ever_connected",
        "failed",
        "index",
        "password",
        "reconnect_task",
        "sim",
        "storming",
    )

    def __init__(self, index: int, device_id: str, password: str) -> None:
        self.index = index
        self.device_id = device_id
        self.password = password
        self.sim: SimDevice | None = None  # created when the running phase starts
        self.client: mqtt.Client
        self.connack: asyncio.Future[bool] | None = None
        self.connected = False
        self.ever_connected = False
        self.failed = False  # refused for good (credentials): do not retry
        self.storming = False  # we cut the connection on purpose
        self.reconnect_task: asyncio.Task[None] | None = None


class Fleet:
    """Simulate ``devices`` (``(device_id, password)`` pairs) for ``duration_s`` seconds.

    Every device calls its simulator ``rate_hz`` times a second and publishes what it has
    (a tick with no due samples publishes nothing, so ``rate_hz`` is an upper bound unless
    ``accel_hz >= rate_hz``). ``faults`` is a :class:`FaultSpec` or its string form;
    ``record_path`` receives the ground truth (see :mod:`device_sims.record`).
    ``encoding`` is ``"json"`` (default) or ``"binary"`` (:mod:`vitalproof.binary`, for
    high-rate sensors); the MQTT v5 content type names it. The faults that rewrite payloads
    (malformed, skew, jump, reset) work on JSON only.
    """

    def __init__(
        self,
        devices: Sequence[tuple[str, str]],
        host: str,
        port: int,
        rate_hz: float = 1.0,
        duration_s: float = 10.0,
        faults: FaultSpec | str | None = None,
        record_path: Path | str | None = None,
        accel_hz: int = 0,
        tls: ssl.SSLContext | None = None,
        on_progress: Callable[[FleetProgress], None] | None = None,
        *,
        seed: int = 0,
        profile: str | Profile = "adult",
        connect_concurrency: int = 64,
        connect_timeout_s: float = 10.0,
        ack_timeout_s: float = 30.0,
        keepalive_s: int = 60,
        progress_interval_s: float = 0.5,
        topic_format: str = TOPIC_FORMAT,
        encoding: str = "json",
    ) -> None:
        if rate_hz <= 0:
            raise ValueError(f"rate_hz must be > 0, got {rate_hz}")
        if duration_s < 0:
            raise ValueError(f"duration_s must be >= 0, got {duration_s}")
        ids = [d for d, _ in devices]
        if len(set(ids)) != len(ids):
            raise ValueError("device ids must be unique")
        self.devices = list(devices)
        self.host, self.port = host, port
        self.rate_hz, self.duration_s = rate_hz, duration_s
        self.faults = faults if isinstance(faults, FaultSpec) else parse_fault_spec(faults)
        self.record_path = Path(record_path) if record_path is not None else None
        self.accel_hz, self.tls, self.on_progress = accel_hz, tls, on_progress
        self.seed, self.profile = seed, profile
        self.connect_concurrency = max(1, connect_concurrency)
        self.connect_timeout_s, self.ack_timeout_s = connect_timeout_s, ack_timeout_s
        self.keepalive_s, self.progress_interval_s = keepalive_s, progress_interval_s
        self.topic_format = topic_format
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r} (known: {', '.join(ENCODINGS)})")
        rewriting = [k for k in _JSON_ONLY_FAULTS if getattr(self.faults, k) > 0]
        if encoding != "json" and rewriting:
            raise ValueError(f"faults {', '.join(rewriting)} need encoding='json'")
        self.encoding = encoding

        self._props = _PackedProperties(ENCODINGS[encoding])
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._devs: dict[str, _Device] = {}
        self._sent = self._acked = self._ack_failed = 0
        self._malformed = self._duplicates = self._dropped = self._storms = 0
        self._reconnects = self._connected_now = 0
        self._ids: set[str] = set()
        self._errors: list[str] = []
        self._error_count = 0
        self._phase = "connecting"
        self._closing = False
        self._t0 = time.monotonic()
        self._run_started = self._run_ended = self._t0
        self._drained: asyncio.Event | None = None
        self._open_sockets = 0

    # -- public ------------------------------------------------------------------------

    async def run(self) -> FleetReport:
        """Connect, simulate, wait for every PUBACK (bounded), disconnect, report."""
        loop = asyncio.get_running_loop()
        self._reset_counters()
        self._loop = loop
        self._drained = asyncio.Event()
        self._all_closed = asyncio.Event()
        _raise_fd_limit(len(self.devices) + 256)
        injector = FaultInjector(self.faults, self.seed, [d for d, _ in self.devices])
        writer = GroundTruthWriter(self.record_path) if self.record_path else None
        misc = loop.create_task(self._misc_loop())
        progress = loop.create_task(self._progress_loop())
        try:
            for i, (device_id, password) in enumerate(self.devices):
                dev = _Device(i, device_id, password)
                dev.client = self._make_client(dev)
                self._devs[device_id] = dev

            sem = asyncio.Semaphore(self.connect_concurrency)

            async def connect(dev: _Device) -> None:
                async with sem:
                    if not await self._open(dev, first=True):
                        self._schedule_reconnect(dev)  # real devices keep trying

            await asyncio.gather(*(connect(d) for d in self._devs.values()))

            self._phase = "running"
            start_wall_us = time.time_ns() // 1000
            start = loop.time()
            self._run_started = time.monotonic()
            period = 1.0 / self.rate_hz
            n = max(1, len(self._devs))

            def emit(events: list[Drop | Send | Storm]) -> None:
                for ev in events:
                    self._handle(ev, writer)

            async def device_loop(dev: _Device) -> None:
                # Devices power on staggered across one period and each runs duration_s,
                # so the load is spread evenly, at the end as well as at the start.
                offset = period * dev.index / n
                t0 = start + offset
                sim = dev.sim = SimDevice(
                    dev.device_id,
                    self.seed,
                    self.profile,
                    start_wall_us + round(offset * 1e6),
                    self.accel_hz,
                )
                ticks = max(1, math.ceil(self.duration_s * self.rate_hz - 1e-9))
                end_us = sim.start_time_us + round(self.duration_s * 1e6)
                k = 1
                while k <= ticks:
                    due = t0 + min(k * period, self.duration_s)
                    await asyncio.sleep(max(0.0, due - loop.time()))
                    now = loop.time()
                    # Device time stops at duration_s, so the data volume is fixed...
                    now_us = min(end_us, start_wall_us + round((now - start) * 1e6))
                    batch = sim.tick(now_us)
                    if batch is not None and not dev.failed:
                        emit(injector.apply(dev.device_id, self._encode(batch)))
                    # ...and an overloaded loop skips the slots it already missed (the next
                    # tick carries their samples in one batch) instead of spiralling: fewer,
                    # larger messages, visible in the report as a lower message rate.
                    k = max(k + 1, min(ticks, math.floor((now - t0) / period)))

            await asyncio.gather(*(device_loop(d) for d in self._devs.values()))
            emit(injector.flush())
            self._run_ended = time.monotonic()

            self._phase = "draining"
            self._check_drained()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), self.ack_timeout_s)
            if self._sent - self._acked - self._ack_failed > 0:
                self._error(
                    f"{self._sent - self._acked - self._ack_failed} messages not acknowledged "
                    f"within {self.ack_timeout_s:g} s"
                )
        finally:
            self._phase = "closing"
            await self._close_all()
            misc.cancel()
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await misc
            with contextlib.suppress(asyncio.CancelledError):
                await progress
            if writer is not None:
                writer.close()
            self._phase = "done"
            self._report_progress()
        return FleetReport(
            devices=len(self._devs),
            connected=sum(d.ever_connected for d in self._devs.values()),
            messages_sent=self._sent,
            messages_acked=self._acked,
            readings_sent=len(self._ids),
            malformed_sent=self._malformed,
            duplicates_sent=self._duplicates,
            dropped=self._dropped,
            storms=self._storms,
            reconnects=self._reconnects,
            elapsed_s=self._run_ended - self._run_started,
            error_count=self._error_count,
            errors=list(self._errors),
        )

    # -- events from the fault layer ---------------------------------------------------

    def _handle(self, ev: Drop | Send | Storm, writer: GroundTruthWriter | None) -> None:
        if isinstance(ev, Send):
            dev = self._devs[ev.device_id]
            info = dev.client.publish(
                self.topic_format.format(device_id=ev.device_id),
                ev.payload,
                qos=1,
                properties=self._props,
            )
            # NO_CONN: queued inside paho, sent after the reconnect; anything else is lost.
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                self._error(f"{ev.device_id}: publish failed: {mqtt.error_string(info.rc)}")
                return
            self._sent += 1
            ids = [] if ev.malformed else self._reading_ids(ev.device_id, ev.payload)
            self._ids.update(ids)
            self._malformed += ev.malformed is not None
            self._duplicates += ev.duplicate
            if writer is not None:
                writer.message(
                    ev.device_id,
                    ev.payload,
                    ids,
                    malformed_reason=ev.malformed,
                    duplicate=ev.duplicate,
                )
        elif isinstance(ev, Drop):
            self._dropped += 1
            if writer is not None:
                writer.drop(ev.device_id, self._reading_ids(ev.device_id, ev.payload))
        else:
            self._storms += 1
            if writer is not None:
                writer.storm(ev.device_ids)
            for device_id in ev.device_ids:
                self._cut(self._devs[device_id])

    def _encode(self, batch: SampleBatch) -> bytes:
        if self.encoding == "binary":
            # The topic names the device; float32 only where lossless, so the values the
            # pipeline decodes are the simulator's, as with JSON.
            return binary.encode(batch, with_device=False)
        return batch.to_json()

    def _reading_ids(self, device_id: str, payload: bytes) -> list[str]:
        if self.encoding == "binary":
            b = binary.decode(payload, device_id=device_id)
            return [
                reading_id(device_id, m, q, t)
                for m, q, t in zip(b.metric, b.seq, b.device_time_us, strict=True)
            ]
        return valid_reading_ids(device_id, payload)

    def _cut(self, dev: _Device) -> None:
        """Drop the TCP connection without DISCONNECT, as a network outage would."""
        sock = dev.client.socket()
        if sock is None or not dev.connected:
            return
        dev.storming = True
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]

    # -- connection management ---------------------------------------------------------

    def _make_client(self, dev: _Device) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=dev.device_id,
            protocol=mqtt.MQTTv5,
            userdata=dev,
        )
        client.username_pw_set(dev.device_id, dev.password)
        if self.tls is not None:
            client.tls_set_context(self.tls)
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        return client

    async def _open(self, dev: _Device, *, first: bool) -> bool:
        """(Re)connect and wait for CONNACK; errors are recorded, never raised."""
        fut: asyncio.Future[bool] = self._loop.create_future()
        dev.connack = fut
        try:
            if first:
                dev.client.connect(self.host, self.port, keepalive=self.keepalive_s)
            else:
                dev.client.reconnect()
        except (OSError, ValueError) as e:
            self._error(f"{dev.device_id}: connect to {self.host}:{self.port} failed: {e}")
            dev.connack = None
            return False
        try:
            return await asyncio.wait_for(fut, self.connect_timeout_s)
        except TimeoutError:
            self._error(f"{dev.device_id}: no CONNACK within {self.connect_timeout_s:g} s")
            return False
        finally:
            dev.connack = None

    def _schedule_reconnect(self, dev: _Device) -> None:
        if dev.reconnect_task is None and not self._closing and not dev.failed:
            dev.reconnect_task = self._loop.create_task(self._reconnect(dev))

    async def _reconnect(self, dev: _Device) -> None:
        """Reconnect with jittered exponential backoff (a storm reconnects all at once)."""
        rng = random.Random(f"reconnect/{self.seed}/{dev.device_id}")
        delay = rng.uniform(0.05, 0.5)
        try:
            while not self._closing and not dev.failed and not dev.connected:
                await asyncio.sleep(delay)
                if self._closing:
                    break
                if await self._open(dev, first=False):
                    self._reconnects += 1
                    break
                delay = min(5.0, delay * 2) * rng.uniform(0.8, 1.2)
        finally:
            dev.reconnect_task = None

    async def _close_all(self) -> None:
        self._closing = True
        for dev in self._devs.values():
            if dev.reconnect_task is not None:
                dev.reconnect_task.cancel()
            if dev.client.socket() is not None:
                dev.client.disconnect()
        if self._open_sockets > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), 5.0)
        for dev in self._devs.values():
            if dev.client.socket() is not None:  # broker never answered: close our side
                dev.client._sock_close()

    # -- paho callbacks (all run on the event loop thread) -------------------------------

    def _on_socket_open(self, client: mqtt.Client, dev: _Device, sock: Any) -> None:
        self._open_sockets += 1
        self._loop.add_reader(sock, self._on_readable, client)

    def _on_readable(self, client: mqtt.Client) -> None:
        client.loop_read()
        # TLS may hold decrypted bytes that select() cannot see: drain them now.
        sock = client.socket()
        while isinstance(sock, ssl.SSLSocket) and sock.pending():
            client.loop_read()
            sock = client.socket()

    def _on_socket_close(self, client: mqtt.Client, dev: _Device, sock: Any) -> None:
        self._open_sockets -= 1
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)
        if self._open_sockets == 0:
            self._all_closed.set()

    def _on_socket_register_write(self, client: mqtt.Client, dev: _Device, sock: Any) -> None:
        self._loop.add_writer(sock, client.loop_write)

    def _on_socket_unregister_write(self, client: mqtt.Client, dev: _Device, sock: Any) -> None:
        self._loop.remove_writer(sock)

    def _on_connect(
        self,
        client: mqtt.Client,
        dev: _Device,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        ok = not reason.is_failure
        if ok:
            dev.connected = dev.ever_connected = True
            dev.storming = False
            self._connected_now += 1
        else:
            self._error(f"{dev.device_id}: connection refused: {reason}")
            if reason.value in _PERMANENT_REFUSALS:
                dev.failed = True
        if dev.connack is not None and not dev.connack.done():
            dev.connack.set_result(ok)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        dev: _Device,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if dev.connected:
            self._connected_now -= 1
        dev.connected = False
        if dev.connack is not None and not dev.connack.done():
            dev.connack.set_result(False)
        if self._closing or dev.failed:
            return
        if not dev.storming:
            self._error(f"{dev.device_id}: connection lost: {reason}")
        self._schedule_reconnect(dev)

    def _on_publish(
        self,
        client: mqtt.Client,
        dev: _Device,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._ack_failed += 1
            self._error(f"{dev.device_id}: PUBACK {reason}")
        else:
            self._acked += 1
        self._check_drained()

    # -- housekeeping ------------------------------------------------------------------

    def _check_drained(self) -> None:
        if (
            self._drained is not None
            and self._phase == "draining"
            and self._acked + self._ack_failed >= self._sent
        ):
            self._drained.set()

    def _error(self, msg: str) -> None:
        self._error_count += 1
        if len(self._errors) < _MAX_ERRORS_KEPT:
            self._errors.append(msg)

    async def _misc_loop(self) -> None:
        """Keepalive pings and timeouts for every client, once a second."""
        while True:
            await asyncio.sleep(1.0)
            for dev in self._devs.values():
                if dev.client.socket() is not None:
                    dev.client.loop_misc()

    async def _progress_loop(self) -> None:
        while True:
            self._report_progress()
            await asyncio.sleep(self.progress_interval_s)

    def _report_progress(self) -> None:
        if self.on_progress is None:
            return
        self.on_progress(
            FleetProgress(
                phase=self._phase,
                elapsed_s=time.monotonic() - self._t0,
                devices=len(self.devices),
                connected=self._connected_now,
                sent=self._sent,
                acked=self._acked,
                errors=self._error_count,
                reconnects=self._reconnects,
            )
        )


def _raise_fd_limit(needed: int) -> None:
    """One socket per device: lift the soft open-files limit toward the hard one if needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
