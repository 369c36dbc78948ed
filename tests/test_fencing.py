"""A frozen worker, and a frozen anchor leader, resume after they lost what they held: fenced.

SIGSTOP stands for a GC pause or a stopped VM: the process (the worker with its seal
process) keeps its memory, misses the session timeout, and the group gives its partitions
to another member. On SIGCONT it still holds buffered and half-sealed batches of them. The
fences (``streams.fence``, ``anchor.leader``) must keep it from writing a manifest to the
lake or to ``vitals.batches``, and a frozen anchor leader from anchoring; afterwards every
reading is sealed exactly once and every batch published once (real Kafka, real workers).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from anchor.chain import Chain
from anchor.job import ensure_contract
from anchor.leader import LEASE_SESSION_TIMEOUT_MS, LOG_TOPIC, LogReplica
from anchor.log import MerkleLog
from device_sims.record import sent_reading_ids
from tests.test_anchor_leader import anchored, produce, wait_for
from tests.test_anchoring import _sealed_batches
from tests.test_crash_worker import _consume_all, check_invariant, feed, log_tail, read_lake
from tests.test_pipeline import enroll, stop
from tests.test_scale_workers import PARTITIONS, scale_settings, start_worker, wait_settled
from vitalproof.cli import processes
from vitalproof.devstack import ensure_topics
from vitalproof.manifest import BatchManifest
from vitalproof.settings import Settings

pytestmark = pytest.mark.integration

#: How long the frozen process stays stopped: well past the 6 s session timeout the test
#: workers and the anchor lease use, so the group has moved on when it resumes.
FROZEN_S = 14.0
#: The worker freezes when its seal process has written this many manifests (both workers
#: are in the group by then, under load).
FREEZE_AT = 10
WORKER_ARGS = ("worker", "--loglevel", "info")
WORKER_ENV = {"BROKER_SESSION_TIMEOUT": "6.0", "BROKER_HEARTBEAT_INTERVAL": "1.0"}


async def _until(what: str, cond: object, within_s: float, log: Path) -> None:
    deadline = time.monotonic() + within_s
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}: not within {within_s:g} s\n{log_tail(log)}"
        await asyncio.sleep(0.2)


@pytest.mark.timeout(240)
def test_a_frozen_worker_resumes_fenced_and_everything_is_sealed_and_published_once(
    settings: Settings, tmp_path: Path
) -> None:
    settings = scale_settings(settings)
    ensure_topics(settings, settings.kafka.pipeline_topics, PARTITIONS)
    creds = enroll(settings, 12)
    record = tmp_path / "truth.jsonl"
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    workers: list[subprocess.Popen[bytes]] = []
    at_resume = 0

    def text(i: int) -> str:
        return logs[i].read_text(errors="replace")

    async def drill() -> None:
        nonlocal at_resume
        # Worker 0 freezes (with its seal process) at an exact step, under load: its seal
        # process has just written a manifest, which the worker has not published yet.
        workers.append(
            processes.start(
                settings,
                *WORKER_ARGS,
                log=logs[0],
                env=WORKER_ENV | {"VITALPROOF_CRASH_AT": f"after_manifest:{FREEZE_AT}:stop"},
            )
        )
        workers.append(start_worker(settings, logs[1]))
        fleet = asyncio.create_task(feed(settings, creds, record, duration_s=24.0))
        await _until("worker 1 seals", lambda: "sealed b" in text(1), 60, logs[1])
        frozen = f"crashpoint after_manifest ({FREEZE_AT}) stop"
        await _until("worker 0 freezes", lambda: frozen in text(0), 60, logs[0])
        every = [f"('{settings.kafka.topic_clean}', {p})" for p in range(PARTITIONS)]

        def took_over() -> bool:
            # Its newest assignment holds every partition, and it sealed since (worker 0
            # may have frozen before worker 1 joined: then that came with its first one).
            t = text(1)
            last = t.rfind("assigned [")
            line = t[last : t.find("\n", last)]
            return last >= 0 and all(tp in line for tp in every) and "sealed b" in t[last:]

        await _until("worker 1 takes every partition", took_over, FROZEN_S + 20, logs[1])
        await asyncio.sleep(2.0)
        at_resume = len(text(0))
        os.killpg(workers[0].pid, signal.SIGCONT)
        await fleet
        want = sent_reading_ids(record)
        await wait_settled(settings, want, workers, logs, 90)

    try:
        asyncio.run(drill())
    finally:
        for w in workers:
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGCONT)
            stop(w)

    # The zombie tried to publish the manifest it held, and Kafka refused it.
    after = text(0)[at_resume:]
    assert "fenced:" in after and "ProducerFenced" in after, after[-3000:]
    # Between its resumption and its next assignment it published nothing.
    rejoined = after.find("assigned [")
    stale = after if rejoined < 0 else after[:rejoined]
    assert "sealed b" not in stale, f"the stale owner published a batch:\n{stale[-3000:]}"

    view = read_lake(settings)
    check_invariant(settings, record, view)  # 0 lost, 0 duplicated, every offset once
    produced = asyncio.run(_consume_all(settings, settings.kafka.topic_batches))
    counts = Counter(BatchManifest.model_validate_json(v).batch_id for _, v, _ in produced)
    twice = {b: n for b, n in counts.items() if n > 1}
    assert not twice, f"batches published more than once: {twice}"
    assert set(counts) == {m.batch_id for m in view.manifests}


@pytest.mark.timeout(180)
def test_a_frozen_anchor_leader_resumes_fenced_and_never_anchors(
    anvil_settings: Settings, tmp_path: Path
) -> None:
    settings = anvil_settings
    ensure_topics(settings, settings.kafka.pipeline_topics, settings.kafka.partitions)
    manifests = _sealed_batches(settings, 6, 2)
    chain = Chain.from_settings(settings)
    ensure_contract(chain, settings.anchor_dir)
    (contract,) = settings.anchor_dir.glob("contract-*.json")
    nonce0 = chain.w3.eth.get_transaction_count(chain.account.address)
    period = 3.0
    logs = [tmp_path / f"anchor-{i}.log" for i in range(2)]
    dirs: list[Path] = []
    cands: list[subprocess.Popen[bytes]] = []
    for i, log in enumerate(logs):
        cs = settings.evolve(paths={"home": tmp_path / f"host-{i}"})
        dirs.append(cs.anchor_dir)
        cs.anchor_dir.mkdir(parents=True)
        shutil.copy(contract, cs.anchor_dir / contract.name)
        cands.append(processes.start(cs, "-v", "anchor", "run", "--period", str(period), log=log))

    def taken(i: int, since: int = 0) -> bool:
        return "anchor lease taken" in logs[i].read_text()[since:]

    def holds(i: int) -> bool:
        """Its last lease line says taken (the lease may move once while the group forms)."""
        text = logs[i].read_text()
        return text.rfind("anchor lease taken") > text.rfind("anchor lease given up")

    try:
        produce(settings, manifests[:2])
        wait_for("a first anchor", lambda: len(anchored(chain)) >= 1, 60, logs)
        (leader,) = [i for i in (0, 1) if holds(i)]
        other = 1 - leader
        # Entries the leader holds but has not anchored yet, then it freezes mid-period.
        produce(settings, manifests[2:4])
        wait_for(
            "the leader's log to hold four batches",
            lambda: (dirs[leader] / "log" / "entries.jsonl").read_bytes().count(b"\n") >= 4,
            15.0,
            logs,
        )
        mark = len(logs[other].read_text())
        os.killpg(cands[leader].pid, signal.SIGSTOP)
        wait_for(
            "the other candidate to lead",
            lambda: taken(other, mark),
            LEASE_SESSION_TIMEOUT_MS / 1000 + 30,
            logs,
        )
        produce(settings, manifests[4:])
        wait_for("the new leader to anchor all six", lambda: chain.head().tree_size >= 6, 60, logs)
        resumed_at = len(logs[leader].read_text())
        os.killpg(cands[leader].pid, signal.SIGCONT)
        time.sleep(2 * period + 1.0)  # the resumed one had its period due: it must not anchor
        for c in cands:
            assert c.poll() is None, f"a candidate died:\n{log_tail(logs[cands.index(c)])}"
    finally:
        for c in cands:
            if c.poll() is None:
                os.killpg(c.pid, signal.SIGCONT)
            processes.stop(c)

    # Resumed, it learnt it had lost the lease (from a fence or the group), and it anchored
    # nothing before it led again, if it did.
    after = logs[leader].read_text()[resumed_at:]
    assert "anchor lease lost" in after or "anchor lease given up" in after, after[-3000:]
    term = after.find("anchor lease taken")
    assert "anchored size" not in (after if term < 0 else after[:term]), after[-3000:]
    events = anchored(chain)
    sizes = [int(e["args"]["treeSize"]) for e in events]
    assert sizes == sorted(set(sizes)) and sizes[-1] == len(manifests), sizes
    sent = chain.w3.eth.get_transaction_count(chain.account.address) - nonce0
    assert sent == len(events), f"{sent} transactions for {len(events)} anchors"
    with MerkleLog(tmp_path / "replayed") as shared:
        replica = LogReplica(settings.kafka.bootstrap, settings.kafka.topic(LOG_TOPIC))
        assert asyncio.run(replica.catch_up(shared)) == len(manifests), "an entry twice, or lost"
        for e in events:
            assert shared.root(int(e["args"]["treeSize"])) == bytes(e["args"]["root"])
