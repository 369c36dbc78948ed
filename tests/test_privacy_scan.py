"""Invariant 3, checked the way an outsider would after a real demo run: nothing on the chain
(calldata, event logs, contract storage) and nothing at rest in the lake or the state folder
carries a patient id, device id or sample value in plaintext, and enumerating plausible
readings against the real leaves finds nothing. See vitalproof/cli/privacy.py for what is
searched, in which encodings, and which folders are exempt and why."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from vitalproof.cli.privacy import KNOWN_FINDINGS, _rpc, needles_from_rows, scan
from vitalproof.devstack import PartStatus
from vitalproof.settings import Settings

pytestmark = pytest.mark.integration


def _demo(settings: Settings, cwd: Path) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-m", "vitalproof", "demo", "--json", "--devices", "6",
         "--duration", "6", "--chain", "anvil", "--faults", "dup=0.05,malformed=0.02"],
        env=os.environ | settings.child_env(settings.paths.home / "secrets"),
        capture_output=True, timeout=300, cwd=cwd,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    summary: dict[str, object] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return summary


def test_a_demo_run_leaves_no_plaintext_ids_or_values_on_chain_or_at_rest(
    settings: Settings, anvil: PartStatus, anvil_rpc_url: str, tmp_path: Path
) -> None:
    summary = _demo(settings, tmp_path)
    rs = settings.evolve(kafka={"topic_prefix": f"{summary['namespace']}."})
    report = scan(rs, rpc_url=anvil_rpc_url, rng=random.Random(3))
    doc = json.dumps(report.summary(), indent=1, default=str)

    assert report.patients == 6 and report.devices == 6, doc
    assert report.needles > 100, doc
    assert report.chain_txs >= 2 and report.chain_logs >= 1, doc  # deploy + anchors
    assert report.chain_storage_slots > 0, doc
    assert report.files_scanned > 10, doc  # lake files, manifests, leaves, anchor log, outbox
    assert not report.unexpected, doc
    # Nothing at all is found: the lake's folders, manifests and compaction records name
    # patients by pseudonym (no known finding is left), and never a device id or a value.
    assert KNOWN_FINDINGS == {}, doc
    assert report.findings == [], doc
    assert report.enumeration_candidates > 1000 and report.enumeration_matches == 0, doc
    assert report.enumeration_control_ok, doc
    assert report.ok, doc

    # The scan is not blind: plant a device id (UTF-16) and two values (float64) in the
    # anchor folder, and a patient id in a transaction's calldata: all three are found.
    rows = _lake_rows(rs)
    needles, _, _ = needles_from_rows(rows, sample=50, rng=random.Random(4))
    pair = next(n for n in needles if n.kind == "value" and n.encoding == "float64le pair")
    device, patient = str(rows[0]["device_id"]), str(rows[0]["patient_id"])
    (rs.anchor_dir / "planted.bin").write_bytes(
        b"\x01" + device.encode("utf-16-le") + b"\x02" + pair.pattern
    )
    accounts = _rpc(anvil_rpc_url, "eth_accounts", [])
    tx = {"from": accounts[0], "to": accounts[1], "data": "0x" + patient.encode().hex()}
    tx_hash = _rpc(anvil_rpc_url, "eth_sendTransaction", [tx])
    again = scan(rs, rpc_url=anvil_rpc_url, rng=random.Random(4), sample=50)
    planted = {
        (f.where, f.kind, f.encoding)
        for f in again.findings
        if f.location == tx_hash or f.location.endswith("/planted.bin")
    }
    assert ("chain-calldata", "patient_id", "ascii") in planted, planted
    assert ("state-file", "device_id", "utf-16le") in planted, planted
    assert ("state-file", "value", "float64le pair") in planted, planted


def _lake_rows(rs: Settings) -> list[dict[str, object]]:
    from clinic.proofs import LakeView

    rows: list[dict[str, object]] = LakeView(rs).table().to_pylist()
    return rows
