"""The Faust worker: Kafka configuration, the topics, and the two agents of
:mod:`streams.agents` wired to them.

Messages carry many samples each and travel as raw bytes (``value_serializer='raw'``): Faust's
per-event overhead is paid per message, never per sample. Sealing runs in a child process
(:mod:`streams.seal_process`) on the other core; this process produces the manifests and acks.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, cast

import faust
from faust.types import TP

from streams import changelog
from streams.agents import NormalizeAgent, SealAgent
from streams.agents.ports import Sent, TakeStream
from streams.dedupe import DedupeWindows
from streams.fence import PartitionPublishers
from streams.lake.layout import BATCHES_DIR
from streams.ledger import Folder
from streams.published import published_ids
from streams.seal_process import SealProcess
from vitalproof.registry import Registry
from vitalproof.retry import Backoff
from vitalproof.settings import Settings

log = logging.getLogger(__name__)

STREAM_BUFFER_RECORDS = 256
#: Bytes fetched per partition (compressed) and records per poll, at most.
FETCH_BYTES = 256 * 1024
POLL_RECORDS = 500


def create_app(settings: Settings) -> faust.App:
    app = new_app(settings)
    k = settings.kafka
    topics = _Topics(
        app,
        raw=_raw_topic(app, k.topic_raw),
        clean=_raw_topic(app, k.topic_clean),
        dlq=_raw_topic(app, k.topic_dlq),
        batches=_raw_topic(app, k.topic_batches),
        events=_raw_topic(app, k.topic_events),
        dedupe=_raw_topic(app, k.topic("vitals.dedupe"), compacting=True, partitions=k.partitions),
    )

    group = _Members(topics)

    @app.agent(topics.raw_topic)
    async def normalize_agent(stream: faust.StreamT[Any]) -> None:
        await topics.dedupe_topic.declare()
        agent = NormalizeAgent(
            lookup=Registry(settings.paths.registry_path).lookup,
            # Empty: each raw partition's part of the changelog is read when it is assigned.
            dedupe=DedupeWindows(
                retain=settings.dedupe.retain_windows, max_ids=settings.dedupe.max_ids
            ),
            outputs=topics,
            max_messages=settings.batching.max_messages,
            changelog=lambda: changelog.read_all(
                settings.kafka.bootstrap, topics.dedupe_topic.get_topic_name()
            ),
        )
        group.joined(agent)
        await agent.run(cast(TakeStream, stream))

    @app.agent(topics.clean_topic)
    async def seal_agent(stream: faust.StreamT[Any]) -> None:
        batches = topics.batches_topic.get_topic_name()
        agent = SealAgent(
            sealer=SealProcess(
                settings.lake_uri if settings.lake.remote else settings.lake_dir,
                settings.paths.keys_dir,
            ),
            batches_dir=_batches_dir(settings),
            outputs=topics,
            batching=settings.batching,
            published=lambda ids, since_ms: published_ids(
                settings.kafka.bootstrap, batches, ids, since_ms
            ),
            publishers=PartitionPublishers(
                settings.kafka.bootstrap,
                batches,
                _batches_dir(settings),
                prefix=app.conf.id,
                compression_type=settings.kafka.compression_type,
            ),
            backoff=lambda: Backoff.from_settings(settings.runtime),
        )
        group.joined(agent)
        await agent.run(cast(TakeStream, stream))

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, /, *args: Any, signal: Any, **_: Any) -> None:
        await group.revoked()

    @app.on_partitions_assigned.connect
    async def on_assigned(sender: Any, /, *args: Any, signal: Any, **_: Any) -> None:
        (assigned,) = args  # the signal's one argument: this worker's partitions now
        await group.assigned(set(assigned))

    return app


def _batches_dir(settings: Settings) -> Path | Folder:
    """The ledger's folder: local, or on S3 (only then is pyarrow.fs loaded in the worker)."""
    if not settings.lake.remote:
        return settings.lake_dir / BATCHES_DIR
    from streams.lake.storage import open_lake

    return open_lake(settings).child(BATCHES_DIR)


def new_app(settings: Settings) -> faust.App:
    """The Faust app with the worker's Kafka settings, and why each differs from Faust's."""
    prefix = settings.namespace
    datadir = settings.paths.home / "faust" / prefix
    datadir.parent.mkdir(parents=True, exist_ok=True)
    return faust.App(
        f"vitalproof-{prefix}",
        broker=f"kafka://{settings.kafka.bootstrap}",
        value_serializer="raw",
        key_serializer="raw",
        store="memory://",
        datadir=str(datadir),
        web_enabled=False,
        topic_partitions=settings.kafka.partitions,
        topic_replication_factor=settings.kafka.replication_factor,  # its own topics too
        broker_commit_interval=1.0,
        # A worker killed with -9 keeps its partitions until the group notices: 10 s, not
        # Faust's 60 s, before a restarted or surviving worker takes over.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        # Every byte sent costs the worker a syscall's copy (and, to a local broker, the
        # receive path too): compressed batches (cramjam, in C) cost less than they save.
        producer_compression_type=settings.kafka.compression_type,
        stream_wait_empty=False,
        # Faust buffers up to this many *records* per stream; a vitals.clean bundle holds
        # thousands of samples, so its default (4096) could hold most of a gigabyte.
        stream_buffer_maxsize=STREAM_BUFFER_RECORDS,
        # Faust hands every fetched record to its stream before any record of the next
        # partition: a big fetch of a raw backlog (1 MB per partition compressed is ~6 MB of
        # device JSON) held vitals.clean back for seconds and left the sealer idle. Smaller
        # fetches and polls interleave the two topics, and hold less memory.
        consumer_max_fetch_size=FETCH_BYTES,
        broker_max_poll_records=POLL_RECORDS,
    )


def _raw_topic(app: faust.App, name: str, **options: Any) -> faust.TopicT:
    return app.topic(name, value_serializer="raw", key_serializer="raw", **options)


class _Topics:
    """The agents' outputs on Kafka (both :class:`~streams.agents.NormalizeOutputs` and
    :class:`~streams.agents.SealOutputs`). The hot path (clean bundles, the changelog) goes
    straight through the producer: Faust's ``Topic.send`` costs per call."""

    def __init__(
        self,
        app: faust.App,
        *,
        raw: faust.TopicT,
        clean: faust.TopicT,
        dlq: faust.TopicT,
        batches: faust.TopicT,
        events: faust.TopicT,
        dedupe: faust.TopicT,
    ) -> None:
        self.app = app
        self.raw_topic, self.clean_topic, self.dedupe_topic = raw, clean, dedupe
        self.dlq_topic, self.batches_topic, self.events_topic = dlq, batches, events
        self._clean_name, self._dedupe_name = clean.get_topic_name(), dedupe.get_topic_name()

    async def clean(self, key: bytes, value: bytes) -> Sent:
        return await self.app.producer.send(self._clean_name, key, value, None, None, None)

    async def dedupe(self, key: bytes, value: bytes | None) -> Sent:
        return await self.app.producer.send(self._dedupe_name, key, value, None, None, None)

    async def dlq(self, key: bytes | None, value: bytes, headers: dict[str, bytes]) -> Sent:
        return await self.dlq_topic.send(key=key, value=value, headers=headers)

    async def event(self, key: bytes, value: bytes) -> Sent:
        return await self.events_topic.send(key=key, value=value)

    async def manifest(self, batch_id: str, manifest_json: bytes) -> Sent:
        return await self.batches_topic.send(key=batch_id.encode(), value=manifest_json)


class _Members:
    """The two agents of this worker, as the group's rebalances reach them.

    Faust calls the revoke signal before the group reassigns partitions and waits for it:
    both agents finish what they handed on (so the next owner of a partition finds it
    durable), and the assignment then hands each agent its partitions, whose memory it
    adopts (normalize: the dedupe changelog; seal: the lake's manifests) before it goes on.
    """

    def __init__(self, topics: _Topics) -> None:
        self.raw = topics.raw_topic.get_topic_name()
        self.clean = topics.clean_topic.get_topic_name()
        self.normalize: NormalizeAgent | None = None
        self.seal: SealAgent | None = None
        self.started = asyncio.Event()  # both agents exist

    def joined(self, agent: NormalizeAgent | SealAgent) -> None:
        if isinstance(agent, NormalizeAgent):
            self.normalize = agent
        else:
            self.seal = agent
        if self.normalize is not None and self.seal is not None:
            self.started.set()

    async def revoked(self) -> None:
        started = [a for a in (self.normalize, self.seal) if a is not None]
        await asyncio.gather(*(agent.on_revoked() for agent in started))

    async def assigned(self, assigned: set[TP]) -> None:
        await self.started.wait()
        normalize, seal = self.normalize, self.seal
        assert normalize is not None and seal is not None
        tps = {(tp.topic, tp.partition) for tp in assigned}
        log.info("assigned %s", sorted(tps))
        await asyncio.gather(
            normalize.on_assigned({tp for tp in tps if tp[0] == self.raw}),
            seal.on_assigned({tp for tp in tps if tp[0] == self.clean}),
        )
