"""Reading a compacted changelog topic from its start to its current end, once, at start.

A plain aiokafka consumer without a group (nothing to commit: the whole topic is the state),
assigned every partition, stopping at the end offsets it found when it began. Records written
later are this worker's own.
"""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from streams.dedupe import Record


async def read_all(bootstrap: str, topic: str, *, timeout_s: float = 60.0) -> list[Record]:
    """Every record of ``topic`` up to its end at call time, partition by partition in order."""
    tps = [TopicPartition(topic, p) for p in await partitions(bootstrap, topic, timeout_s)]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        todo = {tp for tp in tps if end[tp] > await consumer.position(tp)}
        out: list[Record] = []
        while todo:
            got = await consumer.getmany(*todo, timeout_ms=int(timeout_s * 1000))
            if not got:
                raise TimeoutError(f"{topic}: no records for {timeout_s:g} s before its end")
            for tp, msgs in got.items():
                out.extend((m.key or b"", m.value) for m in msgs if m.offset < end[tp])
            todo = {tp for tp in todo if await consumer.position(tp) < end[tp]}
        return out
    finally:
        await consumer.stop()


async def partitions(bootstrap: str, topic: str, timeout_s: float) -> list[int]:
    """The topic's partitions once each has a leader (a topic created just now has none)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            (described,) = await admin.describe_topics([topic])
            parts = described.get("partitions") or []
            if (
                described.get("error_code", 0) == 0
                and parts
                and all(p.get("leader", -1) >= 0 for p in parts)
            ):
                return sorted(int(p["partition"]) for p in parts)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: no leader for every partition in {timeout_s:g} s")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()
