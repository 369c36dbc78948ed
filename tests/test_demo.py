"""The main job, as a user runs it: `vitalproof demo ... --json`, on both chains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vitalproof.devstack import PartStatus
from vitalproof.settings import Settings

pytestmark = pytest.mark.integration


def run_demo(
    settings: Settings, *args: str, cwd: Path | None = None
) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "vitalproof", "demo", "--json", *args],
        env=os.environ | settings.child_env(settings.paths.home / "secrets"),
        capture_output=True,
        timeout=400,
        cwd=cwd,
    )
    stdout = proc.stdout.decode()
    last = stdout.strip().splitlines()[-1] if stdout.strip() else "{}"
    return proc.returncode, json.loads(last), proc.stderr.decode()


@pytest.mark.parametrize("chain", ["embedded", "anvil"])
def test_demo_seals_every_reading_and_verifies_proofs(
    settings: Settings, anvil: PartStatus, chain: str, tmp_path: Path
) -> None:
    code, summary, stderr = run_demo(
        settings, "--devices", "6", "--duration", "8", "--chain", chain, cwd=tmp_path
    )
    assert code == 0, stderr[-3000:]
    assert summary["chain"] == chain
    assert summary["readings_sent"] > 0
    assert summary["readings_sealed"] == summary["readings_sent"]
    assert summary["readings_in_kafka"] == summary["readings_sent"]
    assert summary["missing"] == 0
    assert summary["batches"] >= 1 and summary["anchors"] >= 1
    assert len(summary["anchor_txs"]) == summary["anchors"]
    assert summary["proofs_verified"] >= 1 and summary["proofs_failed"] == 0
    # Two clinicians watched live: each got exactly what their consent covers of what was
    # sealed (checked reading by reading in the demo), and every grant, subscription and
    # delivery is in the audit log.
    assert summary["subscribers"] == 2
    assert summary["deliveries_unexpected"] == 0 and summary["deliveries_missing"] == 0
    assert 0 < summary["readings_delivered"] <= summary["readings_sealed"]
    assert summary["deliveries_refused"] > 0  # each clinician's other patients, withheld
    assert summary["audit_records"] >= 6 + 2  # a grant per patient, a subscription each
    assert summary["audit_checkpoints_anchored"] >= 1  # the audit log's head is on chain
    assert "readings sealed" in stderr
    # The commands it prints to try next work exactly as printed, in a shell with nothing of
    # the test's environment: stats, one patient's data, one reading's proof, its check.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VITALPROOF_")}
    outputs = []
    for command in summary["next_commands"]:
        assert command in stderr
        done = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=clean, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, f"{command}\n{done.stderr}"
        outputs.append(done.stdout + done.stderr)
    assert f"{summary['readings_sealed']:>14,}" in outputs[0]  # lake stats: its readings
    assert (tmp_path / "bundle.json").exists() and outputs[-1].startswith("OK")
    if chain == "anvil":
        assert "checked offline only" not in outputs[-1], (
            "the rich summary goes to stderr in --json mode"
        )


def test_verify_cli_reports_the_failing_check(settings: Settings, tmp_path) -> None:
    """A bundle with a changed value fails `vitalproof verify` with 'wrong leaf', exit 1."""
    from anchor.bundles import build_bundle
    from anchor.chain import Chain
    from anchor.log import MerkleLog
    from vitalproof_verify.leaves import canonical_reading_bytes, leaf_hash_salted
    from vitalproof_verify.merkle import MerkleTree

    reading = {
        "reading_id": "r1",
        "device_id": "d1",
        "patient_id": "p1",
        "metric": "heart_rate",
        "value": 61.0,
        "unit": "/min",
        "device_time_us": 1,
        "seq": 1,
        "quality": 0,
    }
    salt = bytes(32)
    leaves = [leaf_hash_salted(salt, canonical_reading_bytes(**reading)), bytes(range(32))]
    tree = MerkleTree(leaves)
    log = MerkleLog(tmp_path / "log")
    log.append("b1", tree.root(), tree.size)
    chain = Chain.embedded()
    chain.deploy()
    receipt = chain.submit_anchor(log.root(), log.size)
    log.record_anchor(log.size, log.root(), receipt.to_json_dict())
    bundle = build_bundle(
        reading=reading, salt=salt, batch_id="b1", batch=tree, leaf_index=0, log=log
    )
    log.close()
    good = tmp_path / "good.json"
    good.write_bytes(bundle.to_json())
    doc = json.loads(bundle.to_json())
    doc["reading"]["value"] = 62.0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))

    def verify(path: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vitalproof", "verify", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    ok = verify(good)
    assert ok.returncode == 0, ok.stderr
    assert "offline only" in ok.stdout
    failed = verify(bad)
    assert failed.returncode == 1
    assert failed.stderr.startswith(f"FAILED {bad}: wrong leaf")
    missing = verify(tmp_path / "nope.json")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
