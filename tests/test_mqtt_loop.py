"""paho clients on the asyncio loop (vitalproof.mqtt_loop) against the session's real Mosquitto.

Plain paho clients, no collector and no fleet: publish and subscribe through one loop with
no thread, keepalive pings that hold an idle connection open (and a connection without them
that the broker drops), and leaving the block against a broker that never answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from vitalproof.devstack import collector_credentials, remove_device, set_device_credentials
from vitalproof.mqtt_loop import MqttLoop, abort
from vitalproof.settings import Settings

pytestmark = pytest.mark.integration

TIMEOUT = 15.0


class Events:
    """One client's callbacks as asyncio events and lists (they run on the loop's thread)."""

    def __init__(self, client: mqtt.Client) -> None:
        self.connack: asyncio.Future[ReasonCode] = asyncio.get_running_loop().create_future()
        self.subscribed = asyncio.Event()
        self.disconnects: list[ReasonCode] = []
        self.messages: list[bytes] = []
        self.acked: list[int] = []
        client.on_connect = self._on_connect
        client.on_subscribe = lambda _c, _u, _mid, _rcs, _p: self.subscribed.set()
        client.on_message = lambda _c, _u, msg: self.messages.append(bytes(msg.payload))
        client.on_publish = lambda _c, _u, mid, _rc, _p: self.acked.append(mid)
        client.on_disconnect = self._on_disconnect
        self.dropped = asyncio.Event()

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        if not self.connack.done():
            self.connack.set_result(rc)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self.disconnects.append(rc)
        self.dropped.set()


def _client(user: str, password: str) -> mqtt.Client:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"loop-{uuid.uuid4().hex[:10]}",
        protocol=mqtt.MQTTv5,
    )
    client.username_pw_set(user, password)
    return client


async def _until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@pytest.fixture
def device(settings: Settings) -> Any:
    device_id, password = f"loop-{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    set_device_credentials(settings, {device_id: password})
    yield device_id, password
    remove_device(settings, device_id)


def test_two_clients_on_one_loop_publish_receive_and_close_without_a_thread(
    settings: Settings, device: tuple[str, str]
) -> None:
    device_id, password = device
    topic = f"devices/{device_id}/vitals"
    payloads = [b"m%04d" % i + b"x" * (i * 37 % 5000) for i in range(500)]
    threads_before = set(threading.enumerate())

    async def go() -> tuple[Events, Events, mqtt.Client, mqtt.Client]:
        sub = _client(*collector_credentials(settings))
        pub = _client(device_id, password)
        async with MqttLoop() as mqtt_loop:
            mqtt_loop.attach(sub)
            mqtt_loop.attach(pub)
            sub_ev, pub_ev = Events(sub), Events(pub)
            sub.connect(settings.mqtt.host, settings.mqtt.port)
            pub.connect(settings.mqtt.host, settings.mqtt.port)
            for ev in (sub_ev, pub_ev):
                rc = await asyncio.wait_for(ev.connack, TIMEOUT)
                assert not rc.is_failure, rc
            sub.subscribe(topic, qos=1)
            await asyncio.wait_for(sub_ev.subscribed.wait(), TIMEOUT)
            mids = [pub.publish(topic, p, qos=1).mid for p in payloads]
            await _until(lambda: len(sub_ev.messages) >= len(payloads), "the messages")
            await _until(lambda: len(pub_ev.acked) >= len(mids), "the PUBACKs")
            assert sorted(pub_ev.acked) == sorted(mids)
            assert set(threading.enumerate()) == threads_before, "a thread was started"
        return sub_ev, pub_ev, sub, pub

    sub_ev, pub_ev, sub, pub = asyncio.run(go())
    assert sub_ev.messages == payloads, "lost, altered or reordered"
    # Leaving the block sent DISCONNECT: both closed, and paho calls it a clean disconnect.
    assert sub.socket() is None and pub.socket() is None
    for ev in (sub_ev, pub_ev):
        assert len(ev.disconnects) == 1 and not ev.disconnects[0].is_failure, ev.disconnects


def test_keepalive_pings_hold_an_idle_connection_that_the_broker_drops_without_them(
    settings: Settings, device: tuple[str, str]
) -> None:
    """Mosquitto drops a client silent past its keepalive (1 s here; mosquitto 2.0 notices
    within about 6 s): the loop's timer must ping. Both clients idle side by side."""
    device_id, password = device

    async def idle(misc_interval_s: float) -> tuple[list[ReasonCode], bool]:
        """(disconnects seen, still connected) after 10 idle seconds or the first drop."""
        client = _client(device_id, password)
        async with MqttLoop(misc_interval_s=misc_interval_s) as mqtt_loop:
            mqtt_loop.attach(client)
            ev = Events(client)
            client.connect(settings.mqtt.host, settings.mqtt.port, keepalive=1)
            rc = await asyncio.wait_for(ev.connack, TIMEOUT)
            assert not rc.is_failure, rc
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.dropped.wait(), 10.0)
            return list(ev.disconnects), client.socket() is not None

    async def both() -> list[tuple[list[ReasonCode], bool]]:
        return await asyncio.gather(idle(0.2), idle(3600.0))

    (pinged, pinged_open), (silent, silent_open) = asyncio.run(both())
    assert pinged_open and pinged == [], "pinged every 0.2 s, the connection must hold"
    assert not silent_open and len(silent) == 1, "without pings the broker drops it"


def test_leaving_the_block_closes_what_a_silent_broker_leaves_open() -> None:
    """A broker that accepts and then reads nothing: DISCONNECT cannot be sent (the socket
    buffers are full), so the block waits ``close_timeout_s`` and closes our side."""

    async def go() -> tuple[Events, mqtt.Client, float]:
        accepted: list[asyncio.StreamWriter] = []

        async def silent(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            accepted.append(w)  # never read, never answer

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = _client("nobody", "x")
        try:
            async with MqttLoop(close_timeout_s=0.5) as mqtt_loop:
                mqtt_loop.attach(client)
                ev = Events(client)
                client.connect("127.0.0.1", port)
                await _until(lambda: bool(accepted), "the TCP accept")
                # More than loopback's socket buffers hold: the writer stays registered.
                client.publish("devices/x/vitals", b"\0" * (32 << 20), qos=0)
                await asyncio.sleep(0.2)
                assert client.socket() is not None
                t0 = time.monotonic()
            return ev, client, time.monotonic() - t0
        finally:
            for w in accepted:
                w.close()
            server.close()
            await server.wait_closed()

    ev, client, took = asyncio.run(go())
    assert client.socket() is None
    assert 0.4 < took < 5.0, took
    assert len(ev.disconnects) == 1


def test_abort_drops_the_connection_without_disconnect_and_paho_notices(
    settings: Settings, device: tuple[str, str]
) -> None:
    device_id, password = device

    async def go() -> Events:
        client = _client(device_id, password)
        async with MqttLoop() as mqtt_loop:
            mqtt_loop.attach(client)
            ev = Events(client)
            client.connect(settings.mqtt.host, settings.mqtt.port)
            rc = await asyncio.wait_for(ev.connack, TIMEOUT)
            assert not rc.is_failure, rc
            abort(client)
            assert client.socket() is None, "paho closed its side at once"
            assert len(ev.disconnects) == 1 and ev.disconnects[0].is_failure, ev.disconnects
        return ev

    ev = asyncio.run(go())
    assert len(ev.disconnects) == 1, "leaving the block has nothing more to close"
