"""One anchor job at a time, however many candidates run: a lease, and the log they share.

**The lease.** Every candidate joins a consumer group of its own on a topic with one
partition (``vitals.anchor-lease``, nothing is ever written to it); the member Kafka assigns
that partition to is the leader. Why a consumer group and not Faust's leader timer: the
anchor job is its own process (it needs no stream of the worker's), and the group protocol
already gives what a lease needs: one owner at a time, a dead owner expelled after the
session timeout, and an orderly handover, because the group waits for the old owner's
revocation (:meth:`Lease.work` is held for every step the leader takes, and the revocation
waits for the step in hand) before it assigns the partition to anyone else.

**The shared log.** Candidates may run on different hosts, each with its own anchor folder.
The leader publishes every log entry to ``vitals.anchor-log`` (one partition, key = the
entry's index, value = its canonical bytes) *before* it appends it locally, so the topic
holds the log in the leader's order (``vitals.batches`` has several partitions: replaying
it would not give one order, and the audit checkpoints are not in it at all). A new leader
replays the topic into its local log (:meth:`LogReplica.catch_up`), refusing any entry that
disagrees with what it holds, then takes up ``vitals.batches`` at the group's committed
offsets (appends are idempotent by batch id).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from anchor.errors import AnchorError
from anchor.log import LogEntry, MerkleLog

log = logging.getLogger(__name__)

LEASE_TOPIC = "vitals.anchor-lease"
LOG_TOPIC = "vitals.anchor-log"
#: A leader killed with -9 holds the lease this long before the group expels it.
LEASE_SESSION_TIMEOUT_MS = 6_000
LEASE_HEARTBEAT_MS = 1_000


async def ensure_single_partition_topic(bootstrap: str, topic: str) -> None:
    """Create ``topic`` with one partition unless it exists (its order is the point)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([NewTopic(topic, 1, 1)])
        (described,) = await admin.describe_topics([topic])
        partitions = described.get("partitions") or []
        if len(partitions) > 1:
            raise AnchorError(f"{topic} has {len(partitions)} partitions; it must have one")
    finally:
        await admin.close()


class Lease(ConsumerRebalanceListener):
    """Leadership of the anchor job: holding partition 0 of the lease topic."""

    def __init__(self, bootstrap: str, topic: str, group: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.group = group
        self.work = asyncio.Lock()
        """Held by the leader for each step; a revocation waits for it."""
        self._leader = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None

    @property
    def is_leader(self) -> bool:
        return self._leader.is_set()

    async def start(self) -> None:
        await ensure_single_partition_topic(self.bootstrap, self.topic)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group,
            enable_auto_commit=False,
            session_timeout_ms=LEASE_SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=LEASE_HEARTBEAT_MS,
        )
        self._consumer.subscribe([self.topic], listener=self)
        await self._consumer.start()

    async def stop(self) -> None:
        self._leader.clear()
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def wait_leader(self, timeout_s: float) -> bool:
        """Poll the group (which also keeps this member in it) until this candidate leads,
        or ``timeout_s`` passed."""
        deadline = time.monotonic() + timeout_s
        while not self.is_leader and time.monotonic() < deadline:
            await self.poll()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._leader.wait(), 0.2)
        return self.is_leader

    async def poll(self) -> None:
        """Nothing is ever read; polling lets the member take part in rebalances."""
        if self._consumer is not None:
            await self._consumer.getmany(timeout_ms=50)

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        if self.is_leader:
            self._leader.clear()
            async with self.work:  # the step in hand finishes before anyone else leads
                log.info("anchor lease given up")

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        if any(tp.topic == self.topic for tp in assigned):
            log.info("anchor lease taken: this candidate leads")
            self._leader.set()


class LogReplica:
    """The anchor log's entries on a one-partition topic, in log order."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        await ensure_single_partition_topic(self.bootstrap, self.topic)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True
        )
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def publish(self, index: int, entry: LogEntry) -> None:
        """Entry ``index`` durably on the topic (acks=all) before the local log has it."""
        if self._producer is None:
            raise AnchorError("the log replica was not started")
        await self._producer.send_and_wait(
            self.topic, entry.leaf_data(), key=str(index).encode(), partition=0
        )

    async def catch_up(self, local: MerkleLog, *, timeout_s: float = 60.0) -> int:
        """Append to ``local`` every entry the topic holds beyond it; the number appended.

        An entry that disagrees with the local one at its index, or that skips an index,
        is an :class:`AnchorError`: two histories, which must never be anchored over.
        """
        tp = TopicPartition(self.topic, 0)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False
        )
        await consumer.start()
        added = 0
        try:
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            end = (await consumer.end_offsets([tp]))[tp]
            while await consumer.position(tp) < end:
                got = await consumer.getmany(tp, timeout_ms=int(timeout_s * 1000))
                if not got:
                    raise AnchorError(
                        f"{self.topic}: no records for {timeout_s:g} s before its end"
                    )
                for record in got.get(tp, []):
                    if record.offset >= end:
                        continue
                    added += self._apply(local, int(record.key or b"-1"), record.value or b"")
        finally:
            await consumer.stop()
        return added

    def _apply(self, local: MerkleLog, index: int, value: bytes) -> int:
        entry = LogEntry.parse(value)
        if index < local.size:
            if local.entry(index) != entry:
                raise AnchorError(
                    f"{self.topic}: entry {index} is {entry.batch_id}, the local log has "
                    f"{local.entry(index).batch_id}: two histories"
                )
            return 0
        if index > local.size:
            raise AnchorError(f"{self.topic}: entry {index} follows {local.size - 1}: a gap")
        local.append(entry.batch_id, entry.batch_root, entry.batch_size)
        return 1
