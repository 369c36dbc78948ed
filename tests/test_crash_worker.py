"""Invariant 1 for the Faust worker: kill -9 it between any two steps, restart it, and every
accepted reading is in exactly one sealed batch, every rejected one in the DLQ.

The worker is a real subprocess on the real Kafka. ``VITALPROOF_CRASH_AT=<point>:<n>`` makes
it SIGKILL itself at the n-th pass through a step boundary (see :mod:`vitalproof.crashpoints`);
the last test kills it from outside at a random moment while the fleet is still publishing.
After the restart (without the variable) the test waits until the worker has consumed and
committed everything, then checks the lake, the manifests, ``vitals.batches`` and the DLQ.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import random
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from device_sims.fleet import Fleet, FleetReport
from device_sims.record import payload_digest, read_records, sent_reading_ids
from streams import lake
from streams.lake.keystore import LocalKeystore
from tests.test_pipeline import collector_running, enroll, stop
from vitalproof.cli import processes
from vitalproof.crashpoints import ENV_VAR, MARKER
from vitalproof.manifest import BatchManifest
from vitalproof.settings import Settings
from vitalproof_verify.merkle import root as merkle_root

pytestmark = pytest.mark.integration

#: ``<point>:<n>``: the second batch dies at the point, so one batch sealed before the crash.
#: ``after_normalize:10`` dies mid-normalize, before any raw offset was committed.
CRASH_POINTS = [
    "before_files:2",
    "after_files:2",
    "after_manifest:2",
    "after_produce:2",
    "after_ack:2",
    "after_normalize:10",
]
FAULTS = "dup=0.05,malformed=0.05"


def crash_settings(settings: Settings) -> Settings:
    # Small takes, so the short run makes several batches and the crash hits a later one.
    return settings.evolve(batching={"max_messages": 8, "max_age_s": 1.0})


def start_worker(
    settings: Settings, log: Path, crash_at: str | None = None
) -> subprocess.Popen[bytes]:
    # Faust's default 60 s session timeout keeps a kill -9'd member in the group for a minute,
    # and the restarted worker waits for it in the rebalance: correct, but too slow for CI.
    env = {"BROKER_SESSION_TIMEOUT": "6.0", "BROKER_HEARTBEAT_INTERVAL": "1.0"}
    if crash_at is not None:
        env[ENV_VAR] = crash_at
    return processes.start(settings, "worker", log=log, env=env, drop_env=(ENV_VAR,))


def log_tail(log: Path, lines: int = 30) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def wait_exit(proc: subprocess.Popen[bytes], within_s: float, log: Path) -> int:
    try:
        return proc.wait(within_s)
    except subprocess.TimeoutExpired:
        stop(proc)
        pytest.fail(
            f"the worker did not reach its crash point within {within_s:g} s; log tail:\n"
            f"{log_tail(log)}"
        )


async def feed(
    settings: Settings,
    creds: list[tuple[str, str]],
    record: Path,
    *,
    duration_s: float,
    devices_rate_hz: float = 2.0,
    seed: int = 11,
) -> FleetReport:
    """Fleet -> in-process collector -> ``vitals.raw``; returns once every message is in Kafka."""
    async with collector_running(settings) as collector:
        fleet = Fleet(
            creds,
            settings.mqtt.host,
            settings.mqtt.port,
            rate_hz=devices_rate_hz,
            duration_s=duration_s,
            faults=FAULTS,
            record_path=record,
            seed=seed,
        )
        report = await fleet.run()
        assert report.ok, report.errors
        for _ in range(300):  # the broker acked every publish; the collector forwards them all
            if collector.stats.acked >= report.messages_sent:
                break
            await asyncio.sleep(0.1)
    stats = collector.stats
    assert stats.acked == report.messages_sent, (
        f"collector acked {stats.acked} of {report.messages_sent} messages"
    )
    return report


# -- reading back what the worker did ---------------------------------------------------------


async def _consume_all(
    settings: Settings, topic: str
) -> list[tuple[bytes, bytes, dict[str, bytes]]]:
    """Every committed record of ``topic`` from the start to its current end (key, value,
    headers). Committed: manifests are produced in transactions (``streams.fence``); one
    that a killed or fenced worker's transaction left aborted was never published."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    out: list[tuple[bytes, bytes, dict[str, bytes]]] = []
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.kafka.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        deadline = time.monotonic() + 30
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic} to its end within 30 s")
            for records in (await consumer.getmany(timeout_ms=500)).values():
                out.extend((r.key or b"", r.value or b"", dict(r.headers)) for r in records)
    finally:
        await consumer.stop()
    return out


async def worker_caught_up(settings: Settings) -> tuple[bool, str]:
    """True once the worker committed ``vitals.raw`` and ``vitals.clean`` to their ends."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap,
        group_id=f"vitalproof-{settings.namespace}",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        lag: list[str] = []
        for topic in (settings.kafka.topic_raw, settings.kafka.topic_clean):
            tps = [TopicPartition(topic, p) for p in range(settings.kafka.partitions)]
            ends = await consumer.end_offsets(tps)
            for tp in tps:
                committed = await consumer.committed(tp) or 0
                if committed < ends[tp]:
                    lag.append(f"{tp.topic}[{tp.partition}] {committed}/{ends[tp]}")
        return not lag, ", ".join(lag)
    finally:
        await consumer.stop()


def manifests(settings: Settings) -> list[BatchManifest]:
    return [
        BatchManifest.model_validate_json(p.read_bytes())
        for p in sorted((settings.lake_dir / lake_batches()).glob("*.json"))
    ]


def lake_batches() -> str:
    from streams.lake.layout import BATCHES_DIR

    return BATCHES_DIR


@dataclass
class LakeView:
    manifests: list[BatchManifest]
    sealed: Counter[str]  # reading id -> times it appears in files that manifests name
    orphan_files: list[str]  # parquet files no manifest names (a crash before the manifest)
    visible: Counter[str]  # reading id -> times a lake reader sees it


def read_lake(settings: Settings) -> LakeView:
    kms = LocalKeystore(settings.paths.keys_dir)
    ms = manifests(settings)
    named = {f.path for m in ms for f in m.files}
    sealed: Counter[str] = Counter()
    visible: Counter[str] = Counter()
    sealed_ids = lake.sealed_batch_ids(settings.lake_dir)
    for patient in sorted({str(kms.patient_of(f.patient)) for m in ms for f in m.files}):
        seen = lake.read_patient(settings.lake_dir, patient, kms, batches=sealed_ids)
        visible.update(lake.hex_ids(seen["reading_id"]).to_pylist())
        table = lake.read_patient(settings.lake_dir, patient, kms)
        batch_ids = table["batch_id"].cast("string").to_pylist()
        ids = lake.hex_ids(table["reading_id"]).to_pylist()
        sealed_batches = {m.batch_id for m in ms}
        sealed.update(rid for rid, b in zip(ids, batch_ids, strict=True) if b in sealed_batches)
    on_disk = {
        str(p.relative_to(settings.lake_dir))
        for p in settings.lake_dir.glob("patient=*/date=*/*.parquet")
    }
    return LakeView(ms, sealed, sorted(on_disk - named), visible)


async def wait_settled(
    settings: Settings, want: set[str], worker: subprocess.Popen[bytes], log: Path, within_s: float
) -> LakeView:
    """Until every wanted id is sealed, every manifest produced and the worker committed all."""
    deadline = time.monotonic() + within_s
    why = "nothing checked yet"
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            pytest.fail(f"the restarted worker died ({worker.returncode}):\n{log_tail(log)}")
        view = read_lake(settings)
        missing = want - set(view.sealed)
        produced = {p.stem for p in (settings.lake_dir / lake_batches()).glob("*.produced")}
        unproduced = [m.batch_id for m in view.manifests if m.batch_id not in produced]
        caught_up, lag = await worker_caught_up(settings)
        if not missing and not unproduced and caught_up:
            return view
        why = (
            f"{len(missing)} of {len(want)} readings not sealed, "
            f"{len(unproduced)} manifests not produced, lag: {lag or 'none'}"
        )
        await asyncio.sleep(1.0)
    pytest.fail(f"the restarted worker did not settle within {within_s:g} s: {why}")


def check_invariant(
    settings: Settings, record: Path, view: LakeView, also_sent: set[str] | None = None
) -> None:
    """Exactly once in the sealed batches, sound manifests, all produced, rejects in the DLQ."""
    sent = sent_reading_ids(record) | (also_sent or set())
    assert sent, "the fleet sent nothing"
    assert len(view.manifests) >= 2, "the run should have made several batches"

    missing = sent - set(view.sealed)
    assert not missing, f"{len(missing)} accepted readings are in no sealed batch"
    twice = {rid: n for rid, n in view.sealed.items() if n > 1}
    assert not twice, (
        f"{len(twice)} readings sealed more than once, e.g. {next(iter(twice.items()))}"
    )
    unknown = set(view.sealed) - sent
    assert not unknown, f"{len(unknown)} sealed readings were never sent"
    # A crash between a batch's files and its manifest leaves files of a batch that never
    # committed (its records are sealed again under another id): readers must not see them.
    assert view.visible == view.sealed, "a lake reader sees other readings than the sealed ones"

    # Every file a manifest names exists, whole, with its recorded hash and row count.
    for m in view.manifests:
        assert m.files, f"manifest {m.batch_id} names no files"
        for f in m.files:
            path = settings.lake_dir / f.path
            assert path.is_file(), f"{m.batch_id}: {f.path} is missing"
            data = path.read_bytes()
            assert hashlib.sha256(data).hexdigest() == f.sha256, f"{f.path}: sha256 differs"
            assert len(data) == f.bytes, f"{f.path}: size differs"
        assert sum(f.rows for f in m.files) == m.rows
        assert m.patient_roots is not None and m.patient_sizes is not None, m.batch_id
        assert merkle_root([bytes.fromhex(r) for r in m.patient_roots]).hex() == (m.merkle_root), (
            f"{m.batch_id}: the Merkle root is not the root over the patients' roots"
        )
        for p, size in zip(m.patients, m.patient_sizes, strict=True):
            assert sum(f.rows for f in m.files if f.patient == p) == size, (m.batch_id, p)
    assert sum(m.rows for m in view.manifests) == sum(view.sealed.values())

    # No offset of any partition is covered by two batches.
    spans: dict[tuple[str, int], list[tuple[int, int, str]]] = {}
    for m in view.manifests:
        for c in m.covers:
            spans.setdefault((c.topic, c.partition), []).append((c.first, c.last, m.batch_id))
    for key, ranges in spans.items():
        ranges.sort()
        for (_, last, a), (first, _, b) in itertools.pairwise(ranges):
            assert first > last, f"{key}: batches {a} and {b} cover overlapping offsets"

    # Every manifest reached vitals.batches (a re-produce after a crash may repeat one).
    produced = asyncio.run(_consume_all(settings, settings.kafka.topic_batches))
    produced_ids = {BatchManifest.model_validate_json(v).batch_id for _, v, _ in produced}
    assert produced_ids == {m.batch_id for m in view.manifests}
    for raw_key, value, _ in produced:
        m = BatchManifest.model_validate_json(value)
        assert raw_key.decode() == m.batch_id
        assert (settings.lake_dir / lake_batches() / f"{m.batch_id}.json").read_bytes() == value, (
            f"{m.batch_id}: the produced manifest differs from the sealed one"
        )

    # Every rejected message is in the DLQ (a replay after the crash may repeat one).
    malformed = {r["digest"] for r in read_records(record) if r["kind"] == "msg" and r["malformed"]}
    assert malformed, "the fault spec should have produced malformed payloads"
    dlq = asyncio.run(_consume_all(settings, settings.kafka.topic_dlq))
    dlq_digests = {payload_digest(v) for _, v, _ in dlq}
    lost = malformed - dlq_digests
    assert not lost, f"{len(lost)} of {len(malformed)} rejected messages are not in the DLQ"
    for _, _, headers in dlq:
        assert headers.get("dlq-reason"), "a DLQ record without a reason"


# -- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_worker_killed_at_a_step_boundary_loses_and_duplicates_nothing(
    kafka_topics: Settings, tmp_path: Path, point: str
) -> None:
    settings = crash_settings(kafka_topics)
    creds = enroll(settings, 5)
    record = tmp_path / "truth.jsonl"
    log = tmp_path / "worker.log"

    # All readings are in vitals.raw before the worker starts: the crash is the only variable.
    report = asyncio.run(feed(settings, creds, record, duration_s=4.0))
    assert report.messages_sent >= 20

    worker = start_worker(settings, log, crash_at=point)
    code = wait_exit(worker, 45, log)
    name = point.partition(":")[0]
    assert code == -signal.SIGKILL, (
        f"worker exited {code}, not by its crash point:\n{log_tail(log)}"
    )
    assert f"{MARKER} {name}" in log.read_text(errors="replace"), "crash point never reached"

    worker = start_worker(settings, log)
    try:
        view = asyncio.run(wait_settled(settings, sent_reading_ids(record), worker, log, 60))
    finally:
        stop(worker)
    check_invariant(settings, record, view)


def test_worker_sigkilled_at_a_random_moment_mid_stream(
    kafka_topics: Settings, tmp_path: Path
) -> None:
    settings = crash_settings(kafka_topics)
    creds = enroll(settings, 6)
    warmup, record = tmp_path / "warmup.jsonl", tmp_path / "truth.jsonl"
    log = tmp_path / "worker.log"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    worker = start_worker(settings, log)
    restarted: list[subprocess.Popen[bytes]] = []

    async def go() -> tuple[float, float]:
        # Warm up until the worker has sealed a batch, so the kill falls inside the main run.
        await feed(settings, creds[:2], warmup, duration_s=1.0, seed=1)
        for _ in range(400):
            if manifests(settings):
                break
            assert worker.poll() is None, f"the worker died:\n{log_tail(log)}"
            await asyncio.sleep(0.1)
        else:
            pytest.fail(f"the worker sealed nothing within 40 s:\n{log_tail(log)}")

        async def killer() -> float:
            await asyncio.sleep(rng.uniform(1.5, 5.0))
            assert worker.poll() is None, f"the worker died by itself:\n{log_tail(log)}"
            os.killpg(worker.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            worker.wait(10)
            await asyncio.sleep(rng.uniform(0.0, 1.0))
            restarted.append(start_worker(settings, log))
            return killed_at

        kill = asyncio.create_task(killer())
        # Fixed fleet (its fault mix includes malformed payloads); the kill moment is random.
        await feed(settings, creds, record, duration_s=8.0, seed=11)
        fleet_done = time.monotonic()
        killed_at = await kill
        want = sent_reading_ids(warmup) | sent_reading_ids(record)
        await wait_settled(settings, want, restarted[0], log, 60)
        return killed_at, fleet_done

    try:
        killed_at, fleet_done = asyncio.run(go())
    finally:
        stop(worker)
        for w in restarted:
            stop(w)
    assert worker.returncode == -signal.SIGKILL
    assert restarted, "the worker was never killed and restarted"
    # The kill must have hit mid-stream: the fleet was still publishing.
    assert killed_at < fleet_done - 1.0, (
        f"the kill came {killed_at - fleet_done:.1f} s after the fleet finished (seed {seed})"
    )
    print(f"seed {seed}: killed {fleet_done - killed_at:.2f} s before the fleet finished")
    check_invariant(settings, record, read_lake(settings), also_sent=sent_reading_ids(warmup))
