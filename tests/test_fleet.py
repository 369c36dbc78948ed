"""The fleet against the session's real Mosquitto: acks, wire format, ground truth.

A subscriber with the collector's credentials records everything the broker delivers; the
ground-truth file must describe exactly that (payload digests, reading ids, malformed).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device_sims.fleet import Fleet, FleetProgress
from device_sims.record import payload_digest, read_records, reading_ids_of, summarize
from vitalproof.devstack import collector_credentials, set_device_credentials
from vitalproof.errors import WireFormatError
from vitalproof.schema import CONTENT_TYPE_JSON, SampleBatch
from vitalproof.settings import Settings

pytestmark = pytest.mark.integration


@dataclass
class Received:
    messages: list[tuple[str, bytes, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> list[tuple[str, bytes, str | None]]:
        with self.lock:
            return list(self.messages)


@pytest.fixture
def subscriber(settings: Settings) -> Iterator[Received]:
    """A QoS 1 subscriber on devices/+/vitals with the collector's login (test-side thread)."""
    got = Received()
    subscribed = threading.Event()
    user, password = collector_credentials(settings)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"test-sub-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5,
    )
    client.username_pw_set(user, password)

    def on_connect(c: mqtt.Client, u: object, f: object, rc: object, p: object) -> None:
        c.subscribe("devices/+/vitals", qos=1)

    def on_subscribe(c: mqtt.Client, u: object, mid: int, rcs: object, p: object) -> None:
        subscribed.set()

    def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        ctype = getattr(msg.properties, "ContentType", None)
        with got.lock:
            got.messages.append((msg.topic, bytes(msg.payload), ctype))

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(settings.mqtt.host, settings.mqtt.port)
    client.loop_start()
    try:
        assert subscribed.wait(10), "subscriber did not get SUBACK"
        yield got
    finally:
        client.disconnect()
        client.loop_stop()


def _enrol(settings: Settings, n: int) -> list[tuple[str, str]]:
    tag = uuid.uuid4().hex[:8]
    devices = [(f"sim-{tag}-{i:03d}", f"pw-{uuid.uuid4().hex}") for i in range(n)]
    set_device_credentials(settings, dict(devices))
    return devices


def _wait_for(
    got: Received, ours: set[str], count: int, timeout: float = 15.0
) -> list[tuple[str, bytes, str | None]]:
    """Messages for our devices, once at least ``count`` arrived and the flow settled."""
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        mine = [m for m in got.snapshot() if m[0].split("/")[1] in ours]
        if len(mine) >= count and len(mine) == last:
            return mine
        if time.monotonic() > deadline:
            return mine
        last = len(mine)
        time.sleep(0.3)


def _check_against_ground_truth(
    path: Path, mine: list[tuple[str, bytes, str | None]], *, exact: bool
) -> None:
    records = list(read_records(path))
    msgs = [r for r in records if r["kind"] == "msg"]
    sent = Counter((r["device_id"], r["digest"]) for r in msgs)
    received = Counter((topic.split("/")[1], payload_digest(p)) for topic, p, _ in mine)
    if exact:
        assert received == sent
    else:  # reconnects may redeliver (QoS 1 is at least once), never lose
        assert set(received) == set(sent)
        assert all(received[k] >= n for k, n in sent.items())
    assert {ctype for _, _, ctype in mine} == {CONTENT_TYPE_JSON}

    rx_ids: set[str] = set()
    rx_malformed: set[str] = set()
    for topic, payload, _ in mine:
        device = topic.split("/")[1]
        try:
            SampleBatch.from_json(payload, device_id=device)
        except WireFormatError:
            rx_malformed.add(payload_digest(payload))
        rx_ids.update(reading_ids_of(device, payload))
    gt_ids = {rid for r in msgs for rid in r["reading_ids"]}
    assert rx_ids == gt_ids
    assert rx_malformed == {r["digest"] for r in msgs if r["malformed"]}


def test_twenty_devices_every_message_acked_and_matches_ground_truth(
    settings: Settings, subscriber: Received, tmp_path: Path
) -> None:
    devices = _enrol(settings, 20)
    record = tmp_path / "truth.jsonl"
    progress: list[FleetProgress] = []
    fleet = Fleet(
        devices,
        settings.mqtt.host,
        settings.mqtt.port,
        rate_hz=2.0,
        duration_s=3.0,
        record_path=record,
        accel_hz=10,
        on_progress=progress.append,
        seed=42,
    )
    report = asyncio.run(fleet.run())

    assert report.errors == [] and report.error_count == 0
    assert report.connected == 20
    assert report.messages_sent == 20 * 6  # 2 Hz x 3 s, accel guarantees data every tick
    assert report.messages_acked == report.messages_sent and report.ok
    assert report.malformed_sent == report.duplicates_sent == report.dropped == 0

    summary = summarize(record)
    assert summary.messages == report.messages_sent
    assert summary.distinct_reading_ids == report.readings_sent == summary.readings
    assert summary.devices == 20

    mine = _wait_for(subscriber, {d for d, _ in devices}, report.messages_sent)
    _check_against_ground_truth(record, mine, exact=True)

    phases = [p.phase for p in progress]
    assert phases[0] == "connecting" and phases[-1] == "done" and "running" in phases
    assert progress[-1].acked == report.messages_acked


def test_faults_and_reconnect_storms_keep_ground_truth_consistent(
    settings: Settings, subscriber: Received, tmp_path: Path
) -> None:
    devices = _enrol(settings, 20)
    record = tmp_path / "truth.jsonl"
    fleet = Fleet(
        devices,
        settings.mqtt.host,
        settings.mqtt.port,
        rate_hz=4.0,
        duration_s=3.0,
        faults="dup=0.05,reorder=0.05,drop=0.03,malformed=0.05,skew=0.05,jump=0.02,"
        "reset=0.05,storm=0.02",
        record_path=record,
        accel_hz=10,
        seed=7,
    )
    report = asyncio.run(fleet.run())

    assert report.errors == [] and report.ok, report.errors
    assert report.malformed_sent > 0 and report.duplicates_sent > 0
    assert report.storms > 0 and report.reconnects > 0
    summary = summarize(record)
    assert summary.messages == report.messages_sent
    assert summary.malformed == report.malformed_sent
    assert summary.duplicates == report.duplicates_sent
    assert summary.dropped_messages == report.dropped
    assert summary.storms == report.storms
    assert summary.distinct_reading_ids == report.readings_sent

    mine = _wait_for(subscriber, {d for d, _ in devices}, report.messages_sent)
    _check_against_ground_truth(record, mine, exact=False)


def test_wrong_password_is_reported_not_retried(settings: Settings, tmp_path: Path) -> None:
    devices = _enrol(settings, 2)
    bad = [devices[0], (devices[1][0], "not-the-password")]
    report = asyncio.run(
        Fleet(
            bad, settings.mqtt.host, settings.mqtt.port, rate_hz=2.0, duration_s=1.0, accel_hz=10
        ).run()
    )
    assert report.connected == 1
    assert report.error_count >= 1 and "connection refused" in report.errors[0]
    assert devices[1][0] in report.errors[0]
    assert report.reconnects == 0
    assert report.messages_sent == report.messages_acked > 0  # the good device is unaffected


def test_spec_errors_surface_before_connecting() -> None:
    with pytest.raises(ValueError, match="fault spec: unknown fault 'dupe'"):
        Fleet([("d", "p")], "127.0.0.1", 1, faults="dupe=0.1")
    with pytest.raises(ValueError, match="rate_hz"):
        Fleet([("d", "p")], "127.0.0.1", 1, rate_hz=0)
    with pytest.raises(ValueError, match="unique"):
        Fleet([("d", "p"), ("d", "q")], "127.0.0.1", 1)
