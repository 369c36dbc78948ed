"""The collector's fast paths: lean PUBLISH decoding, buffered reads, bursts acked in order.

The decoder is checked against paho's own (the reference it replaces on the hot path), the
ledger against the ordering MQTT requires, and the whole collector against the real
Mosquitto and Kafka with every PUBLISH property a device may send and a payload larger than
one socket read.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import paho.mqtt
import paho.mqtt.client as mqtt
import pytest
from aiokafka import AIOKafkaConsumer
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

from ingest.mqtt.client import (
    FAST_PATH,
    READ_CHUNK,
    VERIFIED_PAHO,
    FastClient,
    UnhandledPublish,
    decode_publish_v5,
    release,
)
from ingest.mqtt.collector import (
    AckLedger,
    CollectorError,
    MqttCollector,
    MqttCredentials,
)
from vitalproof.devstack import collector_credentials, set_device_credentials
from vitalproof.raw import RawRecord
from vitalproof.schema import CONTENT_TYPE_JSON
from vitalproof.settings import Settings as VpSettings
from vitalproof.wire import binary

text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=40)


@st.composite
def publish_properties(draw: st.DrawFn) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    if draw(st.booleans()):
        props.ContentType = draw(text)
    if draw(st.booleans()):
        props.PayloadFormatIndicator = draw(st.integers(0, 1))
    if draw(st.booleans()):
        props.MessageExpiryInterval = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        props.ResponseTopic = draw(text)
    if draw(st.booleans()):
        props.CorrelationData = draw(st.binary(max_size=40))
    if draw(st.booleans()):
        props.TopicAlias = draw(st.integers(1, 2**16 - 1))
    for _ in range(draw(st.integers(0, 3))):
        props.UserProperty = (draw(text), draw(text))
    if draw(st.booleans()):
        props.SubscriptionIdentifier = draw(st.integers(1, 2**28 - 1))
    return props


def publish_body(topic: str, mid: int, props: Properties, payload: bytes) -> bytes:
    raw = topic.encode()
    return len(raw).to_bytes(2, "big") + raw + mid.to_bytes(2, "big") + props.pack() + payload


@given(topic=text, mid=st.integers(1, 2**16 - 1), props=publish_properties(), payload=st.binary())
@settings(max_examples=300, deadline=None)
def test_lean_decoder_agrees_with_paho(
    topic: str, mid: int, props: Properties, payload: bytes
) -> None:
    from paho.mqtt import _packet  # paho's own decoder (2.2+); here, not at the top, so the
    # version check below still reports a paho outside the verified range

    body = publish_body(topic, mid, props, payload)
    ref = _packet.decode_publish(0x32, bytearray(body), MQTTProtocolVersion.MQTTv5)
    assert ref.properties is not None
    want_ct = getattr(ref.properties, "ContentType", "")
    assert decode_publish_v5(bytearray(body)) == (ref.mid, ref.topic.decode(), ref.payload, want_ct)


@given(st.binary(max_size=200))
@settings(max_examples=500, deadline=None)
def test_lean_decoder_rejects_garbage_only_with_its_own_error(body: bytes) -> None:
    try:
        _mid, topic, payload, ct = decode_publish_v5(body)
    except UnhandledPublish:
        return
    assert isinstance(topic, str) and isinstance(payload, bytes) and isinstance(ct, str)


def test_lean_decoder_leaves_unknown_properties_and_truncation_to_paho() -> None:
    body = publish_body("devices/d/vitals", 7, Properties(PacketTypes.PUBLISH), b"x")
    # Property 0x11 (session expiry) is not allowed in a PUBLISH: paho's handler decides.
    bad = body[:20] + b"\x05\x11\x00\x00\x00\x01" + b"x"
    with pytest.raises(UnhandledPublish, match="0x11"):
        decode_publish_v5(bad)
    with pytest.raises(UnhandledPublish):
        decode_publish_v5(body[:19])


def test_installed_paho_is_one_whose_internals_the_fast_path_was_verified_on() -> None:
    first, last = (".".join(map(str, v)) for v in VERIFIED_PAHO)
    assert FAST_PATH and FastClient.fast_path, (
        f"paho-mqtt {paho.mqtt.__version__} is outside {first}..{last}, the releases whose "
        "internals ingest/mqtt/client.py was verified against: the collector runs on plain "
        "paho, several times slower. Check those internals in this release, run this file on "
        "it, then widen VERIFIED_PAHO (and the pin in pyproject.toml if needed)."
    )


@pytest.mark.parametrize(
    ("text", "want"),
    [("2.2.0", (2, 2, 0)), ("2.2", (2, 2, 0)), ("2.3.0rc1", (2, 3, 0)), ("10.0.1", (10, 0, 1))],
)
def test_release_reads_paho_versions(text: str, want: tuple[int, int, int]) -> None:
    assert release(text) == want
    assert release("unknown") == (0, 0, 0)


def _done(loop: asyncio.AbstractEventLoop, exc: Exception | None = None) -> asyncio.Future[object]:
    f: asyncio.Future[object] = loop.create_future()
    if exc is None:
        f.set_result(None)
    else:
        f.set_exception(exc)
    return f


def test_ledger_acks_bursts_in_arrival_order_only() -> None:
    loop = asyncio.new_event_loop()
    try:
        ledger = AckLedger()
        first = [loop.create_future(), loop.create_future()]
        ledger.add([1, 2], first)
        ledger.add([3], [_done(loop)])
        assert ledger.pop_ready() == [], "a later burst must wait for the earlier one"
        first[1].set_result(None)
        assert ledger.pop_ready() == [], "a burst waits for all of its batches"
        first[0].set_result(None)
        assert ledger.pop_ready() == [1, 2, 3]
        assert ledger.pending == 0
        ledger.add([4], [_done(loop, RuntimeError("broker down"))])
        ledger.add([5], [_done(loop)])
        with pytest.raises(CollectorError, match="broker down"):
            ledger.pop_ready()
        assert ledger.pending == 2, "nothing Kafka refused, nor anything after it, is acked"
    finally:
        loop.close()


# -- against the real Mosquitto and Kafka ------------------------------------------------


def _publish_all(settings: VpSettings, device: str, password: str, msgs: list) -> None:
    """QoS 1 publishes from ``device`` in order; returns once the broker acked them all."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv5)
    client.username_pw_set(device, password)
    client.connect(settings.mqtt.host, settings.mqtt.port)
    client.loop_start()
    try:
        infos = [
            client.publish(f"devices/{device}/vitals", p, qos=1, properties=pr) for p, pr in msgs
        ]
        for info in infos:
            info.wait_for_publish(30)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


async def _read_raw(settings: VpSettings, n: int) -> list[RawRecord]:
    consumer = AIOKafkaConsumer(
        settings.kafka.topic_raw,
        bootstrap_servers=settings.kafka.bootstrap,
        auto_offset_reset="earliest",
        group_id=None,
        max_partition_fetch_bytes=1 << 22,
    )
    await consumer.start()
    out: list[RawRecord] = []
    try:
        while len(out) < n and (got := await consumer.getmany(timeout_ms=5000)):
            for records in got.values():
                out.extend(RawRecord.from_kafka(r.value or b"", r.headers) for r in records)
    finally:
        await consumer.stop()
    return out


@pytest.mark.integration
@pytest.mark.parametrize("plain_paho", [False, True], ids=["as-installed", "plain-paho"])
def test_every_property_mix_and_big_payloads_reach_kafka_in_order(
    kafka_topics: VpSettings, plain_paho: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also on plain paho: what the collector is on a paho outside the verified range."""
    if plain_paho:
        monkeypatch.setattr(FastClient, "fast_path", False)
    settings = kafka_topics
    device, password = "fast-1", "pw-fast-1-secret-0123"
    set_device_credentials(settings, {device: password})
    msgs: list[tuple[bytes, Properties | None]] = []
    for i in range(600):
        props = Properties(PacketTypes.PUBLISH)
        kind = i % 4
        if kind == 0:
            props.ContentType = binary.CONTENT_TYPE_BINARY
            props.UserProperty = ("fw", "1.2.3")
        elif kind == 1:
            props.MessageExpiryInterval = 3600
            props.CorrelationData = b"corr"
        elif kind == 2:
            props.ContentType = CONTENT_TYPE_JSON
            props.PayloadFormatIndicator = 1
        # Most packets share a socket read; some span several (READ_CHUNK = 64 KiB).
        size = 3 * READ_CHUNK + 17 if i % 97 == 0 else 40 + i % 300
        msgs.append((i.to_bytes(4, "big") * (size // 4), None if kind == 3 else props))

    async def go() -> list[RawRecord]:
        user, pw = collector_credentials(settings)
        collector = MqttCollector(settings, MqttCredentials(user, pw))
        task = asyncio.create_task(collector.run(max_messages=len(msgs), duration_s=120))
        await asyncio.wait_for(collector.subscribed.wait(), 30)
        publisher = threading.Thread(target=_publish_all, args=(settings, device, password, msgs))
        publisher.start()
        stats = await task
        publisher.join(30)
        assert stats.acked >= len(msgs) and stats.produce_errors == 0
        return await _read_raw(settings, len(msgs))

    records = asyncio.run(go())
    assert [r.payload for r in records] == [p for p, _ in msgs], "lost, altered or reordered"
    for r, (_, props) in zip(records, msgs, strict=True):
        want = getattr(props, "ContentType", "") if props is not None else ""
        assert r.content_type == (want or CONTENT_TYPE_JSON)
        assert (r.device_id, r.source) == (device, f"devices/{device}/vitals")
        assert r.gateway_id == settings.gateway.id and r.received_us > 0


@pytest.mark.integration
def test_collector_reconnects_after_a_cut_connection_and_loses_nothing(
    kafka_topics: VpSettings,
) -> None:
    """The run loop, not a paho thread, reconnects now: a dropped TCP connection mid-stream
    is resumed on the persistent session and every message still reaches Kafka."""
    settings = kafka_topics
    device, password = "fast-cut-1", "pw-fast-cut-1-secret"
    set_device_credentials(settings, {device: password})
    msgs: list[tuple[bytes, Properties | None]] = [
        (i.to_bytes(4, "big") * 20, None) for i in range(3000)
    ]

    async def go() -> tuple[set[bytes], int]:
        user, pw = collector_credentials(settings)
        collector = MqttCollector(settings, MqttCredentials(user, pw))
        stop = asyncio.Event()
        task = asyncio.create_task(collector.run(stop=stop))
        await asyncio.wait_for(collector.subscribed.wait(), 30)
        publisher = threading.Thread(target=_publish_all, args=(settings, device, password, msgs))
        publisher.start()
        try:
            started = time.monotonic() + 30
            while collector.stats.acked < 300:
                assert time.monotonic() < started, "nothing flowed"
                await asyncio.sleep(0.005)
            sock = collector._client.socket()
            assert sock is not None
            sock.shutdown(socket.SHUT_RDWR)  # as a network outage would: no DISCONNECT
            subscribed_again = time.monotonic() + 30
            while not collector._connected.is_set() or collector._client.socket() is sock:
                assert time.monotonic() < subscribed_again, "the collector did not reconnect"
                await asyncio.sleep(0.05)
            await asyncio.to_thread(publisher.join, 60)
            want = {p for p, _ in msgs}
            got: set[bytes] = set()
            deadline = time.monotonic() + 60
            while not want <= got and time.monotonic() < deadline:
                got = {r.payload for r in await _read_raw(settings, len(msgs))}
            return got, collector.stats.acked
        finally:
            stop.set()
            await task

    got, acked = asyncio.run(go())
    missing = {p for p, _ in msgs} - got
    assert not missing, f"{len(missing)} messages lost across the reconnect"
    assert acked >= len(msgs)


def test_publishes_read_ahead_behind_another_packet_are_not_left_waiting() -> None:
    """One recv() can hold a PINGRESP and then PUBLISHes; select() will not fire for bytes
    already read, and the broker sends nothing more until they are acked: the collector must
    parse them in the same wake-up."""

    async def go() -> list[tuple[int, str, bytes, str, int]]:
        collector = MqttCollector(VpSettings(), MqttCredentials("collector", "x"))
        ours, broker = socket.socketpair()
        try:
            ours.setblocking(False)
            collector._client._sock = ours  # what connect() would have opened
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = binary.CONTENT_TYPE_BINARY
            stream = b"\xd0\x00"  # PINGRESP
            for mid in (1, 2, 3):
                body = publish_body("devices/d-1/vitals", mid, props, b"p%d" % mid)
                stream += b"\x32" + bytes([len(body)]) + body
            broker.sendall(stream)
            collector._on_readable()
            return collector._inbox
        finally:
            collector._client._sock = None
            ours.close()
            broker.close()

    inbox = asyncio.run(go())
    assert [(m, t, p, ct) for m, t, p, ct, _ in inbox] == [
        (mid, "devices/d-1/vitals", b"p%d" % mid, binary.CONTENT_TYPE_BINARY) for mid in (1, 2, 3)
    ]


@pytest.mark.parametrize("plain_paho", [False, True], ids=["as-installed", "plain-paho"])
def test_ack_many_writes_what_paho_ack_writes_one_by_one(plain_paho: bool) -> None:
    mids = [1, 2, 255, 256, 65535]
    written = []
    for batched in (False, True):
        client = FastClient(
            CallbackAPIVersion.VERSION2, client_id="t", protocol=mqtt.MQTTv5, manual_ack=True
        )
        if plain_paho:
            client.fast_path = False
        ours, broker = socket.socketpair()
        try:
            client._sock = ours  # what connect() would have opened
            if batched:
                client.ack_many(mids)
            else:
                for mid in mids:
                    client.ack(mid, 1)
            client.loop_write()
            written.append(broker.recv(1 << 16))
        finally:
            client._sock = None
            ours.close()
            broker.close()
    assert written[0] == written[1] == b"".join(b"\x40\x02" + m.to_bytes(2, "big") for m in mids)


@pytest.mark.parametrize("piece", [1, 2, 3, 5, 1000, 1 << 20])
def test_framing_holds_whatever_the_reads_cut(piece: int) -> None:
    """Packets cut anywhere by the network (inside the remaining length, the topic, the
    properties, the payload) come out whole and in order; what the lean path leaves to
    paho (a QoS 0 PUBLISH, a PINGRESP) still reaches paho's handlers."""
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = binary.CONTENT_TYPE_BINARY
    props.UserProperty = ("k", "v")
    sizes = [0, 1, 100, 127, 128, 16383, 16384, 70_000]
    stream = b"\xd0\x00"  # PINGRESP
    want = []
    for mid, size in enumerate(sizes, start=1):
        payload = bytes([mid]) * size
        body = publish_body(f"devices/d-{mid}/vitals", mid, props, payload)
        stream += b"\x32" + VariableByteIntegers.encode(len(body)) + body
        want.append((mid, f"devices/d-{mid}/vitals", payload, binary.CONTENT_TYPE_BINARY))
    qos0 = b"\x00\x0cdevices/q/vs" + b"\x00" + b"qos0"
    stream += b"\x30" + VariableByteIntegers.encode(len(qos0)) + qos0

    client = FastClient(
        CallbackAPIVersion.VERSION2, client_id="t", protocol=mqtt.MQTTv5, manual_ack=True
    )
    got: list[tuple[int, str, bytes, str]] = []
    others: list[bytes] = []
    client.on_publish_fast = lambda *m: got.append(m)
    client.on_message = lambda c, u, msg: others.append(msg.payload)
    ours, broker = socket.socketpair()
    try:
        ours.setblocking(False)
        client._sock = ours  # what connect() would have opened
        for k in range(0, len(stream), piece):
            broker.sendall(stream[k : k + piece])
            while True:
                assert client.loop_read() == mqtt.MQTT_ERR_SUCCESS
                if not client.read_more():
                    break
    finally:
        client._sock = None
        ours.close()
        broker.close()
    assert got == want
    assert others == [b"qos0"]


def test_plain_paho_fallback_hands_every_publish_to_on_message() -> None:
    """Off the verified paho releases the client is paho's own: the same stream, read one
    packet per ``loop_read``, reaches ``on_message`` whole and in order."""
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = binary.CONTENT_TYPE_BINARY
    stream = b"\xd0\x00"  # PINGRESP
    want = []
    for mid, size in enumerate([0, 1, 127, 128, 16384, 70_000], start=1):
        payload = bytes([mid]) * size
        body = publish_body(f"devices/d-{mid}/vitals", mid, props, payload)
        stream += b"\x32" + VariableByteIntegers.encode(len(body)) + body
        want.append((mid, f"devices/d-{mid}/vitals", payload, binary.CONTENT_TYPE_BINARY))

    client = FastClient(
        CallbackAPIVersion.VERSION2, client_id="t", protocol=mqtt.MQTTv5, manual_ack=True
    )
    client.fast_path = False
    fast: list[object] = []
    got: list[tuple[int, str, bytes, str]] = []
    client.on_publish_fast = lambda *m: fast.append(m)
    client.on_message = lambda c, u, msg: got.append(
        (msg.mid, msg.topic, bytes(msg.payload), msg.properties.ContentType)
    )
    ours, broker = socket.socketpair()
    try:
        ours.setblocking(False)
        client._sock = ours  # what connect() would have opened
        broker.sendall(stream)
        for _ in range(1000):
            if len(got) == len(want):
                break
            assert client.loop_read() == mqtt.MQTT_ERR_SUCCESS
            assert not client.read_more(), "plain paho reads exactly one packet"
    finally:
        client._sock = None
        ours.close()
        broker.close()
    assert got == want
    assert fast == [], "the lean path is off"
