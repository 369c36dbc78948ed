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

**The fence.** A leader frozen (a GC pause, a stopped VM) past the session timeout loses
the lease without knowing it; when it runs again it may take one more step as leader. The
lease alone cannot stop that step (any check made before it can be raced by another
freeze), so the writes themselves are fenced: the log replica's producer is transactional,
under one ``transactional.id`` for the log, and each new leader starts it afresh
(:meth:`LogReplica.fence`) before it reads the log. The coordinator bumps the id's epoch and
from then on refuses the old leader's sends (``ProducerFenced``, :class:`LeaseLost`), and
readers read committed entries only. Before each anchor transaction the leader commits a
record to the lease topic through the same producer (:meth:`LogReplica.barrier`), so a
stale leader is refused there and never sends its anchor. (Frozen between the barrier and
the send, it would anchor a prefix of the shared log that every entry of is committed:
the contract refuses it if the new leader anchored as far already.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, ProducerFenced, TopicAlreadyExistsError

from anchor.errors import AnchorError
from anchor.log import LogEntry, MerkleLog

log = logging.getLogger(__name__)

LEASE_TOPIC = "vitals.anchor-lease"
LOG_TOPIC = "vitals.anchor-log"
#: A leader killed with -9 holds the lease this long before the group expels it.
LEASE_SESSION_TIMEOUT_MS = 6_000
LEASE_HEARTBEAT_MS = 1_000


class LeaseLost(AnchorError):
    """Another candidate leads now: this one's writes were refused (fenced)."""


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

    def lost(self) -> None:
        """This candidate's writes were fenced: it leads no more (the group tells it soon)."""
        self._leader.clear()

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

    def __init__(self, bootstrap: str, topic: str, *, lease_topic: str | None = None) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.lease_topic = lease_topic
        """Where :meth:`barrier` commits its record (``None``: no barrier)."""
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        """Make sure the topic exists. The producer is started by :meth:`fence`, when this
        candidate takes the lease: a candidate merely waiting must not fence the leader."""
        await ensure_single_partition_topic(self.bootstrap, self.topic)

    async def fence(self) -> None:
        """Start the log's transactional producer afresh: once this returns, every earlier
        leader's producer is fenced (its open transaction aborted, its sends refused)."""
        await self.stop()
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            enable_idempotence=True,
            transactional_id=f"{self.topic}-writer",
        )
        await producer.start()
        try:
            # The producer id and bumped epoch come with the first transaction.
            await producer.begin_transaction()
            await producer.commit_transaction()
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer

    async def _committed(self, topic: str, value: bytes, key: bytes) -> None:
        """One record in its own transaction, committed on return; :class:`LeaseLost` if
        a later leader fenced this producer."""
        if self._producer is None:
            raise AnchorError("the log replica is not fenced in (fence() starts its producer)")
        try:
            async with self._producer.transaction():
                await (await self._producer.send(topic, value, key=key, partition=0))
        except ProducerFenced as err:
            await self.stop()
            raise LeaseLost(f"{topic}: another candidate leads now ({err})") from err
        except KafkaError as err:
            if "fenc" not in str(err).lower() and "epoch" not in str(err).lower():
                raise
            await self.stop()
            raise LeaseLost(f"{topic}: another candidate leads now ({err})") from err

    async def barrier(self, size: int) -> None:
        """Before anchoring the log at ``size``: refused (:class:`LeaseLost`) if another
        candidate has led since this one took the lease."""
        if self.lease_topic is not None:
            await self._committed(self.lease_topic, str(size).encode(), b"anchor")

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def publish(self, index: int, entry: LogEntry) -> None:
        """Entry ``index`` durably on the topic (acks=all) before the local log has it."""
        await self._committed(self.topic, entry.leaf_data(), str(index).encode())

    async def catch_up(self, local: MerkleLog, *, timeout_s: float = 60.0) -> int:
        """Append to ``local`` every entry the topic holds beyond it; the number appended.

        An entry that disagrees with the local one at its index, or that skips an index,
        is an :class:`AnchorError`: two histories, which must never be anchored over.
        """
        tp = TopicPartition(self.topic, 0)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",  # never a fenced leader's aborted entry
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
