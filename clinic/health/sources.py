"""Where the health figures come from: Kafka's offsets and commits, the DLQ's records, the
lake's manifests and the anchor log's receipts. Reading only: nothing here writes, commits
or creates a topic.

Kafka is read with a consumer of no group (it commits nothing and joins nothing, so it never
moves another reader's offsets) and an admin client. Topics are found by listing the
cluster's, never by naming one in a metadata request: the development broker creates a topic
it is asked about, and a topic created here would have the wrong partition count.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import ValidationError

from anchor.errors import AnchorError
from anchor.log import ANCHORS_FILE, LogHead
from clinic import fanout
from clinic.health.figures import (
    Consumer,
    DlqTally,
    KafkaFigures,
    LastAnchor,
    Offsets,
    Sealed,
    kafka_figures,
)
from streams.lake.layout import BATCHES_DIR
from streams.lake.storage import LakeRoot
from vitalproof.manifest import BatchManifest
from vitalproof.settings import Settings

log = logging.getLogger(__name__)

#: Milliseconds one Kafka request may take before the refresh gives up on it.
REQUEST_TIMEOUT_MS = 4_000
#: Seconds of each refresh spent counting DLQ records (a long DLQ is counted over several).
DLQ_BUDGET_S = 0.3


def worker_group(settings: Settings) -> str:
    """The Faust worker's consumer group: its app id (``streams.app.new_app``), one group for
    both agents (normalize on vitals.raw, seal on vitals.clean)."""
    return f"vitalproof-{settings.namespace}"


def anchor_group(settings: Settings) -> str:
    """The anchor job's consumer group on vitals.batches (``anchor.job.AnchorJob``)."""
    return f"vitalproof-anchor-{settings.namespace}"


def consumers(settings: Settings) -> list[Consumer]:
    k = settings.kafka
    return [
        Consumer("normalize", worker_group(settings), k.topic_raw, from_start=True),
        Consumer("seal", worker_group(settings), k.topic_clean, from_start=True),
        Consumer("anchor", anchor_group(settings), k.topic_batches, from_start=True),
        Consumer("fanout", fanout.group_id(settings), k.topic_clean, from_start=False),
    ]


class KafkaProbe:
    """Offsets, commits and the DLQ's records, through clients kept open between refreshes
    (and dropped by :meth:`close` after a failure, so the next refresh connects anew)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.consumers = consumers(settings)
        k = settings.kafka
        self.topics = [k.topic_raw, k.topic_clean, k.topic_dlq, k.topic_batches]
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._dlq_next: dict[TopicPartition, int] = {}  # the next DLQ record to count
        self._dlq_assigned: set[TopicPartition] = set()
        self.dlq_pending = 0  # DLQ records written but not counted yet

    async def _clients(self) -> tuple[AIOKafkaAdminClient, AIOKafkaConsumer]:
        if self._admin is None or self._consumer is None:
            await self.close()
            bootstrap = self.settings.kafka.bootstrap
            admin = AIOKafkaAdminClient(
                bootstrap_servers=bootstrap, request_timeout_ms=REQUEST_TIMEOUT_MS
            )
            consumer = AIOKafkaConsumer(
                bootstrap_servers=bootstrap,
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                request_timeout_ms=REQUEST_TIMEOUT_MS,
            )
            try:
                await admin.start()
                await consumer.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await admin.close()
                with contextlib.suppress(Exception):
                    await consumer.stop()
                raise
            self._admin, self._consumer = admin, consumer
            self._dlq_assigned = set()
        return self._admin, self._consumer

    async def close(self) -> None:
        admin, consumer = self._admin, self._consumer
        self._admin = self._consumer = None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()
        if admin is not None:
            with contextlib.suppress(Exception):
                await admin.close()

    async def read(self, dlq: DlqTally) -> KafkaFigures:
        """The topics' offsets and the groups' lag now; DLQ records since the last call are
        added to ``dlq``. Raises aiokafka's errors (or OSError) if Kafka does not answer."""
        admin, consumer = await self._clients()
        partitions = await self._partitions(admin)
        tps = [TopicPartition(t, p) for t, ps in partitions.items() for p in ps]
        ends = await consumer.end_offsets(tps) if tps else {}
        begins = await consumer.beginning_offsets(tps) if tps else {}
        topics = {
            t: Offsets(
                end={p: ends[TopicPartition(t, p)] for p in ps},
                begin={p: begins[TopicPartition(t, p)] for p in ps},
            )
            for t, ps in partitions.items()
        }
        commits: dict[str, dict[tuple[str, int], int]] = {}
        for group in dict.fromkeys(c.group for c in self.consumers):
            got = await admin.list_consumer_group_offsets(group)
            commits[group] = {(tp.topic, tp.partition): meta.offset for tp, meta in got.items()}
        dlq_tps = [tp for tp in tps if tp.topic == self.settings.kafka.topic_dlq]
        await self._count_dlq(consumer, dlq_tps, ends, dlq)
        return kafka_figures(topics, commits, self.consumers)

    async def _partitions(self, admin: AIOKafkaAdminClient) -> dict[str, list[int]]:
        """Our topics that exist, each with its partitions that have a leader."""
        wanted = set(self.topics)
        out: dict[str, list[int]] = {}
        described: list[dict[str, Any]] = await admin.describe_topics()  # every topic
        for topic in described:
            if topic.get("topic") not in wanted or topic.get("error_code", 0) != 0:
                continue
            parts = [int(p["partition"]) for p in topic.get("partitions") or []]
            if parts and all(p.get("leader", -1) >= 0 for p in topic["partitions"]):
                out[str(topic["topic"])] = sorted(parts)
        return out

    async def _count_dlq(
        self,
        consumer: AIOKafkaConsumer,
        tps: list[TopicPartition],
        ends: dict[TopicPartition, int],
        dlq: DlqTally,
    ) -> None:
        """Count the DLQ's records from where the last call stopped (from the first retained
        record at the service's start), for at most :data:`DLQ_BUDGET_S`."""
        if not tps:  # no DLQ topic yet
            self.dlq_pending = 0
            return
        if set(tps) != self._dlq_assigned:
            consumer.assign(tps)
            for tp in tps:
                if tp in self._dlq_next:
                    consumer.seek(tp, self._dlq_next[tp])
                else:
                    await consumer.seek_to_beginning(tp)
            self._dlq_assigned = set(tps)
        deadline = time.monotonic() + DLQ_BUDGET_S
        todo = [tp for tp in tps if await consumer.position(tp) < ends[tp]]
        while todo and time.monotonic() < deadline:
            got = await consumer.getmany(*todo, timeout_ms=100, max_records=2_000)
            for tp, records in got.items():
                for record in records:
                    if record.offset < ends[tp]:
                        dlq.add(dict(record.headers))
                        self._dlq_next[tp] = record.offset + 1
            todo = [tp for tp in todo if self._dlq_next.get(tp, 0) < ends[tp]]
        self.dlq_pending = sum([max(0, ends[tp] - await consumer.position(tp)) for tp in tps])


class LakeTally:
    """Readings and batches sealed, from the manifests (each parsed once: a manifest is
    written whole and never changed)."""

    def __init__(self, lake_dir: Path | LakeRoot) -> None:
        """``lake_dir``: the namespace's lake folder, or its root on S3 (``open_lake``)."""
        self.folder: Path | LakeRoot = (
            lake_dir / BATCHES_DIR if isinstance(lake_dir, Path) else lake_dir.child(BATCHES_DIR)
        )
        self._seen: dict[str, tuple[int, int]] = {}  # file name -> (rows, sealed_at_us)

    def _names(self) -> set[str]:
        if not isinstance(self.folder, Path):
            return set(self.folder.names(".json"))
        try:
            return {e.name for e in os.scandir(self.folder) if e.name.endswith(".json")}
        except FileNotFoundError:
            return set()

    def _bytes(self, name: str) -> bytes:
        if isinstance(self.folder, Path):
            return (self.folder / name).read_bytes()
        data = self.folder.read(name)
        if data is None:
            raise FileNotFoundError(f"{self.folder}/{name}")
        return data

    def read(self) -> Sealed:
        names = self._names()
        for gone in set(self._seen) - names:
            del self._seen[gone]
        for name in names - set(self._seen):
            try:
                m = BatchManifest.model_validate_json(self._bytes(name))
            except (OSError, ValidationError) as e:
                log.warning("health: manifest %s unreadable: %s", name, e)
                continue
            self._seen[name] = (m.rows, m.sealed_at_us)
        rows = [r for r, _ in self._seen.values()]
        return Sealed(
            readings=sum(rows),
            batches=len(rows),
            last_sealed_us=max((t for _, t in self._seen.values()), default=None),
        )


class AnchorWatch:
    """The last anchored head of the anchor log (``anchors.jsonl``: one receipt a line),
    re-read only when the file changed."""

    def __init__(self, log_dir: Path) -> None:
        self.path = log_dir / ANCHORS_FILE
        self._stat: tuple[int, int] | None = None
        self._last: LastAnchor | None = None

    def read(self) -> LastAnchor | None:
        """Raises :class:`~anchor.errors.AnchorError` if the last line is not a receipt."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._stat, self._last = None, None
            return None
        if (st.st_size, st.st_mtime_ns) == self._stat:
            return self._last
        data = self.path.read_bytes()
        # A line without its newline was never acknowledged (anchor.log): not a receipt yet.
        lines = [line for line in data[: data.rfind(b"\n") + 1].split(b"\n") if line]
        last = None
        if lines:
            head = LogHead.parse(lines[-1])
            a = head.anchor
            try:
                last = LastAnchor(
                    tx_hash=str(a["tx_hash"]),
                    block_number=int(a["block_number"]),
                    block_time=float(a["block_timestamp"]),
                    tree_size=head.tree_size,
                    chain_id=int(a["chain_id"]),
                    anchors=len(lines),
                )
            except (KeyError, TypeError, ValueError) as e:
                raise AnchorError(f"{self.path}: the last head has no receipt: {e}") from None
        self._stat, self._last = (st.st_size, st.st_mtime_ns), last
        return last
