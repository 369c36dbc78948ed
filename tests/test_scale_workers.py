"""Several `vitalproof worker` processes in one consumer group, while the group changes shape.

Invariants 1 and 2 with partitions moving between workers: on the real Kafka, 6 partitions,
a fleet publishing the whole time, the group goes 1 -> 3 workers, one is stopped (3 -> 2),
one is SIGKILLed (2 -> 1) and a replacement joins (1 -> 2). Afterwards every accepted reading
is in exactly one sealed batch, every batch covers one partition and is named by the offsets
it covers, no batch is in ``vitals.batches`` twice (no two workers, nor one worker twice,
published it) and no offset is covered twice: what a worker sealed from a partition was
known to the worker that took the partition over.
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

from device_sims.record import sent_reading_ids
from tests.test_crash_worker import (
    LakeView,
    _consume_all,
    check_invariant,
    feed,
    lake_batches,
    log_tail,
    read_lake,
    worker_caught_up,
)
from tests.test_pipeline import enroll, stop
from vitalproof.cli import processes
from vitalproof.devstack import ensure_topics
from vitalproof.manifest import BatchManifest, batch_id_for
from vitalproof.settings import Settings

pytestmark = pytest.mark.integration

PARTITIONS = 6


def scale_settings(settings: Settings) -> Settings:
    # Small batches and short windows: many batches, so every rebalance cuts through some.
    return settings.evolve(
        kafka={"partitions": PARTITIONS}, batching={"max_messages": 16, "max_age_s": 1.0}
    )


def start_worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    # A kill -9'd member leaves the group after the session timeout: 6 s, not Faust's 60.
    env = {"BROKER_SESSION_TIMEOUT": "6.0", "BROKER_HEARTBEAT_INTERVAL": "1.0"}
    return processes.start(settings, "worker", "--loglevel", "info", log=log, env=env)


async def wait_settled(
    settings: Settings,
    want: set[str],
    workers: list[subprocess.Popen[bytes]],
    logs: list[Path],
    within_s: float,
) -> LakeView:
    """Until every wanted id is sealed, every manifest produced and the group committed all."""
    deadline = time.monotonic() + within_s
    why = "nothing checked yet"
    while time.monotonic() < deadline:
        for w, log in zip(workers, logs, strict=True):
            if w.poll() is not None:
                pytest.fail(f"a worker died ({w.returncode}):\n{log_tail(log)}")
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
    pytest.fail(f"the group did not settle within {within_s:g} s: {why}")


@pytest.mark.timeout(240)
def test_workers_join_leave_and_die_under_load_and_seal_everything_once(
    settings: Settings, tmp_path: Path
) -> None:
    settings = scale_settings(settings)
    ensure_topics(settings, settings.kafka.pipeline_topics, PARTITIONS)
    creds = enroll(settings, 12)
    record = tmp_path / "truth.jsonl"
    logs = [tmp_path / f"worker-{i}.log" for i in range(4)]
    workers: list[subprocess.Popen[bytes]] = []
    alive: list[int] = []

    def start(i: int) -> None:
        workers.append(start_worker(settings, logs[i]))
        alive.append(i)

    async def sealing(i: int, within_s: float = 60.0, what: str = "sealed b") -> None:
        """Until worker ``i`` has sealed a batch (so it holds partitions now)."""
        deadline = time.monotonic() + within_s
        while what not in logs[i].read_text(errors="replace"):
            assert workers[i].poll() is None, f"worker {i} died:\n{log_tail(logs[i])}"
            assert time.monotonic() < deadline, f"worker {i} sealed nothing:\n{log_tail(logs[i])}"
            await asyncio.sleep(0.2)

    async def drill() -> None:
        start(0)
        fleet = asyncio.create_task(feed(settings, creds, record, duration_s=24.0))
        await sealing(0)
        start(1)
        start(2)  # 1 -> 3
        await asyncio.gather(sealing(1), sealing(2))
        stop(workers[2])  # 3 -> 2: a clean leave (SIGTERM), mid-stream
        alive.remove(2)
        await asyncio.sleep(1.0)
        assert not fleet.done(), "the fleet stopped before the crash"
        assert workers[1].poll() is None, f"worker 1 died:\n{log_tail(logs[1])}"
        os.killpg(workers[1].pid, signal.SIGKILL)  # 2 -> 1: a crash, mid-stream
        workers[1].wait(10)
        alive.remove(1)
        start(3)  # 1 -> 2
        await fleet
        await sealing(3, what=f"assigned [('{settings.kafka.topic_clean}'")
        want = sent_reading_ids(record)
        await wait_settled(
            settings, want, [workers[i] for i in alive], [logs[i] for i in alive], 90
        )

    try:
        asyncio.run(drill())
    finally:
        for w in workers:
            stop(w)
    assert workers[1].returncode == -signal.SIGKILL

    view = read_lake(settings)
    # 0 lost, 0 duplicated, sound manifests, every offset covered once, rejects in the DLQ.
    check_invariant(settings, record, view)
    for m in view.manifests:
        assert len(m.covers) == 1, f"{m.batch_id} covers several partitions: {m.covers}"
        assert m.batch_id == batch_id_for(m.covers), f"{m.batch_id} is not named by its offsets"
    produced = asyncio.run(_consume_all(settings, settings.kafka.topic_batches))
    counts = Counter(BatchManifest.model_validate_json(v).batch_id for _, v, _ in produced)
    twice = {b: n for b, n in counts.items() if n > 1}
    assert not twice, f"batches published more than once: {twice}"
    # The partitions really moved: each worker sealed, and several sealed the same partition.
    sealers: dict[int, set[int]] = {}
    for i in (0, 1, 2, 3):
        text = logs[i].read_text(errors="replace")
        sealed = {m.batch_id for m in view.manifests if f"sealed {m.batch_id}" in text}
        sealers[i] = {m.covers[0].partition for m in view.manifests if m.batch_id in sealed}
    shared = [p for p in range(PARTITIONS) if sum(p in s for s in sealers.values()) > 1]
    assert shared, f"no partition moved between workers: {sealers}"
