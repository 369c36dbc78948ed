"""Which batch manifests ``vitals.batches`` already holds, searched from a point in time.

Why: a worker killed between Kafka's ack of a manifest and marking it produced leaves a
manifest that looks unproduced. The worker that takes its partition over produces such
manifests (the outbox), but first asks the topic, so no batch is published twice, by two
workers or by one. Only asked after such a death, and only from shortly before the oldest
manifest's seal time (``offsets_for_times``), never the whole topic.
"""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.changelog import partitions


async def published_ids(
    bootstrap: str, topic: str, wanted: set[str], since_ms: int, *, timeout_s: float = 30.0
) -> set[str]:
    """The ids among ``wanted`` that are keys of ``topic``'s records stamped ``since_ms`` or
    later (a manifest's key is its batch id), read up to the topic's end at call time."""
    tps = [TopicPartition(topic, p) for p in await partitions(bootstrap, topic, timeout_s)]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        # Manifests are produced in transactions (streams.fence): a fenced owner's never count.
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        starts = await consumer.offsets_for_times({tp: max(0, since_ms) for tp in tps})
        todo = set()
        for tp in tps:
            found = starts.get(tp)
            if found is None:  # nothing stamped that late: nothing to read here
                continue
            consumer.seek(tp, found.offset)
            if found.offset < end[tp]:
                todo.add(tp)
        out: set[str] = set()
        while todo:
            got = await consumer.getmany(*todo, timeout_ms=int(timeout_s * 1000))
            if not got:
                raise TimeoutError(f"{topic}: no records for {timeout_s:g} s before its end")
            for tp, msgs in got.items():
                out.update(
                    key
                    for m in msgs
                    if m.offset < end[tp] and (key := (m.key or b"").decode()) in wanted
                )
            todo = {tp for tp in todo if await consumer.position(tp) < end[tp]}
        return out
    finally:
        await consumer.stop()
