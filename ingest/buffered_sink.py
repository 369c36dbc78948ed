"""A disk-buffered Kafka sink: append durably first, produce later, forget only what Kafka took.

For a gateway whose source does not redeliver (a BLE peripheral notifies once), the gateway
is the only place a reading exists once it arrived ("Nothing is lost", docs/invariants.md),
so it cannot wait for Kafka before keeping it. The sink pairs the two halves that make that
safe and that any such gateway needs the same way:

* **append**: every record is written (fsync'd, one fsync per group) to
  :class:`ingest.buffer.DiskBuffer` before anything else; eviction at the buffer's bound is
  counted (``evicted``) and logged by the buffer.
* **drain**: a task produces the buffer, oldest first, through ``durable_producer``
  (acks=all, idempotent) and acks each record in the buffer only after Kafka acknowledged
  it, the longest acknowledged prefix of a batch at a time. While Kafka is unreachable
  records accumulate on disk, and a restarted gateway drains what the previous one
  buffered, in order.

Delivery is at-least-once: a batch whose produce failed is sent again, and a crash between
Kafka's ack and the buffer's ack resends a few records; normalization and sealing dedupe by
reading id.

A buffered record is an :class:`Envelope` (topic, key, value, headers): one buffer can hold
records for several topics (``vitals.raw`` and ``vitals.dlq``) in one order.

The MQTT collector does not use this: its broker redelivers what was not acknowledged, so it
keeps nothing on disk and acknowledges the broker after Kafka (``ingest.mqtt.collector``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from aiokafka import AIOKafkaProducer

from ingest.buffer import BufferedRecord, DiskBuffer
from ingest.kafka_sink import durable_producer
from vitalproof.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Envelope:
    """One Kafka record as it waits in the disk buffer: topic, key, value, headers."""

    topic: str
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...]

    def encode(self) -> bytes:
        t = self.topic.encode()
        out = bytearray(struct.pack("<BH", 1, len(t)) + t)
        out += struct.pack("<I", len(self.key)) + self.key
        out += struct.pack("<I", len(self.value)) + self.value
        out += struct.pack("<H", len(self.headers))
        for name, val in self.headers:
            n = name.encode()
            out += struct.pack("<H", len(n)) + n + struct.pack("<I", len(val)) + val
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> Envelope:
        pos = 0

        def take(fmt: str) -> int:
            nonlocal pos
            (v,) = struct.unpack_from(fmt, data, pos)
            pos += struct.calcsize(fmt)
            return int(v)

        def chunk(n: int) -> bytes:
            nonlocal pos
            b = data[pos : pos + n]
            if len(b) != n:
                raise ValueError("truncated envelope")
            pos += n
            return b

        if take("<B") != 1:
            raise ValueError("unknown envelope version")
        topic = chunk(take("<H")).decode()
        key = chunk(take("<I"))
        value = chunk(take("<I"))
        headers = []
        for _ in range(take("<H")):
            name = chunk(take("<H")).decode()
            headers.append((name, chunk(take("<I"))))
        return cls(topic, key, value, tuple(headers))


class SinkCounters(Protocol):
    """The counters the sink keeps up to date (a gateway's stats object has them)."""

    buffered: int
    produced: int
    produced_dlq: int
    produce_errors: int
    evicted: int


class BufferedKafkaSink:
    """Disk buffer in front of a Kafka producer: :meth:`append`, then :meth:`run` drains.

    ``counters`` is where appends, produces, DLQ produces, errors and evictions are counted;
    a gateway that starts a new set of counters per run points this at them. ``label``
    prefixes the log lines (``"BLE: Kafka unreachable ..."``). One owner, one event loop.
    """

    def __init__(
        self,
        settings: Settings,
        buffer: DiskBuffer,
        counters: SinkCounters,
        *,
        producer_factory: Callable[[Settings], AIOKafkaProducer] | None = None,
        label: str = "BLE",
    ) -> None:
        self.settings = settings
        self.buffer = buffer
        self.counters = counters
        self.label = label
        self._producer_factory = producer_factory or durable_producer
        self.kafka_ready = asyncio.Event()
        """Set while a producer is started (Kafka reachable)."""
        self._buffered = asyncio.Event()
        self._empty = asyncio.Event()  # set by the drainer whenever the buffer is empty
        self._stop = asyncio.Event()

    # -- append -------------------------------------------------------------------------

    def append(self, envelopes: Sequence[Envelope]) -> None:
        """Append a group durably (one fsync); it is on disk when this returns."""
        before = self.buffer.evicted
        self.buffer.append_many(env.encode() for env in envelopes)
        self._empty.clear()
        self.counters.buffered += len(envelopes)
        self.counters.evicted += self.buffer.evicted - before
        self._buffered.set()

    # -- lifecycle ----------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> None:
        """While Kafka is reachable and records are held, wait up to ``timeout_s`` for the
        buffer to empty (what is left stays on disk for the next run)."""
        if self.kafka_ready.is_set() and len(self.buffer):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._empty.wait(), timeout_s)

    def stop(self) -> None:
        """Make :meth:`run` return (it stops its producer on the way out)."""
        self._stop.set()
        self._buffered.set()

    # -- drain to Kafka -----------------------------------------------------------------

    async def run(self) -> None:
        """Buffer -> Kafka, oldest first; a record is acked in the buffer after Kafka's ack."""
        delay = 0.2
        producer: AIOKafkaProducer | None = None
        try:
            while not self._stop.is_set():
                if producer is None:
                    producer = self._producer_factory(self.settings)
                    try:
                        await producer.start()
                    except Exception as e:  # aiokafka raises several kinds while unreachable
                        log.warning("%s: Kafka unreachable (%s); buffering on disk", self.label, e)
                        with contextlib.suppress(Exception):
                            await producer.stop()
                        producer = None
                        await self._sleep_or_stop(delay)
                        delay = min(5.0, delay * 2)
                        continue
                    self.kafka_ready.set()
                    delay = 0.2
                batch = self.buffer.peek()
                if not batch:
                    self._buffered.clear()
                    if not len(self.buffer):
                        self._empty.set()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._buffered.wait(), 0.5)
                    continue
                if not await self._send(producer, batch):
                    await self._sleep_or_stop(delay)
                    delay = min(5.0, delay * 2)
                else:
                    delay = 0.2
        finally:
            self.kafka_ready.clear()
            if producer is not None:
                with contextlib.suppress(Exception):
                    await producer.stop()

    async def _send(self, producer: AIOKafkaProducer, batch: list[BufferedRecord]) -> bool:
        """Produce a batch; ack the longest acknowledged prefix. True if all went."""
        futures = []
        envs = []
        try:
            for rec in batch:
                env = Envelope.decode(rec.payload)
                envs.append(env)
                futures.append(
                    await producer.send(
                        env.topic, value=env.value, key=env.key, headers=list(env.headers)
                    )
                )
        except Exception as e:
            log.warning("%s: produce failed (%s); will retry", self.label, e)
            self.counters.produce_errors += 1
        results = await asyncio.gather(*futures, return_exceptions=True)
        acked_upto = None
        for rec, env, res in zip(batch, envs, results, strict=False):
            if isinstance(res, BaseException):
                log.warning("%s: Kafka refused a record (%s); will retry", self.label, res)
                self.counters.produce_errors += 1
                break
            acked_upto = rec.index
            if env.topic == self.settings.kafka.topic_dlq:
                self.counters.produced_dlq += 1
            else:
                self.counters.produced += 1
        if acked_upto is not None:
            self.buffer.ack(acked_upto)
        return acked_upto == batch[-1].index

    async def _sleep_or_stop(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
