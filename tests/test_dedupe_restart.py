"""On the real Kafka: a retransmission arriving after a worker restart is dropped by
normalize (the changelog rebuilt its memory), and old windows leave the changelog."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from streams import changelog
from streams.dedupe import RETAIN_WINDOWS, WINDOW_US
from vitalproof.cli import processes
from vitalproof.raw import RawRecord
from vitalproof.registry import Registry
from vitalproof.schema import CONTENT_TYPE_JSON, Transport
from vitalproof.settings import Settings
from vitalproof.wire import clean

pytestmark = pytest.mark.integration

DEVICE, PATIENT = "dev-dd", "pat-dd"


def raw(seqs: list[int], t0_us: int, received_us: int, gateway: str) -> RawRecord:
    doc = {
        "schema": 1,
        "series": [
            {
                "metric": "heart_rate",
                "unit": "/min",
                "t": [t0_us + s * 1_000_000 for s in seqs],
                "seq": seqs,
                "v": [60 + s for s in seqs],
            }
        ],
    }
    return RawRecord(
        DEVICE,
        json.dumps(doc).encode(),
        CONTENT_TYPE_JSON,
        Transport.MQTT,
        gateway,
        received_us,
        f"devices/{DEVICE}/vitals",
    )


async def produce(settings: Settings, *records: RawRecord) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap, acks="all")
    await producer.start()
    try:
        for r in records:
            await producer.send_and_wait(
                settings.kafka.topic_raw, r.payload, key=DEVICE.encode(), headers=r.headers()
            )
    finally:
        await producer.stop()


def clean_ids(settings: Settings) -> list[list[str]]:
    """The reading ids of every record on vitals.clean, record by record."""
    records = asyncio.run(changelog.read_all(settings.kafka.bootstrap, settings.kafka.topic_clean))
    return [
        [rid for b in clean.decode_record(v or b"") for rid in b.reading_id] for _k, v in records
    ]


def dedupe_log(settings: Settings) -> dict[bytes, bytes | None]:
    topic = settings.kafka.topic("vitals.dedupe")
    return dict(asyncio.run(changelog.read_all(settings.kafka.bootstrap, topic)))


async def cleanup_policy(settings: Settings, topic: str) -> str:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap)
    await admin.start()
    try:
        (response,) = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic)]
        )
        (resource,) = response.resources
        return next(str(c[1]) for c in resource[4] if c[0] == "cleanup.policy")
    finally:
        await admin.close()


def wait_for(what: str, check: object, log: Path, within_s: float = 60.0) -> None:
    assert callable(check)
    deadline = time.monotonic() + within_s
    while not check():
        if time.monotonic() > deadline:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            pytest.fail(f"{what} not seen within {within_s:g} s; worker log:\n{tail}")
        time.sleep(0.5)


def test_a_duplicate_after_a_restart_is_dropped_by_normalize(kafka_topics: Settings) -> None:
    settings = kafka_topics
    Registry(settings.paths.registry_path).enroll(DEVICE, PATIENT)
    now = time.time_ns() // 1000
    t0 = now - 60_000_000
    original = raw(list(range(10)), t0, now, "gw-a")
    log = settings.paths.home / "worker.log"

    asyncio.run(produce(settings, original))
    worker = processes.start(settings, "worker", log=log)
    try:
        wait_for("the original on vitals.clean", lambda: len(clean_ids(settings)) == 1, log)
        wait_for("its changelog record", lambda: len(dedupe_log(settings)) == 1, log)
    finally:
        processes.stop(worker)
    (first_ids,) = clean_ids(settings)
    assert len(first_ids) == 10

    # After the restart: the same samples again (another gateway heard them), then new ones.
    retransmitted = raw(list(range(10)), t0, now + 2_000_000, "gw-b")
    fresh = raw([10, 11, 12], t0, now + 3_000_000, "gw-b")
    asyncio.run(produce(settings, retransmitted, fresh))
    worker = processes.start(settings, "worker", log=log)
    try:
        wait_for("the fresh samples on vitals.clean", lambda: len(clean_ids(settings)) >= 2, log)
        # Old windows expire: a message received RETAIN_WINDOWS windows later pushes the
        # original's window out, and its changelog key gets a tombstone.
        later = now + (RETAIN_WINDOWS + 1) * WINDOW_US
        asyncio.run(produce(settings, raw([13], t0, later, "gw-b")))
        wait_for(
            "a tombstone for the expired window",
            lambda: None in dedupe_log(settings).values(),
            log,
        )
    finally:
        processes.stop(worker)

    clean = clean_ids(settings)
    # Same partition, so in order: the retransmission was processed before `fresh`, and
    # normalize dropped it whole (the sealer never saw it: no record, nor bundled with
    # `fresh`, holds its ids).
    assert [len(ids) for ids in clean] == [10, 3, 1], clean
    all_ids = [rid for ids in clean for rid in ids]
    assert len(set(all_ids)) == len(all_ids) == 14
    # One changelog record per take that brought new ids (none for the retransmission); the
    # two older ones are tombstoned, only the newest window is still live.
    changelog_now = dedupe_log(settings)
    assert sorted(v is None for v in changelog_now.values()) == [False, True, True]
    assert [v for v in changelog_now.values() if v] == [bytes.fromhex(clean[2][0])]
    # ... and Kafka compacts it: the topic keeps the live keys, not the history.
    policy = asyncio.run(cleanup_policy(settings, settings.kafka.topic("vitals.dedupe")))
    assert policy == "compact"
