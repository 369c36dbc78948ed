"""The MQTT collector: Mosquitto -> Kafka ``vitals.raw``, losing nothing.

A message is acknowledged to the broker (PUBACK) only after Kafka acknowledged its produce
(acks=all, idempotent producer), and acknowledgements leave in the order messages arrived,
as MQTT requires. The session is persistent (fixed client id, clean_start=False, a session
expiry), so whatever was in flight when the collector died is redelivered when it returns.
Several collectors share the load through a shared subscription ($share/<group>/...).

paho runs its network loop in its own thread; each message is handed to the asyncio loop
with ``call_soon_threadsafe`` and everything else happens on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaProducer
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ingest.kafka_sink import durable_producer
from vitalproof.errors import VitalproofError
from vitalproof.raw import RawRecord
from vitalproof.schema import CONTENT_TYPE_JSON, Transport
from vitalproof.settings import Settings

log = logging.getLogger(__name__)

DEVICE_TOPIC_FILTER = "devices/+/vitals"
SESSION_EXPIRY_S = 24 * 3600
# Unacked messages the broker may send us at once. Each waits for Kafka's ack (milliseconds),
# so throughput is at most this many per Kafka round trip: mosquitto's default of 20 would
# cap the collector near a thousand messages a second.
RECEIVE_MAXIMUM = 1000


class CollectorError(VitalproofError):
    """The collector could not connect or lost its Kafka producer."""


def device_from_topic(topic: str) -> str:
    """``devices/<id>/vitals`` -> ``<id>``; anything else -> '' (normalize rejects it)."""
    parts = topic.split("/")
    return parts[1] if len(parts) == 3 and parts[0] == "devices" and parts[1] else ""


@dataclass
class CollectorStats:
    received: int = 0
    forwarded: int = 0
    acked: int = 0
    produce_errors: int = 0
    started_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class MqttCredentials:
    username: str
    password: str
    tls_ca: Path | None = None


class MqttCollector:
    def __init__(
        self,
        settings: Settings,
        credentials: MqttCredentials,
        *,
        client_id: str | None = None,
        producer: AIOKafkaProducer | None = None,
        on_forwarded: Callable[[RawRecord], None] | None = None,
    ) -> None:
        self.settings = settings
        self.credentials = credentials
        self.client_id = client_id or f"vitalproof-collector-{settings.gateway_id}"
        self.stats = CollectorStats()
        self._producer = producer
        self._on_forwarded = on_forwarded
        self._loop: asyncio.AbstractEventLoop | None = None
        # paho's thread appends, the loop drains; the loop is woken once per burst, not once
        # per message (a self-pipe write each), which is what capped the collector.
        self._inbox: deque[tuple[int, str, bytes, str, int]] = deque()
        self._wake = asyncio.Event()
        self._wake_scheduled = False
        self._pending: deque[tuple[int, asyncio.Future[object]]] = deque()
        self._connected = asyncio.Event()
        self.subscribed = asyncio.Event()
        """Set once the broker granted the subscription: from then on nothing is missed."""
        self._connect_error: str | None = None
        self._client = self._make_client()

    # -- paho side (network thread) -----------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        c.username_pw_set(self.credentials.username, self.credentials.password)
        if self.credentials.tls_ca is not None:
            c.tls_set(ca_certs=str(self.credentials.tls_ca), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        return c

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        props: Properties | None,
    ) -> None:
        assert self._loop is not None
        if all(not r.is_failure for r in reasons):
            self._loop.call_soon_threadsafe(self.subscribed.set)
        else:
            log.error("subscription refused: %s", reasons)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        assert self._loop is not None
        if reason.is_failure:
            self._connect_error = f"MQTT broker refused the collector: {reason}"
            self._loop.call_soon_threadsafe(self._connected.set)
            return
        topic = f"$share/{self.settings.mqtt_share_group}/{DEVICE_TOPIC_FILTER}"
        client.subscribe(topic, qos=1)
        log.info("collector connected (session present: %s)", flags.session_present)
        self._loop.call_soon_threadsafe(self._connected.set)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        log.warning("collector disconnected from MQTT: %s", reason)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        assert self._loop is not None
        content_type = getattr(msg.properties, "ContentType", "") if msg.properties else ""
        item = (msg.mid, msg.topic, bytes(msg.payload), content_type or "", time.time_ns() // 1000)
        self._inbox.append(item)
        if not self._wake_scheduled:
            self._wake_scheduled = True
            self._loop.call_soon_threadsafe(self._wake.set)

    # -- asyncio side -------------------------------------------------------------------

    async def run(
        self,
        *,
        stop: asyncio.Event | None = None,
        max_messages: int | None = None,
        duration_s: float | None = None,
    ) -> CollectorStats:
        """Collect until ``stop`` is set, ``max_messages`` were acked or ``duration_s`` passed."""
        self._loop = asyncio.get_running_loop()
        own_producer = self._producer is None
        producer = self._producer or durable_producer(self.settings)
        if own_producer:
            await producer.start()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        try:
            self._client.connect(
                self.settings.mqtt_host,
                self.settings.mqtt_port,
                keepalive=30,
                clean_start=False,
                properties=props,
            )
        except OSError as e:
            if own_producer:
                await producer.stop()
            raise CollectorError(
                f"cannot reach MQTT broker {self.settings.mqtt_host}:{self.settings.mqtt_port}: {e}"
            ) from e
        self._client.loop_start()
        deadline = None if duration_s is None else time.monotonic() + duration_s
        try:
            await asyncio.wait_for(self._connected.wait(), 30)
            if self._connect_error:
                raise CollectorError(self._connect_error)
            while True:
                if stop is not None and stop.is_set():
                    break
                if max_messages is not None and self.stats.acked >= max_messages:
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                wait = 0.2 if remaining is None else min(0.2, remaining)
                if not self._inbox:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
                # Clear before draining: whatever paho appends from here on is either
                # drained below or schedules a new wake-up.
                self._wake.clear()
                self._wake_scheduled = False
                inbox = self._inbox
                while inbox:
                    await self._forward(producer, inbox.popleft())
                self._ack_ready()
            await self._drain()
        finally:
            self._client.disconnect()
            self._client.loop_stop()
            if own_producer:
                await producer.stop()
        return self.stats

    async def _forward(
        self, producer: AIOKafkaProducer, item: tuple[int, str, bytes, str, int]
    ) -> None:
        mid, topic, payload, content_type, received_us = item
        self.stats.received += 1
        record = RawRecord(
            device_id=device_from_topic(topic),
            payload=payload,
            content_type=content_type or CONTENT_TYPE_JSON,
            transport=Transport.MQTT,
            gateway_id=self.settings.gateway_id,
            received_us=received_us,
            source=topic,
        )
        fut = await producer.send(
            self.settings.topic_raw,
            value=record.payload,
            key=record.device_id.encode(),
            headers=record.headers(),
        )
        self._pending.append((mid, fut))
        # Ack as soon as Kafka answers, not at the loop's next turn: the broker sends only
        # max_inflight_messages (20 by default) unacked messages, so waiting for the next
        # message (or the 0.2 s timeout) before acking would stall the stream.
        fut.add_done_callback(self._on_produced)
        self.stats.forwarded += 1
        if self._on_forwarded is not None:
            self._on_forwarded(record)

    def _on_produced(self, fut: asyncio.Future[object]) -> None:
        # A refused produce is not acked here; the run loop's next _ack_ready raises it.
        with contextlib.suppress(CollectorError):
            self._ack_ready()

    def _ack_ready(self) -> None:
        """PUBACK, in arrival order, every message whose produce Kafka acknowledged."""
        while self._pending and self._pending[0][1].done():
            mid, fut = self._pending[0]
            if fut.exception() is not None:
                # Never ack what Kafka did not take: the broker redelivers it after restart.
                self.stats.produce_errors += 1
                raise CollectorError(f"Kafka refused a produce: {fut.exception()}")
            self._pending.popleft()
            self._client.ack(mid, 1)
            self.stats.acked += 1

    async def _drain(self) -> None:
        if self._pending:
            with contextlib.suppress(Exception):
                await asyncio.gather(*(f for _, f in self._pending), return_exceptions=True)
        self._ack_ready()
