"""kill -9 of the anchor job between signing and sending: the restart sends that nonce once."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys

import pytest
from aiokafka import AIOKafkaProducer
from web3 import Web3

from anchor.chain import load_artifact
from tests.test_anchoring import _sealed_batches
from vitalproof.crashpoints import CRASH_EXIT_CODE, MARKER
from vitalproof.devstack import ensure_topics
from vitalproof.settings import Settings

pytestmark = pytest.mark.integration


def anchor_once(
    settings: Settings, crash_at: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = os.environ | settings.child_env(settings.paths.home / "secrets")
    env.pop("VITALPROOF_CRASH_AT", None)
    if crash_at:
        env["VITALPROOF_CRASH_AT"] = crash_at
    return subprocess.run(
        [sys.executable, "-m", "vitalproof", "anchor", "run", "--once"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_kill_between_sign_and_send_sends_the_nonce_once(anvil_settings: Settings) -> None:
    settings = anvil_settings
    ensure_topics(settings, settings.kafka.pipeline_topics, settings.kafka.partitions)
    manifests = _sealed_batches(settings, 3, 2)

    async def produce() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap, acks="all")
        await producer.start()
        try:
            for m in manifests:
                await producer.send_and_wait(settings.kafka.topic_batches, m.to_json_bytes())
        finally:
            await producer.stop()

    asyncio.run(produce())
    crashed = anchor_once(settings, "anchor_after_sign")
    assert crashed.returncode in (-9, CRASH_EXIT_CODE), crashed.stderr[-2000:]
    assert f"{MARKER} anchor_after_sign" in crashed.stderr

    (outbox,) = (settings.anchor_dir / "outbox").glob("*/outbox.sqlite3")
    with sqlite3.connect(outbox) as db:
        ((nonce, signed_hash, state),) = db.execute(
            "SELECT nonce, tx_hash, state FROM anchors"
        ).fetchall()
    assert state == "PENDING"
    w3 = Web3(Web3.HTTPProvider(settings.chain.rpc_url))
    contract = json.loads(next(settings.anchor_dir.glob("contract-*.json")).read_text())["address"]
    abi = load_artifact()["abi"]
    events = w3.eth.contract(address=contract, abi=abi).events.Anchored
    assert events.get_logs(from_block=0) == [], "nothing may reach the chain before the send"

    again = anchor_once(settings)
    assert again.returncode == 0, again.stderr[-2000:]
    logs = events.get_logs(from_block=0)
    assert len(logs) == 1, "the restart must send the signed anchor exactly once"
    assert logs[0]["transactionHash"].to_0x_hex() == signed_hash
    tx = w3.eth.get_transaction(signed_hash)
    assert tx["nonce"] == nonce
    assert logs[0]["args"]["treeSize"] == len(manifests)
    third = anchor_once(settings)
    assert third.returncode == 0 and json.loads(third.stdout.strip().splitlines()[-1]) is None
    assert len(events.get_logs(from_block=0)) == 1, "nothing new: no second transaction"
