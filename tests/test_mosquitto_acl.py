"""The generated Mosquitto config enforces per-device identity on the real broker.

What matters for data integrity: a device can publish only under ``devices/<its id>/``, the
collector sees everything under ``devices/`` (also through a shared subscription), and
nobody gets in without the right password.
"""

from __future__ import annotations

import queue
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from vitalproof.devstack import collector_credentials, remove_device, set_device_credentials
from vitalproof.devstack.mosquitto import hash_password, verify_password
from vitalproof.settings import Settings

pytestmark = pytest.mark.integration

TIMEOUT = 10.0
NOT_AUTHORIZED = 0x87
BAD_CREDENTIALS = 0x86


class Client:
    """A paho v2 / MQTT 5 client with the callbacks turned into queues and events."""

    def __init__(
        self,
        settings: Settings,
        user: str | None,
        password: str | None,
        *,
        client_id: str = "",
        clean_start: bool = True,
        session_expiry: int = 0,
    ) -> None:
        self.settings = settings
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        if user is not None:
            self.client.username_pw_set(user, password)
        self.connack: queue.Queue[ReasonCode] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.pubacks: dict[int, ReasonCode] = {}
        self.puback_event = threading.Condition()
        self.subacks: queue.Queue[list[ReasonCode]] = queue.Queue()
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = lambda _c, _u, _mid, rcs, _p: self.subacks.put(list(rcs))

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self.connack.put(rc)

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        with self.puback_event:
            self.pubacks[mid] = rc
            self.puback_event.notify_all()

    def connect(self) -> ReasonCode:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry
        self.client.connect(
            self.settings.mqtt.host,
            self.settings.mqtt.port,
            keepalive=30,
            clean_start=self.clean_start,
            properties=props,
        )
        self.client.loop_start()
        return self.connack.get(timeout=TIMEOUT)

    def subscribe(self, topic: str) -> list[ReasonCode]:
        self.client.subscribe(topic, qos=1)
        return self.subacks.get(timeout=TIMEOUT)

    def publish(self, topic: str, payload: bytes) -> ReasonCode:
        """QoS 1 publish; returns the broker's PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1)
        with self.puback_event:
            ok = self.puback_event.wait_for(lambda: info.mid in self.pubacks, TIMEOUT)
        assert ok, f"no PUBACK for {topic}"
        return self.pubacks[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _wait_for_payload(client: Client, payload: bytes, timeout: float) -> mqtt.MQTTMessage | None:
    """The message carrying ``payload`` if it arrives within ``timeout``, else None."""
    import time

    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = client.messages.get(timeout=left)
        except queue.Empty:
            return None
        if msg.payload == payload:
            return msg
    return None


@pytest.fixture
def devices(settings: Settings) -> Iterator[dict[str, str]]:
    """Two freshly enrolled devices with unique ids; their logins are revoked afterwards."""
    creds = {f"dev-{uuid.uuid4().hex[:10]}": uuid.uuid4().hex for _ in range(2)}
    set_device_credentials(settings, creds)
    yield creds
    for device_id in creds:
        remove_device(settings, device_id)


@pytest.fixture
def collector(settings: Settings) -> Iterator[Client]:
    user, password = collector_credentials(settings)
    client = Client(settings, user, password)
    rc = client.connect()
    assert not rc.is_failure, rc
    assert not any(r.is_failure for r in client.subscribe("devices/#"))
    yield client
    client.close()


def _connected(settings: Settings, user: str | None, password: str | None) -> Client:
    client = Client(settings, user, password)
    rc = client.connect()
    assert not rc.is_failure, f"{user} refused: {rc}"
    return client


def test_device_publishes_under_own_topic_and_collector_receives(
    settings: Settings, devices: dict[str, str], collector: Client
) -> None:
    device_id, password = next(iter(devices.items()))
    device = _connected(settings, device_id, password)
    try:
        payload = f"hr=72 {uuid.uuid4()}".encode()
        rc = device.publish(f"devices/{device_id}/vitals", payload)
        assert rc.value == 0, rc
        msg = _wait_for_payload(collector, payload, TIMEOUT)
        assert msg is not None, "collector never received the device's reading"
        assert msg.topic == f"devices/{device_id}/vitals"
    finally:
        device.close()


def test_device_cannot_publish_as_another_device(
    settings: Settings, devices: dict[str, str], collector: Client
) -> None:
    (device_id, password), (other_id, _) = list(devices.items())
    device = _connected(settings, device_id, password)
    try:
        payload = f"spoofed {uuid.uuid4()}".encode()
        rc = device.publish(f"devices/{other_id}/vitals", payload)
        assert rc.value == NOT_AUTHORIZED, f"expected PUBACK 0x87 Not authorized, got {rc}"
        assert _wait_for_payload(collector, payload, 1.5) is None, "spoofed reading delivered"
    finally:
        device.close()


def test_collector_shared_subscription_receives(
    settings: Settings, devices: dict[str, str]
) -> None:
    """Collectors load-balance with ``$share/<group>/devices/#``; the ACL must allow it."""
    user, password = collector_credentials(settings)
    collector = _connected(settings, user, password)
    device_id, device_password = next(iter(devices.items()))
    device = _connected(settings, device_id, device_password)
    try:
        codes = collector.subscribe(f"$share/{settings.mqtt.share_group}/devices/#")
        assert not any(c.is_failure for c in codes), codes
        payload = f"shared {uuid.uuid4()}".encode()
        assert device.publish(f"devices/{device_id}/vitals", payload).value == 0
        assert _wait_for_payload(collector, payload, TIMEOUT) is not None
    finally:
        device.close()
        collector.close()


def test_device_cannot_read_other_devices(settings: Settings, devices: dict[str, str]) -> None:
    device_id, password = next(iter(devices.items()))
    device = _connected(settings, device_id, password)
    try:
        # MQTT 5 mosquitto grants the SUBSCRIBE but delivers nothing the ACL denies.
        device.subscribe("devices/#")
        other_id, other_password = list(devices.items())[1]
        other = _connected(settings, other_id, other_password)
        try:
            payload = f"private {uuid.uuid4()}".encode()
            assert other.publish(f"devices/{other_id}/vitals", payload).value == 0
            assert _wait_for_payload(device, payload, 1.5) is None
        finally:
            other.close()
    finally:
        device.close()


def test_wrong_password_is_refused_at_connect(settings: Settings, devices: dict[str, str]) -> None:
    device_id = next(iter(devices))
    client = Client(settings, device_id, "not-the-password")
    try:
        rc = client.connect()
        assert rc.is_failure
        assert rc.value in (BAD_CREDENTIALS, NOT_AUTHORIZED), rc
    finally:
        client.close()


def test_anonymous_is_refused(settings: Settings) -> None:
    client = Client(settings, None, None)
    try:
        rc = client.connect()
        assert rc.is_failure
        assert rc.value in (BAD_CREDENTIALS, NOT_AUTHORIZED), rc
    finally:
        client.close()


def test_removed_device_is_refused(settings: Settings) -> None:
    device_id, password = f"dev-{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    set_device_credentials(settings, {device_id: password})
    _connected(settings, device_id, password).close()
    remove_device(settings, device_id)
    client = Client(settings, device_id, password)
    try:
        assert client.connect().is_failure
    finally:
        client.close()


def test_collector_session_survives_collector_restart(
    settings: Settings, devices: dict[str, str]
) -> None:
    """Persistent session + queueing: readings sent while the collector is away arrive."""
    user, password = collector_credentials(settings)
    client_id = f"collector-{uuid.uuid4().hex[:8]}"
    first = Client(
        settings, user, password, client_id=client_id, clean_start=True, session_expiry=300
    )
    assert not first.connect().is_failure
    first.subscribe("devices/#")
    first.close()

    device_id, device_password = next(iter(devices.items()))
    device = _connected(settings, device_id, device_password)
    payloads = [f"queued {i} {uuid.uuid4()}".encode() for i in range(20)]
    try:
        for payload in payloads:
            assert device.publish(f"devices/{device_id}/vitals", payload).value == 0
    finally:
        device.close()

    second = Client(
        settings, user, password, client_id=client_id, clean_start=False, session_expiry=0
    )
    try:
        assert not second.connect().is_failure
        got = set()
        for payload in payloads:
            msg = _wait_for_payload(second, payload, TIMEOUT)
            assert msg is not None, f"lost {payload!r} across the collector restart"
            got.add(msg.payload)
        assert got == set(payloads)
    finally:
        second.close()


def test_password_hash_matches_mosquitto_passwd(tmp_path: Path) -> None:
    """Our $7$ entries are byte-for-byte what mosquitto_passwd writes for the same salt."""
    tool = shutil.which("mosquitto_passwd")
    assert tool, "mosquitto_passwd not found: apt-get install -y mosquitto"
    path = tmp_path / "passwd"
    subprocess.run([tool, "-c", "-b", str(path), "alice", "s3cret"], check=True)
    entry = path.read_text().strip().split(":", 1)[1]
    _, kind, iterations, salt_b64, _ = entry.split("$")
    assert (kind, iterations) == ("7", "101")
    import base64

    salt = base64.b64decode(salt_b64)
    assert len(salt) == 12
    assert hash_password("s3cret", salt=salt) == entry
    assert verify_password("s3cret", entry)
    assert not verify_password("wrong", entry)


def test_oversized_publish_is_refused_at_the_broker(
    settings: Settings, devices: dict[str, str], collector: Client
) -> None:
    """A payload Kafka could never take (its record limit is 1 MiB) is refused by the broker,
    never acked and never delivered, so a collector cannot be stopped by it; the device's
    next normal reading flows."""
    import time

    from vitalproof.devstack.mosquitto import MAX_PACKET_BYTES

    device_id, password = next(iter(devices.items()))
    device = _connected(settings, device_id, password)
    try:
        big = b"x" * (MAX_PACKET_BYTES + 1024)
        info = device.client.publish(f"devices/{device_id}/vitals", big, qos=1)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:  # the client sent it: the broker must refuse it
            time.sleep(1.0)
            with device.puback_event:
                rc = device.pubacks.get(info.mid)
            assert rc is None or rc.is_failure, f"oversized publish acked with {rc}"
        else:  # the client library knew the limit from CONNACK and refused to send
            assert info.rc == mqtt.MQTT_ERR_PAYLOAD_SIZE, info.rc
        assert _wait_for_payload(collector, big, 1.5) is None, "oversized payload delivered"
    finally:
        device.close()
    device = _connected(settings, device_id, password)
    try:
        payload = f"after {uuid.uuid4()}".encode()
        assert device.publish(f"devices/{device_id}/vitals", payload).value == 0
        assert _wait_for_payload(collector, payload, TIMEOUT) is not None
    finally:
        device.close()
