"""End to end on the real Kafka and Mosquitto: fleet -> collector -> Faust -> sealed lake.

The Faust worker runs as a real subprocess (`vitalproof worker`), exactly as deployed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from device_sims.fleet import Fleet
from device_sims.record import read_records, sent_reading_ids
from ingest.mqtt.collector import CollectorError, MqttCollector, MqttCredentials
from streams import lake
from streams.lake.keystore import LocalKeystore
from vitalproof.cli import processes
from vitalproof.devstack import collector_credentials, set_device_credentials
from vitalproof.manifest import BatchManifest
from vitalproof.registry import Registry
from vitalproof.settings import Settings

pytestmark = pytest.mark.integration


def enroll(settings: Settings, n: int, prefix: str = "dev") -> list[tuple[str, str]]:
    registry = Registry(settings.paths.registry_path)
    creds = [
        (f"{prefix}-{i}", registry.enroll(f"{prefix}-{i}", f"pat-{i}").mqtt_password)
        for i in range(n)
    ]
    set_device_credentials(settings, dict(creds))
    return creds


def start_worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    return processes.start(settings, "worker", log=log)


stop = processes.stop


@contextlib.asynccontextmanager
async def collector_running(settings: Settings) -> AsyncIterator[MqttCollector]:
    """An in-process MQTT collector, subscribed before the body runs; stopped after it."""
    user, password = collector_credentials(settings)
    collector = MqttCollector(settings, MqttCredentials(user, password, settings.mqtt.tls_ca))
    stop_event = asyncio.Event()
    task = asyncio.create_task(collector.run(stop=stop_event))
    await asyncio.wait_for(collector.subscribed.wait(), 30)
    try:
        yield collector
    finally:
        stop_event.set()
        await task


def sealed_ids(settings: Settings) -> list[str]:
    kms = LocalKeystore(settings.paths.keys_dir)
    manifests = [
        BatchManifest.model_validate_json(p.read_bytes())
        for p in (settings.lake_dir / "_batches").glob("*.json")
    ]
    ids: list[str] = []
    pseudonyms = {p for m in manifests for p in m.patients}  # the keystore maps them back
    for patient in sorted(str(kms.patient_of(h)) for h in pseudonyms):
        table = lake.read_patient(
            settings.lake_dir, patient, kms, batches=lake.sealed_batch_ids(settings.lake_dir)
        )
        ids.extend(lake.hex_ids(table["reading_id"]).to_pylist())
    return ids


async def wait_sealed(settings: Settings, want: set[str], within_s: float) -> list[str]:
    deadline = time.monotonic() + within_s
    ids: list[str] = []
    while time.monotonic() < deadline:
        ids = sealed_ids(settings)
        if want <= set(ids):
            return ids
        await asyncio.sleep(1.0)
    return ids


async def dlq_records(settings: Settings) -> list[tuple[dict[str, bytes], bytes]]:
    consumer = AIOKafkaConsumer(
        settings.kafka.topic_dlq,
        bootstrap_servers=settings.kafka.bootstrap,
        auto_offset_reset="earliest",
        group_id=None,
    )
    await consumer.start()
    out = []
    try:
        while batches := await consumer.getmany(timeout_ms=2000):
            for records in batches.values():
                out.extend((dict(r.headers), r.value or b"") for r in records)
    finally:
        await consumer.stop()
    return out


def test_fleet_to_sealed_lake_loses_nothing_and_dlqs_malformed(
    kafka_topics: Settings, tmp_path: Path
) -> None:
    settings = kafka_topics.evolve(batching={"max_age_s": 1.5})
    creds = enroll(settings, 8)
    record = tmp_path / "truth.jsonl"
    worker = start_worker(settings, tmp_path / "worker.log")
    try:

        async def go() -> tuple[list[str], list[tuple[dict[str, bytes], bytes]]]:
            async with collector_running(settings) as collector:
                fleet = Fleet(
                    creds,
                    settings.mqtt.host,
                    settings.mqtt.port,
                    rate_hz=2.0,
                    duration_s=4.0,
                    faults="dup=0.1,reorder=0.1,malformed=0.1",
                    record_path=record,
                    seed=7,
                )
                report = await fleet.run()
                assert report.ok, report.errors
                ids = await wait_sealed(settings, sent_reading_ids(record), within_s=90)
            stats = collector.stats
            assert stats.acked == stats.received == report.messages_sent
            return ids, await dlq_records(settings)

        ids, dlq = asyncio.run(go())
    finally:
        stop(worker)
    sent = sent_reading_ids(record)
    assert sent, "the fleet sent nothing"
    assert sent <= set(ids), f"{len(sent - set(ids))} sent readings missing from the lake"
    assert len(ids) == len(set(ids)), "a reading was sealed twice"
    malformed = [r for r in read_records(record) if r["kind"] == "msg" and r["malformed"]]
    assert malformed, "the fault spec should have produced malformed payloads"
    assert len(dlq) == len(malformed)
    for headers, value in dlq:
        assert headers["dlq-reason"] and headers["dlq-stage"] == b"normalize"
        assert headers["device-id"].decode() in dict(creds)
        assert value, "the DLQ keeps the original bytes"


def test_unknown_device_goes_to_dlq_with_reason(kafka_topics: Settings, tmp_path: Path) -> None:
    """A device with broker credentials but no registry entry: rejected, never dropped."""
    settings = kafka_topics.evolve(batching={"max_age_s": 1.0})
    set_device_credentials(settings, {"ghost-1": "pw-ghost-1-secret"})
    worker = start_worker(settings, tmp_path / "worker.log")
    try:

        async def go() -> list[tuple[dict[str, bytes], bytes]]:
            user, password = collector_credentials(settings)
            collector = MqttCollector(
                settings, MqttCredentials(user, password, settings.mqtt.tls_ca)
            )
            task = asyncio.create_task(collector.run(max_messages=2, duration_s=60))
            await asyncio.wait_for(collector.subscribed.wait(), 30)
            fleet = Fleet(
                [("ghost-1", "pw-ghost-1-secret")],
                settings.mqtt.host,
                settings.mqtt.port,
                rate_hz=1.0,
                duration_s=2.0,
            )
            await fleet.run()
            await task
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                records = await dlq_records(settings)
                if records:
                    return records
            return []

        records = asyncio.run(go())
    finally:
        stop(worker)
    assert records, "nothing reached the DLQ"
    assert all(h["dlq-reason"] == b"unknown device ghost-1" for h, _ in records)
    assert all(json.loads(v)["schema"] == 1 for _, v in records)


def test_collector_fails_loudly_without_a_broker(settings: Settings) -> None:
    from vitalproof.devstack.procs import free_ports

    (port,) = free_ports(1)
    dead = settings.evolve(mqtt={"port": port})
    collector = MqttCollector(dead, MqttCredentials("collector", "x"))
    with pytest.raises(CollectorError, match=f"cannot reach MQTT broker 127.0.0.1:{port}"):
        asyncio.run(collector.run(duration_s=5))


def test_dropped_messages_become_gap_events(kafka_topics: Settings, tmp_path: Path) -> None:
    """Messages the device numbered but never delivered show up on vitals.events as gaps."""
    settings = kafka_topics.evolve(batching={"max_age_s": 1.0})
    creds = enroll(settings, 4, prefix="gapdev")
    record = tmp_path / "truth.jsonl"
    worker = start_worker(settings, tmp_path / "worker.log")
    try:

        async def go() -> list[dict[str, object]]:
            async with collector_running(settings):
                fleet = Fleet(
                    creds,
                    settings.mqtt.host,
                    settings.mqtt.port,
                    rate_hz=2.0,
                    duration_s=4.0,
                    faults="drop=0.3",
                    record_path=record,
                    seed=11,
                )
                await fleet.run()
                await wait_sealed(settings, sent_reading_ids(record), within_s=90)
            consumer = AIOKafkaConsumer(
                settings.kafka.topic_events,
                bootstrap_servers=settings.kafka.bootstrap,
                auto_offset_reset="earliest",
                group_id=None,
            )
            await consumer.start()
            out: list[dict[str, object]] = []
            try:
                while batches := await consumer.getmany(timeout_ms=2000):
                    for records in batches.values():
                        out.extend(json.loads(r.value or b"{}") for r in records)
            finally:
                await consumer.stop()
            return out

        events = asyncio.run(go())
    finally:
        stop(worker)
    drops = [r for r in read_records(record) if r["kind"] == "drop"]
    assert drops, "the fault spec should have dropped messages"
    lost = sum(len(r["reading_ids"]) for r in drops)
    gaps = [e for e in events if e["kind"] == "gap"]
    assert gaps, "no gap event for dropped messages"
    assert {e["device_id"] for e in gaps} <= {d for d, _ in creds}
    assert 0 < sum(int(e["missing"]) for e in gaps) <= lost  # type: ignore[call-overload]
