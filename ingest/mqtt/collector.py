"""The MQTT collector: Mosquitto -> Kafka ``vitals.raw``, losing nothing.

A message is acknowledged to the broker (PUBACK) only after Kafka acknowledged its produce
(acks=all, idempotent producer), and acknowledgements leave in the order messages arrived,
as MQTT requires. The session is persistent (fixed client id, clean_start=False, a session
expiry), so whatever was in flight when the collector died is redelivered when it returns.
Several collectors share the load through a shared subscription ($share/<group>/...).

Mosquitto (2.0) serves a group's members round robin whether they are connected or not: a
member that is down keeps receiving its share into its session, delivered when it returns
(tests/test_shared_collectors.py). So a collector is restarted under the same client id,
and one that is retired for good *leaves* (:meth:`MqttCollector.run` with ``leave=True``):
it resumes its session, unsubscribes, forwards what the session still holds, and ends the
session, instead of leaving its share to pile up until the session expires and is dropped.

Everything runs on the asyncio loop, paho included: its socket is driven by
:class:`vitalproof.mqtt_loop.MqttLoop` (no network thread, no thread hand-off per message),
and each time its socket is readable, every complete packet in it is read at once. A burst of
messages read from the socket is handed to Kafka as one record batch per partition
(:class:`ingest.kafka_sink.BurstSender`) and acknowledged, in order, when its batches are.

Kafka away (it cannot be bootstrapped, or a produce failed with a retriable error) does not
stop the collector (:meth:`MqttCollector.run`): it acknowledges nothing more, leaves the
broker (the session keeps what was unacked, and queues what comes meanwhile) and tries a
fresh producer with a bounded exponential backoff (:mod:`vitalproof.retry`), saying so once
when Kafka goes and once when the first produce after it is acknowledged.
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
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ingest.kafka_sink import BurstSender, durable_producer
from ingest.mqtt.client import FastClient
from vitalproof.errors import VitalproofError
from vitalproof.mqtt_loop import MqttLoop
from vitalproof.raw import H_RECEIVED, RawRecord
from vitalproof.retry import Backoff, Outage, RepeatFilter
from vitalproof.schema import CONTENT_TYPE_JSON, Transport
from vitalproof.settings import Settings

log = logging.getLogger(__name__)

DEVICE_TOPIC_FILTER = "devices/+/vitals"
SESSION_EXPIRY_S = 24 * 3600
# Unacked messages the broker may send us at once. Each waits for Kafka's ack (milliseconds),
# so throughput is at most this many per Kafka round trip: mosquitto's default of 20 would
# cap the collector near a thousand messages a second.
RECEIVE_MAXIMUM = 1000
RECONNECT_MIN_S, RECONNECT_MAX_S = 0.5, 10.0
# Leaving: once unsubscribed, the session is drained when nothing arrived for this long and
# every message forwarded is acked. Mosquitto sends what a session holds as soon as the
# Receive Maximum allows, so a second of silence with nothing in flight means nothing is left.
LEAVE_QUIET_S = 1.0
#: The loggers aiokafka's client, connections and sender log through (a logger's filter
#: does not see its children's records).
AIOKAFKA_LOGGERS = ("aiokafka", "aiokafka.conn", "aiokafka.cluster", "aiokafka.producer.sender")


class CollectorError(VitalproofError):
    """The collector could not connect or lost its Kafka producer."""


class KafkaRefused(CollectorError):
    """Kafka failed a produce (its error is the ``__cause__``): nothing of it is acked."""


def kafka_unavailable(exc: BaseException) -> str | None:
    """The collector's error policy: Kafka away (it cannot be bootstrapped, a produce timed
    out, no leader yet, a connection lost: aiokafka's retriable errors) is waited out;
    anything else (a record too large, no authorization, a bug) stops the collector."""
    cause = exc.__cause__ if isinstance(exc, KafkaRefused) else exc
    if isinstance(cause, KafkaError) and (
        cause.retriable or isinstance(cause, KafkaTimeoutError | KafkaConnectionError)
    ):
        return f"unavailable ({type(cause).__name__}: {str(cause)[:160]})"
    return None


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
    kafka: str = "ok"
    """``ok``, or ``waiting``: Kafka is unreachable; nothing is acked, the broker holds it."""
    kafka_outages: int = 0
    started_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class MqttCredentials:
    username: str
    password: str
    tls_ca: Path | None = None


# (packet id, topic, payload, content type, receive time in µs): what a burst holds per message.
Arrival = tuple[int, str, bytes, str, int]


class AckLedger:
    """Which broker packet ids may be acknowledged, in arrival order.

    A burst's ids become ackable once every Kafka batch it was sent in is acknowledged, and
    only after every earlier burst's: MQTT wants PUBACKs in arrival order, and a later burst
    acknowledged first would let a crash lose an earlier one.
    """

    def __init__(self) -> None:
        self._bursts: deque[tuple[list[int], list[asyncio.Future[object]]]] = deque()
        self.pending = 0

    def add(self, mids: list[int], futures: list[asyncio.Future[object]]) -> None:
        self._bursts.append((mids, futures))
        self.pending += len(mids)

    def futures(self) -> list[asyncio.Future[object]]:
        return [f for _, fs in self._bursts for f in fs]

    def pop_ready(self) -> list[int]:
        """Ids of the leading bursts Kafka acknowledged; raises if Kafka refused one."""
        out: list[int] = []
        bursts = self._bursts
        while bursts and all(f.done() for f in bursts[0][1]):
            mids, futures = bursts[0]
            for f in futures:
                if f.cancelled() or f.exception() is not None:
                    # Never ack what Kafka did not take: the broker redelivers it.
                    err = "cancelled" if f.cancelled() else f.exception()
                    raise KafkaRefused(f"Kafka refused a produce: {err}") from (
                        err if isinstance(err, BaseException) else None
                    )
            bursts.popleft()
            self.pending -= len(mids)
            out.extend(mids)
        return out


class MqttCollector:
    def __init__(
        self,
        settings: Settings,
        credentials: MqttCredentials,
        *,
        client_id: str | None = None,
        producer: AIOKafkaProducer | None = None,
        producer_factory: Callable[[], AIOKafkaProducer] | None = None,
    ) -> None:
        """``producer``: the caller's, started and stopped by the caller; a Kafka failure
        then stops :meth:`run`. Otherwise the collector makes its own, a fresh one after
        each outage, with ``producer_factory`` (default :func:`durable_producer`)."""
        self.settings = settings
        self._producer_factory = producer_factory or (lambda: durable_producer(settings))
        self.credentials = credentials
        self.client_id = client_id or f"vitalproof-collector-{settings.gateway.id}"
        self.stats = CollectorStats()
        self._producer = producer
        self._inbox: list[Arrival] = []
        self._received_us = 0  # when the socket read under way started
        self._wake = asyncio.Event()
        self._ledger = AckLedger()
        self._failure: CollectorError | None = None
        # Per (topic, content type): the Kafka key and the headers with the receive time
        # left to fill in, so a message costs a list copy, not a RawRecord and six encodes.
        self._templates: dict[tuple[str, str], tuple[bytes, list[tuple[str, bytes]], int]] = {}
        self._connected = asyncio.Event()
        self.subscribed = asyncio.Event()
        """Set once the broker granted the subscription: from then on nothing is missed."""
        self.unsubscribed = asyncio.Event()
        """Leaving: set once the broker confirmed the unsubscription (no new share comes)."""
        self._leaving = False
        self.left = False
        """Leaving: set once the session was drained and ended."""
        self._drained = False
        self._last_arrival = 0.0
        self._disconnected = asyncio.Event()
        self._connect_error: str | None = None
        self._closing = False
        self._reconnect_at = 0.0
        self._reconnect_delay = RECONNECT_MIN_S
        self._mqtt_started = False
        self._pausing = False
        self.kafka_outage = Outage(
            "MQTT collector: Kafka",
            f"at {settings.kafka.bootstrap}",
            kafka_unavailable,
            backoff=Backoff.from_settings(settings.runtime),
            logger=log,
        )
        """Kafka as the collector sees it; waited out with backoff (see :meth:`run`)."""
        self._client = self._make_client()

    # -- paho side (callbacks run on the event loop) -------------------------------------

    def _make_client(self) -> FastClient:
        c = FastClient(
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
        c.on_publish_fast = self._on_publish
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_unsubscribe = self._on_unsubscribe
        return c

    def _on_readable(self) -> None:
        """Read what the socket holds (every complete packet of it): one burst, one wake-up
        of the run loop."""
        client, inbox = self._client, self._inbox
        self._received_us = time.time_ns() // 1000
        before = len(inbox)
        for _ in range(64):  # bounded (4 MiB): other callbacks get their turn
            if client.loop_read() != mqtt.MQTT_ERR_SUCCESS or not client.read_more():
                break
        if len(inbox) > before:
            self._last_arrival = time.monotonic()
            self._wake.set()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        props: Properties | None,
    ) -> None:
        if all(not r.is_failure for r in reasons):
            self.subscribed.set()
        else:
            log.error("subscription refused: %s", reasons)

    def _on_unsubscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        props: Properties | None,
    ) -> None:
        self._last_arrival = time.monotonic()  # the quiet period starts now
        self.unsubscribed.set()
        self._wake.set()

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._connect_error = f"MQTT broker refused the collector: {reason}"
            self._connected.set()
            return
        # A shared subscription spreads devices over collectors, but Mosquitto 2.0 does not
        # restore it after a crash: messages published before the collector resubscribes
        # match no one and are dropped after their PUBACK (the kill-mosquitto drill lost
        # 13 %). A single collector (share_group "") subscribes plainly: its session, saved
        # with every change, survives the broker's SIGKILL.
        group = self.settings.mqtt.share_group
        topic = f"$share/{group}/{DEVICE_TOPIC_FILTER}" if group else DEVICE_TOPIC_FILTER
        if self._leaving:
            client.unsubscribe(topic)  # what the session holds still comes
        else:
            client.subscribe(topic, qos=1)
        log.info("collector connected (session present: %s)", flags.session_present)
        self._reconnect_delay = RECONNECT_MIN_S
        self._connected.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        self._connected.clear()
        self._disconnected.set()
        if not self._closing and not self._pausing:
            log.warning("collector disconnected from MQTT: %s", reason)
            self._wake.set()  # the run loop reconnects

    def _on_publish(self, mid: int, topic: str, payload: bytes, content_type: str) -> None:
        self._inbox.append((mid, topic, payload, content_type, self._received_us))

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        """What paho decodes itself (whatever the lean decoder leaves to it)."""
        props = msg.properties
        content_type = getattr(props, "ContentType", "") if props is not None else ""
        # bytes(payload) is the payload itself, not a copy, when paho gives bytes (it does).
        self._inbox.append(
            (msg.mid, msg.topic, bytes(msg.payload), content_type, self._received_us)
        )

    # -- asyncio side -------------------------------------------------------------------

    async def run(
        self,
        *,
        stop: asyncio.Event | None = None,
        max_messages: int | None = None,
        duration_s: float | None = None,
        leave: bool = False,
    ) -> CollectorStats:
        """Collect until ``stop`` is set, ``max_messages`` were acked or ``duration_s`` passed.

        ``leave``: retire this collector from the share group instead: unsubscribe, forward
        what its session holds, then end the session (see the module's docstring)."""
        self._leaving = leave
        deadline = None if duration_s is None else time.monotonic() + duration_s

        def stopped() -> bool:
            return (
                (stop is not None and stop.is_set())
                or (deadline is not None and time.monotonic() >= deadline)
                or (max_messages is not None and self.stats.acked >= max_messages)
            )

        # Leaving the block sends the queued PUBACKs, then DISCONNECT (2 s at most).
        quiet = RepeatFilter()  # aiokafka logs each failed connect while Kafka is away
        for name in AIOKAFKA_LOGGERS:
            logging.getLogger(name).addFilter(quiet)
        async with MqttLoop(close_timeout_s=2.0) as mqtt_loop:
            mqtt_loop.attach(self._client, self._on_readable)
            try:
                while not stopped():
                    producer = await self._kafka_producer(stopped, stop, deadline)
                    if producer is None:
                        break  # stopped while Kafka was away
                    try:
                        await self._collect(
                            BurstSender(producer, self.settings.kafka.topic_raw),
                            stop=stop,
                            max_messages=max_messages,
                            deadline=deadline,
                        )
                        break
                    except Exception as exc:
                        if self._producer is not None:
                            raise  # the caller's producer: the caller's problem
                        delay = self.kafka_outage.failed(exc)  # raises what is not Kafka away
                        self._pause_for_kafka()
                        await _sleep_unless(stop, deadline, delay)
                    finally:
                        if self._producer is None:
                            await producer.stop()
                if leave and self._drained:
                    await self._end_session()
                elif leave:
                    # Stopped early: ending the session now would discard what it holds.
                    log.warning("stopped before the session was drained; it is kept")
            finally:
                self._closing = True
                for name in AIOKAFKA_LOGGERS:
                    logging.getLogger(name).removeFilter(quiet)
        return self.stats

    async def _kafka_producer(
        self, stopped: Callable[[], bool], stop: asyncio.Event | None, deadline: float | None
    ) -> AIOKafkaProducer | None:
        """The caller's producer, or a started one of our own: while Kafka cannot be
        bootstrapped, tried again with backoff (one line when it went away, one when the
        first produce after it came back was acked); ``None`` if stopped meanwhile."""
        if self._producer is not None:
            return self._producer
        while not stopped():
            producer = self._producer_factory()
            try:
                await producer.start()
                return producer
            except Exception as exc:
                with contextlib.suppress(Exception):
                    await producer.stop()
                delay = self.kafka_outage.failed(exc)  # raises what is not Kafka away
                self.stats.kafka, self.stats.kafka_outages = "waiting", self.kafka_outage.outages
                await _sleep_unless(stop, deadline, delay)
        return None

    def _pause_for_kafka(self) -> None:
        """Kafka is away: acknowledge nothing more and leave the broker until it is back.

        What was received and not acked (forwarded or not) is forgotten here and stays in
        the broker's persistent session, which redelivers it when the collector returns;
        what Kafka did take of it comes twice, and the pipeline's reading ids make that
        effectively once (the same as a restart of the collector). New messages queue in
        the session meanwhile, so devices never block.
        """
        self.stats.kafka, self.stats.kafka_outages = "waiting", self.kafka_outage.outages
        for f in self._ledger.futures():  # their errors are known: not "never retrieved"
            f.add_done_callback(_retrieve)
        self._ledger = AckLedger()  # late answers of the old producer ack nothing
        self._inbox = []
        self._failure = None
        if self._client.socket() is not None:
            self._pausing = True
            self._client.disconnect()  # session kept: its expiry is a day
        self._reconnect_at = 0.0
        self._reconnect_delay = RECONNECT_MIN_S

    async def _collect(
        self,
        sender: BurstSender,
        *,
        stop: asyncio.Event | None,
        max_messages: int | None,
        deadline: float | None,
    ) -> None:
        if not self._mqtt_started:
            await self._connect_mqtt()
        # else: back after Kafka was away; the loop below reconnects (same session)
        self._pausing = False
        while True:
            if self._failure is not None:
                raise self._failure
            if stop is not None and stop.is_set():
                break
            if max_messages is not None and self.stats.acked >= max_messages:
                break
            if self._drained_for_leave():
                self._drained = True
                break
            now = time.monotonic()
            remaining = None if deadline is None else deadline - now
            if remaining is not None and remaining <= 0:
                break
            if self._client.socket() is None and now >= self._reconnect_at:
                self._reconnect(now)
            if not self._inbox:
                wait = 0.2 if remaining is None else min(0.2, remaining)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()
            if self._inbox:
                await self._forward(sender)
        await self._drain()

    async def _connect_mqtt(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        try:
            self._client.connect(
                self.settings.mqtt.host,
                self.settings.mqtt.port,
                keepalive=30,
                clean_start=False,
                properties=props,
            )
        except OSError as e:
            raise CollectorError(
                f"cannot reach MQTT broker {self.settings.mqtt.host}:{self.settings.mqtt.port}: {e}"
            ) from e
        await asyncio.wait_for(self._connected.wait(), 30)
        if self._connect_error:
            raise CollectorError(self._connect_error)
        self._mqtt_started = True

    def _drained_for_leave(self) -> bool:
        return (
            self._leaving
            and self.unsubscribed.is_set()
            and not self._inbox
            and self._ledger.pending == 0
            and time.monotonic() - self._last_arrival >= LEAVE_QUIET_S
        )

    async def _end_session(self) -> None:
        """DISCONNECT with session expiry 0: the broker forgets the (drained) session."""
        props = Properties(PacketTypes.DISCONNECT)
        props.SessionExpiryInterval = 0
        self._closing = True
        self._disconnected.clear()
        if self._client.socket() is None:
            raise CollectorError("lost the broker before the session could be ended")
        self._client.disconnect(properties=props)
        await asyncio.wait_for(self._disconnected.wait(), 10)
        self.left = True
        log.info("left the share group; session ended")

    def _reconnect(self, now: float) -> None:
        """One reconnect attempt (the session brings back whatever was unacked); the next,
        if this one fails or the broker refuses it, after an exponential backoff."""
        delay = self._reconnect_delay
        self._reconnect_at = now + delay
        self._reconnect_delay = min(delay * 2, RECONNECT_MAX_S)
        try:
            self._client.reconnect()
        except OSError as e:
            log.warning("MQTT reconnect failed (%s); next try in %.1f s", e, delay)

    async def _forward(self, sender: BurstSender) -> None:
        """Send everything received so far to Kafka as one burst."""
        burst, self._inbox = self._inbox, []
        templates, gateway = self._templates, self.settings.gateway.id
        records = []
        for _, topic, payload, content_type, received_us in burst:
            template = templates.get((topic, content_type))
            if template is None:
                template = templates[(topic, content_type)] = _headers_template(
                    topic, content_type, gateway
                )
            key, headers, at = template
            headers = headers.copy()
            headers[at] = (H_RECEIVED, b"%d" % received_us)
            records.append((key, payload, headers))
        self.stats.received += len(burst)
        futures = await sender.send(records)
        self._ledger.add([a[0] for a in burst], futures)
        self.stats.forwarded += len(burst)
        # Ack as soon as Kafka answers, not at the loop's next turn: the broker sends only
        # Receive Maximum unacked messages, so waiting for the next burst would stall it.
        for f in futures:
            f.add_done_callback(self._on_produced)

    def _on_produced(self, fut: asyncio.Future[object]) -> None:
        self._ack_ready()

    def _ack_ready(self) -> None:
        """PUBACK, in arrival order, every message whose produce Kafka acknowledged."""
        try:
            mids = self._ledger.pop_ready()
        except CollectorError as e:
            self.stats.produce_errors += 1
            self._failure = e
            self._wake.set()
            return
        self._client.ack_many(mids)
        self.stats.acked += len(mids)
        if mids and self.kafka_outage.down:  # the first produce since Kafka came back
            self.kafka_outage.succeeded()
            self.stats.kafka = "ok"

    async def _drain(self) -> None:
        if futures := self._ledger.futures():
            await asyncio.gather(*futures, return_exceptions=True)
        self._ack_ready()
        if self._failure is not None:
            raise self._failure


def _retrieve(fut: asyncio.Future[object]) -> None:
    if not fut.cancelled():
        fut.exception()


async def _sleep_unless(stop: asyncio.Event | None, deadline: float | None, seconds: float) -> None:
    """Sleep ``seconds``, returning early once ``stop`` is set or ``deadline`` is reached."""
    if deadline is not None:
        seconds = min(seconds, max(0.0, deadline - time.monotonic()))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for((stop or asyncio.Event()).wait(), seconds)


def _headers_template(
    topic: str, content_type: str, gateway_id: str
) -> tuple[bytes, list[tuple[str, bytes]], int]:
    """(Kafka key, headers of :class:`RawRecord`, index of the receive time among them)."""
    record = RawRecord(
        device_id=device_from_topic(topic),
        payload=b"",
        content_type=content_type or CONTENT_TYPE_JSON,
        transport=Transport.MQTT,
        gateway_id=gateway_id,
        received_us=0,
        source=topic,
    )
    headers = record.headers()
    at = next(i for i, (name, _) in enumerate(headers) if name == H_RECEIVED)
    return record.device_id.encode(), headers, at
