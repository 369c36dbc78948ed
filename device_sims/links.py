"""Each simulated device's own MQTT connection, kept as a real wearable keeps it.

What the broker sees of a device: its own connection and credential (username = device id),
QoS 1 publishes to its topic with the MQTT v5 content type set, a reconnect with jittered
exponential backoff after a lost connection (a storm reconnects them all at once), and no
retry after a refused credential. All of them run on one asyncio loop
(:class:`vitalproof.mqtt_loop.MqttLoop`), one thread for a thousand devices.

Connects are made with bounded concurrency so that 1,000 devices do not stampede the
broker's accept queue. ``client.connect()`` itself is a blocking TCP connect (and TLS
handshake), which takes well under a millisecond against a broker on the same host; the
wait for CONNACK is asynchronous.

What the devices measure and when they publish is :mod:`device_sims.fleet`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import resource
import socket
import ssl
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from vitalproof.mqtt_loop import MqttLoop

# CONNACK reason codes after which retrying the same credential is pointless.
_PERMANENT_REFUSALS = {0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C}
_MAX_ERRORS_KEPT = 100
# How long leaving DeviceLinks waits for the broker to close the connections it DISCONNECTs.
_CLOSE_TIMEOUT_S = 5.0


class ErrorLog:
    """How many errors a run had, and the first few, one line each."""

    def __init__(self) -> None:
        self.count = 0
        self.first: list[str] = []

    def add(self, msg: str) -> None:
        self.count += 1
        if len(self.first) < _MAX_ERRORS_KEPT:
            self.first.append(msg)


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


class _Link:
    """One device's MQTT client and what its connection is doing."""

    __slots__ = (
        "client",
        "connack",
        "connected",
        "device_id",
        "ever_connected",
        "failed",
        "password",
        "reconnect_task",
        "storming",
    )

    def __init__(self, device_id: str, password: str) -> None:
        self.device_id = device_id
        self.password = password
        self.client: mqtt.Client
        self.connack: asyncio.Future[bool] | None = None
        self.connected = False
        self.ever_connected = False
        self.failed = False  # refused for good (credentials): do not retry
        self.storming = False  # we cut the connection on purpose
        self.reconnect_task: asyncio.Task[None] | None = None


class DeviceLinks:
    """The MQTT connections of ``devices`` (``(device_id, password)`` pairs).

    Use as ``async with DeviceLinks(...) as links:``; :meth:`connect_all`, then
    :meth:`publish`. Leaving the block stops reconnecting and DISCONNECTs every device.
    Errors are recorded in ``errors``, never raised; ``on_ack`` is called after each PUBACK.
    """

    def __init__(
        self,
        devices: Sequence[tuple[str, str]],
        host: str,
        port: int,
        *,
        content_type: str,
        topic_format: str,
        errors: ErrorLog,
        on_ack: Callable[[], None],
        tls: ssl.SSLContext | None = None,
        seed: int = 0,
        connect_concurrency: int = 64,
        connect_timeout_s: float = 10.0,
        keepalive_s: int = 60,
    ) -> None:
        self.devices = list(devices)
        self.host, self.port = host, port
        self.topic_format = topic_format
        self.errors, self.on_ack = errors, on_ack
        self.tls, self.seed = tls, seed
        self.connect_concurrency = max(1, connect_concurrency)
        self.connect_timeout_s, self.keepalive_s = connect_timeout_s, keepalive_s
        self._props = _PackedProperties(content_type)
        self._links: dict[str, _Link] = {}
        self._mqtt_loop = MqttLoop(close_timeout_s=_CLOSE_TIMEOUT_S)
        self._closing = False
        self.acked = 0  # PUBACKs with a success reason code
        self.ack_failed = 0
        self.reconnects = 0
        self.connected_now = 0  # devices connected right now

    @property
    def ever_connected(self) -> int:
        """Devices that connected at least once."""
        return sum(link.ever_connected for link in self._links.values())

    async def __aenter__(self) -> Self:
        _raise_fd_limit(len(self.devices) + 256)
        await self._mqtt_loop.__aenter__()
        for device_id, password in self.devices:
            link = _Link(device_id, password)
            link.client = self._make_client(link)
            self._mqtt_loop.attach(link.client)
            self._links[device_id] = link
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing = True
        for link in self._links.values():
            if link.reconnect_task is not None:
                link.reconnect_task.cancel()
        await self._mqtt_loop.__aexit__(exc_type, exc, tb)

    async def connect_all(self) -> None:
        """Connect every device (``connect_concurrency`` at a time); one that fails keeps
        trying in the background, as a real device would."""
        sem = asyncio.Semaphore(self.connect_concurrency)

        async def connect(link: _Link) -> None:
            async with sem:
                if not await self._open(link, first=True):
                    self._schedule_reconnect(link)

        await asyncio.gather(*(connect(link) for link in self._links.values()))

    def refused(self, device_id: str) -> bool:
        """The broker refused this device's credential for good: it publishes no more."""
        return self._links[device_id].failed

    def publish(self, device_id: str, payload: bytes) -> bool:
        """A QoS 1 publish from the device; False (and an error) if paho did not take it.

        While the device is disconnected paho queues it and sends it after the reconnect."""
        info = self._links[device_id].client.publish(
            self.topic_format.format(device_id=device_id),
            payload,
            qos=1,
            properties=self._props,
        )
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self.errors.add(f"{device_id}: publish failed: {mqtt.error_string(info.rc)}")
            return False
        return True

    def cut(self, device_id: str) -> None:
        """Drop the TCP connection without DISCONNECT, as a network outage would."""
        link = self._links[device_id]
        sock: Any = link.client.socket()
        if sock is None or not link.connected:
            return
        link.storming = True
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    # -- connecting ----------------------------------------------------------------------

    def _make_client(self, link: _Link) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=link.device_id,
            protocol=mqtt.MQTTv5,
            userdata=link,
        )
        client.username_pw_set(link.device_id, link.password)
        if self.tls is not None:
            client.tls_set_context(self.tls)
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        return client

    async def _open(self, link: _Link, *, first: bool) -> bool:
        """(Re)connect and wait for CONNACK; errors are recorded, never raised."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        link.connack = fut
        try:
            if first:
                link.client.connect(self.host, self.port, keepalive=self.keepalive_s)
            else:
                link.client.reconnect()
        except (OSError, ValueError) as e:
            self.errors.add(f"{link.device_id}: connect to {self.host}:{self.port} failed: {e}")
            link.connack = None
            return False
        try:
            return await asyncio.wait_for(fut, self.connect_timeout_s)
        except TimeoutError:
            self.errors.add(f"{link.device_id}: no CONNACK within {self.connect_timeout_s:g} s")
            return False
        finally:
            link.connack = None

    def _schedule_reconnect(self, link: _Link) -> None:
        if link.reconnect_task is None and not self._closing and not link.failed:
            link.reconnect_task = asyncio.get_running_loop().create_task(self._reconnect(link))

    async def _reconnect(self, link: _Link) -> None:
        """Reconnect with jittered exponential backoff (a storm reconnects all at once)."""
        rng = random.Random(f"reconnect/{self.seed}/{link.device_id}")
        delay = rng.uniform(0.05, 0.5)
        try:
            while not self._closing and not link.failed and not link.connected:
                await asyncio.sleep(delay)
                if self._closing:
                    break
                if await self._open(link, first=False):
                    self.reconnects += 1
                    break
                delay = min(5.0, delay * 2) * rng.uniform(0.8, 1.2)
        finally:
            link.reconnect_task = None

    # -- paho callbacks (all run on the event loop thread) -------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        link: _Link,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        ok = not reason.is_failure
        if ok:
            link.connected = link.ever_connected = True
            link.storming = False
            self.connected_now += 1
        else:
            self.errors.add(f"{link.device_id}: connection refused: {reason}")
            if reason.value in _PERMANENT_REFUSALS:
                link.failed = True
        if link.connack is not None and not link.connack.done():
            link.connack.set_result(ok)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        link: _Link,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if link.connected:
            self.connected_now -= 1
        link.connected = False
        if link.connack is not None and not link.connack.done():
            link.connack.set_result(False)
        if self._closing or link.failed:
            return
        if not link.storming:
            self.errors.add(f"{link.device_id}: connection lost: {reason}")
        self._schedule_reconnect(link)

    def _on_publish(
        self,
        client: mqtt.Client,
        link: _Link,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self.ack_failed += 1
            self.errors.add(f"{link.device_id}: PUBACK {reason}")
        else:
            self.acked += 1
        self.on_ack()


def _raise_fd_limit(needed: int) -> None:
    """One socket per device: lift the soft open-files limit toward the hard one if needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
