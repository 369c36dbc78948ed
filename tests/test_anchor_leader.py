"""Three anchor candidates, one leader: kill -9 the leader mid-period, and the next one
anchors on from where it left, with no gap and no double anchor.

Each candidate is a real `vitalproof anchor run` with its own home (its own log and outbox,
as on its own host); they share Kafka, the chain (the session's Anvil) and the contract.
Afterwards the chain's ``Anchored`` events are checked against the shared log replayed from
``vitals.anchor-log``: sizes strictly grow, every root is the log's root at its size, the
last covers every batch once, and the submitter sent exactly one transaction per event.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from anchor.chain import Chain
from anchor.job import ensure_contract
from anchor.leader import LOG_TOPIC, LogReplica
from anchor.log import MerkleLog
from tests.test_anchoring import _sealed_batches
from tests.test_crash_worker import log_tail
from vitalproof.cli import processes
from vitalproof.devstack import ensure_topics
from vitalproof.manifest import BatchManifest
from vitalproof.settings import Settings

pytestmark = pytest.mark.integration

PERIOD_S = 3.0


def produce(settings: Settings, manifests: list[BatchManifest]) -> None:
    async def go() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap, acks="all")
        await producer.start()
        try:
            for m in manifests:
                await producer.send_and_wait(
                    settings.kafka.topic_batches, m.to_json_bytes(), key=m.batch_id.encode()
                )
        finally:
            await producer.stop()

    asyncio.run(go())


def anchored(chain: Chain) -> list[Any]:
    return list(chain.contract.events.Anchored.get_logs(from_block=0))


def wait_for(what: str, cond: Any, within_s: float, logs: list[Path]) -> None:
    deadline = time.monotonic() + within_s
    while not cond():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{log_tail(p, 15)}" for p in logs)
            pytest.fail(f"{what}: not within {within_s:g} s\n{tails}")
        time.sleep(0.2)


@pytest.mark.timeout(180)
def test_a_killed_leader_is_followed_without_gap_or_double_anchor(
    anvil_settings: Settings, tmp_path: Path
) -> None:
    settings = anvil_settings
    ensure_topics(settings, settings.kafka.pipeline_topics, settings.kafka.partitions)
    manifests = _sealed_batches(settings, 9, 2)
    chain = Chain.from_settings(settings)
    ensure_contract(chain, settings.anchor_dir)
    (record,) = settings.anchor_dir.glob("contract-*.json")
    nonce0 = chain.w3.eth.get_transaction_count(chain.account.address)

    # Three "hosts": own home each (log, outbox), the same contract record.
    homes = [tmp_path / f"host-{i}" for i in range(3)]
    logs = [tmp_path / f"anchor-{i}.log" for i in range(3)]
    cands: list[subprocess.Popen[bytes]] = []
    dirs: list[Path] = []
    for home, log in zip(homes, logs, strict=True):
        cs = settings.evolve(paths={"home": home})
        dirs.append(cs.anchor_dir)
        cs.anchor_dir.mkdir(parents=True)
        shutil.copy(record, cs.anchor_dir / record.name)
        period = str(PERIOD_S)
        cands.append(processes.start(cs, "-v", "anchor", "run", "--period", period, log=log))

    def leaders(since: list[int] | None = None) -> list[int]:
        """Candidates that took the lease (after the log offsets ``since``, if given)."""
        start = since or [0] * len(logs)
        return [i for i, p in enumerate(logs) if "anchor lease taken" in p.read_text()[start[i] :]]

    def holder() -> list[int]:
        """Who holds the lease now: its last lease line says taken, not given up (while
        the group forms, the lease may move once from the first joiner to another)."""
        out = []
        for i, p in enumerate(logs):
            text = p.read_text()
            if text.rfind("anchor lease taken") > text.rfind("anchor lease given up"):
                out.append(i)
        return out

    try:
        produce(settings, manifests[:3])
        wait_for("a first anchor", lambda: len(anchored(chain)) >= 1, 60, logs)
        (leader,) = holder()
        # Mid-period: three more batches reach the leader's log, then it dies before its
        # next anchor.
        time.sleep(0.5)
        produce(settings, manifests[3:6])
        wait_for(
            "the leader's log to hold six batches",
            lambda: (dirs[leader] / "log" / "entries.jsonl").read_bytes().count(b"\n") >= 6,
            PERIOD_S,
            logs,
        )
        assert len(anchored(chain)) == 1, "the kill must fall before the leader's next anchor"
        at_kill = [len(p.read_text()) for p in logs]
        os.killpg(cands[leader].pid, signal.SIGKILL)
        cands[leader].wait(10)
        produce(settings, manifests[6:])
        wait_for(
            "the next leader to anchor all nine batches",
            lambda: chain.head().tree_size >= len(manifests),
            60,
            logs,
        )
        survivors = [i for i in range(3) if i != leader]
        for i in survivors:
            assert cands[i].poll() is None, f"candidate {i} died:\n{log_tail(logs[i])}"
        assert [i for i in leaders(at_kill) if i != leader] != [], "no candidate took over"
        time.sleep(PERIOD_S + 1.0)  # one more period: nothing new, nothing sent
    finally:
        for c in cands:
            processes.stop(c)

    # Exactly one candidate led after the kill.
    assert len(leaders(at_kill)) == 1, "two candidates led at once"
    events = anchored(chain)
    sizes = [int(e["args"]["treeSize"]) for e in events]
    assert sizes == sorted(set(sizes)), f"anchored sizes do not strictly grow: {sizes}"
    assert sizes[-1] == len(manifests)
    sent = chain.w3.eth.get_transaction_count(chain.account.address) - nonce0
    assert sent == len(events), f"{sent} transactions for {len(events)} anchors: a double anchor"

    # The shared log, replayed: every anchored root is its root at that size, no gap.
    with MerkleLog(tmp_path / "replayed") as shared:
        replica = LogReplica(settings.kafka.bootstrap, settings.kafka.topic(LOG_TOPIC))
        assert asyncio.run(replica.catch_up(shared)) == len(manifests)
        assert sorted(shared.entry(i).batch_id for i in range(shared.size)) == sorted(
            m.batch_id for m in manifests
        )
        for e in events:
            size = int(e["args"]["treeSize"])
            assert shared.root(size) == bytes(e["args"]["root"]), f"root at size {size} differs"
    # The new leader adopted its predecessor's head: its log knows where that was anchored.
    (successor,) = leaders(at_kill)  # the one that led after the kill (asserted above)
    heads = MerkleLog(dirs[successor] / "log", readonly=True).anchored_heads()
    assert {h.tree_size for h in heads} == set(sizes)
