"""The one Kafka producer configuration every collector uses: durable before acknowledged."""

from __future__ import annotations

from asyncio import Future
from collections.abc import Iterable

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder

from vitalproof.settings import Settings


def durable_producer(settings: Settings, **overrides: object) -> AIOKafkaProducer:
    """acks=all and idempotence: a produce is acknowledged only once the broker has it,
    and retries cannot duplicate it ("Nothing is lost", docs/invariants.md)."""
    options: dict[str, object] = {
        "bootstrap_servers": settings.kafka.bootstrap,
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        "max_batch_size": 1 << 20,
        "request_timeout_ms": 30_000,
        "compression_type": settings.kafka.compression_type,
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


Headers = list[tuple[str, bytes]]


class BurstSender:
    """Hands Kafka a whole burst of records as one record batch per partition.

    ``producer.send()`` costs a coroutine, a future, a pure-Python murmur2 hash of the key and
    an accumulator lookup per record: at tens of thousands of records a second that, not
    Kafka, is the limit. Here a burst costs one ``send_batch`` per partition it touches, and
    each key's partition is hashed once (the producer's own default partitioner, so records
    land where ``send()`` would have put them and per-device order holds).
    """

    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self._producer = producer
        self._topic = topic
        self._partitioner = DefaultPartitioner()
        self._partitions: list[int] = []
        self._partition_of: dict[bytes, int] = {}

    async def send(self, records: Iterable[tuple[bytes, bytes, Headers]]) -> list[Future[object]]:
        """Queue ``(key, value, headers)`` records in order; one future per batch queued.

        Records of one partition keep their order (one batch after another); a burst is
        durable once every returned future resolved without an exception.
        """
        partitions = sorted(await self._producer.partitions_for(self._topic))
        if partitions != self._partitions:  # partitions were added: keys move
            self._partitions = partitions
            self._partition_of.clear()
        partition_of = self._partition_of
        batches: dict[int, BatchBuilder] = {}
        futures: list[Future[object]] = []
        for key, value, headers in records:
            partition = partition_of.get(key)
            if partition is None:
                partition = partition_of[key] = self._partitioner(key, partitions, partitions)
            batch = batches.get(partition)
            if batch is None:
                batch = batches[partition] = self._producer.create_batch()
            if batch.append(timestamp=None, key=key, value=value, headers=headers) is None:
                futures.append(await self._submit(batch, partition))  # full
                batch = batches[partition] = self._producer.create_batch()
                if batch.append(timestamp=None, key=key, value=value, headers=headers) is None:
                    raise ValueError(f"a record of {len(value)} bytes exceeds the batch size")
        for partition, batch in batches.items():
            futures.append(await self._submit(batch, partition))
        return futures

    async def _submit(self, batch: BatchBuilder, partition: int) -> Future[object]:
        batch.close()  # closed: sent at once, not after linger_ms
        fut: Future[object] = await self._producer.send_batch(
            batch, self._topic, partition=partition
        )
        return fut
