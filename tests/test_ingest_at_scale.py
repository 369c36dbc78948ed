"""The ingestion issue's acceptance run, on the real Mosquitto and Kafka: 1,000 simulated MQTT
devices for 60 s with 1 % duplicates, 1 % reordering and some malformed payloads; the
collector (a real ``vitalproof collect`` subprocess) is SIGKILLed in the middle and
restarted; the worker (``vitalproof worker``) normalizes and deduplicates.

After the run every distinct reading id the fleet sent is on ``vitals.clean`` exactly once
(normalize's changelogged dedupe dropped the duplicates and the collector's redeliveries),
and every malformed payload is on ``vitals.dlq`` with its reason and original bytes.
``VITALPROOF_SCALE_DEVICES`` / ``VITALPROOF_SCALE_SECONDS`` shrink it for a quick local look;
CI runs the full size.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from device_sims.fleet import Fleet
from device_sims.record import payload_digest, read_records, sent_reading_ids
from tests.taps import RawTap
from tests.test_crash_collector import (
    PROBE,
    log_tail,
    start_collector,
    wait_collector_ready,
)
from tests.test_pipeline import dlq_records, enroll, start_worker, stop
from vitalproof.settings import Settings
from vitalproof.wire import clean

pytestmark = pytest.mark.integration

DEVICES = int(os.environ.get("VITALPROOF_SCALE_DEVICES", "1000"))
SECONDS = float(os.environ.get("VITALPROOF_SCALE_SECONDS", "60"))
FAULTS = "dup=0.01,reorder=0.01,malformed=0.002"
SEED = 31  # fixed: the kill moment is what varies between runs


async def clean_reading_ids(settings: Settings) -> Counter[str]:
    """Every reading id on ``vitals.clean``, with how often it appears."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap, group_id=None)
    await consumer.start()
    counts: Counter[str] = Counter()
    try:
        tps = [
            TopicPartition(settings.kafka.topic_clean, p) for p in range(settings.kafka.partitions)
        ]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                for r in records:
                    for batch in clean.decode_record(r.value or b""):
                        counts.update(batch.reading_id)
    finally:
        await consumer.stop()
    return counts


def test_fleet_of_1000_with_a_collector_kill_loses_nothing(
    kafka_topics: Settings, tmp_path: Path
) -> None:
    settings = kafka_topics
    creds = enroll(settings, DEVICES)
    ((_, probe_password),) = enroll(settings, 1, prefix=PROBE)
    record = tmp_path / "truth.jsonl"
    collector_log = tmp_path / "collector.log"
    worker = start_worker(settings, tmp_path / "worker.log")
    collectors: list[subprocess.Popen[bytes]] = [start_collector(settings, collector_log)]

    async def go() -> tuple[int, int, Counter[str]]:
        tap = RawTap(settings)
        await tap.start()
        try:
            await wait_collector_ready(settings, tap, probe_password, collectors[0], collector_log)
            fleet = Fleet(
                creds,
                settings.mqtt.host,
                settings.mqtt.port,
                rate_hz=1.0,
                duration_s=SECONDS,
                faults=FAULTS,
                record_path=record,
                seed=SEED,
            )
            run = asyncio.create_task(fleet.run())
            # The kill falls once the whole fleet is connected and publishing.
            for _ in range(600):
                if tap.count("dev-") >= DEVICES * 3 or run.done():
                    break
                await asyncio.sleep(0.2)
            await asyncio.sleep(SECONDS / 6)
            assert not run.done(), "the fleet finished before the kill"
            assert collectors[0].poll() is None, log_tail(collector_log)
            forwarded_before_kill = tap.count("dev-")
            os.killpg(collectors[0].pid, signal.SIGKILL)
            assert collectors[0].wait(10) == -signal.SIGKILL
            await asyncio.sleep(2.0)  # down a while: the broker queues for the session
            assert not run.done(), "the fleet finished while the collector was down"
            collectors.append(start_collector(settings, collector_log))
            report = await run
            assert report.ok, report.errors
            sent = sent_reading_ids(record)
            deadline = time.monotonic() + 180
            clean: Counter[str] = Counter()
            while time.monotonic() < deadline:
                if collectors[1].poll() is not None:
                    pytest.fail(f"the restarted collector exited:\n{log_tail(collector_log)}")
                if worker.poll() is not None:
                    pytest.fail(f"the worker exited with {worker.returncode}")
                clean = await clean_reading_ids(settings)
                if sent <= clean.keys():
                    break
                await asyncio.sleep(2.0)
            return forwarded_before_kill, report.messages_sent, clean
        finally:
            await tap.stop()

    try:
        forwarded_before_kill, messages_sent, clean = asyncio.run(go())
        dlq = asyncio.run(dlq_records(settings))
    finally:
        for p in collectors:
            stop(p)
        stop(worker)

    sent = sent_reading_ids(record)
    assert len(sent) >= DEVICES * SECONDS, "the fleet sent too little to mean anything"
    assert 0 < forwarded_before_kill < messages_sent, "the kill should fall mid-run"
    missing = sent - clean.keys()
    assert not missing, f"{len(missing)} of {len(sent)} sent readings never reached vitals.clean"
    twice = [rid for rid, n in clean.items() if n > 1]
    assert not twice, f"{len(twice)} readings on vitals.clean more than once (dedupe failed)"

    messages = [r for r in read_records(record) if r["kind"] == "msg"]
    assert sum(r.get("duplicate", False) for r in messages) > 0, "no duplicates were sent"
    malformed = {r["digest"] for r in messages if r["malformed"]}
    assert malformed, "the fault spec should have produced malformed payloads"
    normalize_dlq = [(h, v) for h, v in dlq if h.get("dlq-stage") == b"normalize"]
    assert all(h["dlq-reason"] for h, _ in normalize_dlq), "a DLQ record without a reason"
    # Each malformed payload is in the DLQ with its original bytes (a redelivery after the
    # kill may put one there twice; none may be missing).
    assert malformed <= {payload_digest(v) for _, v in normalize_dlq}
