"""The anchor job waits out its chain: a real `vitalproof anchor run` while the session's
Anvil is stopped and started again. It does not exit, says once that the chain is away
(and where: the RPC URL) and once that it is back, and anchors what arrived meanwhile
afterwards: each head once, one transaction per anchor (the drill's ``kill-anvil`` used to
see it exit with web3's ConnectionError; docs/reliability.md)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from anchor.chain import Chain
from anchor.job import AnchorJob, ensure_contract
from tests.test_anchor_leader import anchored, produce, wait_for
from tests.test_anchoring import _sealed_batches
from tests.test_crash_worker import log_tail
from vitalproof.cli import processes
from vitalproof.devstack import StackManager, ensure_topics
from vitalproof.devstack.procs import free_ports
from vitalproof.settings import ChainSettings, PathSettings, Settings


@pytest.mark.integration
@pytest.mark.timeout(150)
def test_the_anchor_job_waits_for_a_stopped_chain_and_then_anchors_once(
    anvil_settings: Settings, stack: StackManager
) -> None:
    settings = anvil_settings
    ensure_topics(settings, settings.kafka.pipeline_topics, settings.kafka.partitions)
    manifests = _sealed_batches(settings, 6, 2)
    chain = Chain.from_settings(settings)
    ensure_contract(chain, settings.anchor_dir)
    nonce0 = chain.w3.eth.get_transaction_count(chain.account.address)
    before = len(anchored(chain))
    anvil = StackManager(stack.settings)
    log = settings.paths.home / "anchor.log"
    job = processes.start(
        settings, "anchor", "run", "--period", "1", log=log,
        env={"VITALPROOF_RETRY_MIN_S": "0.5", "VITALPROOF_RETRY_MAX_S": "2"},
    )  # fmt: skip
    try:
        produce(settings, manifests[:3])
        wait_for("a first anchor", lambda: chain.head().tree_size == 3, 60, [log])
        anvil.stop("anvil")  # its chain is dumped and comes back with it
        try:
            produce(settings, manifests[3:])  # consumed and logged while the chain is away
            time.sleep(6.0)  # several anchor ticks, each refused by a node that is not there
            assert job.poll() is None, f"the anchor job exited:\n{log_tail(log, 20)}"
        finally:
            anvil.start("anvil")
        wait_for("the batches of the outage anchored", lambda: chain.head().tree_size == 6,
                 60, [log])  # fmt: skip
        time.sleep(2.5)  # two more periods: nothing new, nothing sent
        assert job.poll() is None, f"the anchor job exited:\n{log_tail(log, 20)}"
    finally:
        processes.stop(job, grace_s=15)
    events = anchored(chain)[before:]
    sizes = [int(e["args"]["treeSize"]) for e in events]
    assert sizes == [3, 6], sizes  # each head once, none skipped, none twice
    sent = chain.w3.eth.get_transaction_count(chain.account.address) - nonce0
    assert sent == len(events), f"{sent} transactions for {len(events)} anchors"
    text = log.read_text()
    away = [ln for ln in text.splitlines() if "anchor job: chain" in ln and "retrying" in ln]
    back = [ln for ln in text.splitlines() if "anchor job: chain" in ln and "back after" in ln]
    assert len(away) == 1 and len(back) == 1, text[-3000:]  # one line per change, not per try
    assert settings.chain.rpc_url is not None and settings.chain.rpc_url in away[0], away[0]
    assert "Traceback" not in text, text[-3000:]


def test_an_anchor_job_started_while_its_chain_is_away_waits_for_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"  # nobody listens here
    settings = Settings(
        paths=PathSettings(home=tmp_path), chain=ChainSettings(kind="anvil", rpc_url=url)
    )
    pauses: list[float] = []

    def sleep(s: float) -> None:
        pauses.append(s)
        if len(pauses) == 4:
            raise GaveUp

    with caplog.at_level(logging.INFO, logger="anchor.job"), pytest.raises(GaveUp):
        AnchorJob.connect(settings, sleep=sleep)
    assert pauses == [1.0, 2.0, 4.0, 8.0]  # the default backoff
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and f"chain at {url}: unreachable (ConnectionError" in lines[0], lines
    assert not (tmp_path / "anchor").exists() or not any((tmp_path / "anchor").rglob("*.lock"))


class GaveUp(Exception):
    pass
