"""`vitalproof audit list` and `audit verify` as a user runs them: real subprocesses in a tmp
VITALPROOF_HOME, the log written through clinic.audit as the service would."""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle

from clinic.audit import AuditAction, AuditEntry, AuditLog, Outcome
from vitalproof.cli.main import build_parser
from vitalproof.settings import PathSettings

REPO = Path(__file__).resolve().parent.parent


def run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITALPROOF_")}
    env["VITALPROOF_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "vitalproof", "audit", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def audit_path(home: Path) -> Path:
    return PathSettings(home=home).audit_path


@pytest.fixture
def home(tmp_path: Path) -> Path:
    with AuditLog(audit_path(tmp_path), clock=lambda: 1_800_000_000.25) as audit:
        audit.append_many(
            [
                AuditEntry(
                    actor="Practitioner/dr-a" if i % 2 else "Practitioner/dr-b",
                    role="clinician",
                    patient_id=f"p-{i % 3}",
                    action=AuditAction.STREAM,
                    what=f"stream s-{i}",
                    purpose="TREAT",
                    outcome=Outcome.ALLOWED,
                    reason=f"consent c-{i % 3}",
                    count=10 + i,
                )
                for i in range(6)
            ]
        )
        audit.append(
            actor="Practitioner/dr-c",
            role="clinician",
            patient_id="p-1",
            action=AuditAction.BREAK_GLASS,
            what="Patient/p-1",
            purpose="BTG",
            outcome=Outcome.ALLOWED,
            reason="unconscious in the ED",
        )
    return tmp_path


def test_list_prints_one_line_per_record(home: Path) -> None:
    proc = run(home, "list")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 7
    first = lines[0].split("\t")
    assert first[:8] == [
        "1",
        "2027-01-15T08:00:00.250000Z",
        "Practitioner/dr-b",
        "clinician",
        "p-0",
        "stream",
        "allowed",
        "10",
    ]
    assert lines[-1].split("\t")[5] == "break-glass"
    assert proc.stderr.strip() == "7 records"


def test_list_filters(home: Path) -> None:
    def seqs(*args: str) -> list[int]:
        proc = run(home, "list", "--json", *args)
        assert proc.returncode == 0, proc.stderr
        return [r["seq"] for r in json.loads(proc.stdout)]

    assert seqs("--patient", "p-1") == [2, 5, 7]
    assert seqs("--actor", "Practitioner/dr-a") == [2, 4, 6]
    assert seqs("--since", "5") == [6, 7]
    assert seqs("--patient", "p-1", "--actor", "Practitioner/dr-c") == [7]
    assert seqs("--limit", "2", "--since", "1") == [2, 3]
    assert seqs("--patient", "nobody") == []


def test_list_json_carries_the_chain_and_verifies_as_a_file(home: Path, tmp_path: Path) -> None:
    proc = run(home, "list", "--json")
    records = json.loads(proc.stdout)
    assert set(records[0]) == {
        "seq", "time_us", "actor", "role", "patient_id", "action", "what", "purpose",
        "outcome", "reason", "count", "prev_hash", "hash",
    }  # fmt: skip
    export = tmp_path / "mine.json"
    mine = [r for r in records if r["patient_id"] == "p-1"]
    export.write_text(json.dumps(mine))
    ok = run(home, "verify", "--file", str(export), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {"file": str(export), "records": 3, "links": 0}
    whole = tmp_path / "all.json"
    whole.write_text(proc.stdout)
    assert (
        "7 records match their hashes, 7 chain links"
        in run(home, "verify", "--file", str(whole)).stdout
    )
    mine[1]["count"] = 0
    export.write_text(json.dumps(mine))
    bad = run(home, "verify", "--file", str(export))
    assert bad.returncode == 1
    assert _one_error_line(bad).startswith("error: audit record 5: ")


def test_list_fhir_is_a_valid_bundle(home: Path) -> None:
    proc = run(home, "list", "--fhir", "--patient", "p-1")
    assert proc.returncode == 0, proc.stderr
    bundle = Bundle.model_validate_json(proc.stdout)
    events = [e.resource for e in bundle.entry]
    assert [e.id for e in events] == ["audit-2", "audit-5", "audit-7"]
    assert events[-1].purposeOfEvent[0].coding[0].code == "BTG"


def test_verify_prints_size_and_root(home: Path) -> None:
    with AuditLog(audit_path(home), readonly=True) as audit:
        root = audit.head().root.hex()
    proc = run(home, "verify")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].endswith(f": 7 records verified, root {root}")
    as_json = json.loads(run(home, "verify", "--json").stdout)
    assert as_json["size"] == 7 and as_json["root"] == root
    assert as_json["checkpoints_in_log"] == []


def test_verify_names_the_first_bad_record(home: Path) -> None:
    db = sqlite3.connect(audit_path(home))
    db.execute("DROP TRIGGER records_no_update")
    db.execute("UPDATE records SET count = 1 WHERE seq = 4")
    db.commit()
    db.close()
    proc = run(home, "verify")
    assert proc.returncode == 1
    assert _one_error_line(proc).startswith("error: audit record 4: ")
    assert proc.stdout == ""


def test_a_missing_log_is_an_error_and_is_not_created(tmp_path: Path) -> None:
    for args in (["list"], ["verify"]):
        proc = run(tmp_path, *args)
        assert proc.returncode == 1
        assert "no audit log at" in _one_error_line(proc)
    assert not audit_path(tmp_path).exists()


@pytest.mark.parametrize(
    "args",
    [
        ["list", "--since", "-1"],
        ["list", "--limit", "0"],
        ["list", "--since", "x"],
        ["list", "--json", "--fhir"],
        ["verify", "--file", "/nonexistent/records.json"],
        ["frobnicate"],
    ],
)
def test_bad_input_exits_2(home: Path, args: list[str]) -> None:
    proc = run(home, *args)
    assert proc.returncode == 2, proc.stderr
    assert "error" in proc.stderr


def test_verify_file_that_is_not_a_list_of_records(home: Path, tmp_path: Path) -> None:
    f = tmp_path / "x.json"
    f.write_text('{"seq": 1}')
    proc = run(home, "verify", "--file", str(f))
    assert proc.returncode == 2
    assert "expected a JSON array" in _one_error_line(proc)
    f.write_text('[{"seq": 3}]')
    proc = run(home, "verify", "--file", str(f))
    assert proc.returncode == 1
    assert _one_error_line(proc).startswith("error: audit record 3: field")


def test_every_audit_option_has_help() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    audit = sub.choices["audit"]
    inner = next(a for a in audit._actions if isinstance(a, argparse._SubParsersAction))
    assert set(inner.choices) == {"list", "verify"}
    for name, p in inner.choices.items():
        assert p.description or any(c.dest == name and c.help for c in inner._choices_actions)
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"audit {name} {action.option_strings} has no help"


def test_verify_checks_the_checkpoints_in_the_anchor_log(home: Path) -> None:
    """A checkpoint appended to the namespace's Merkle log (as `anchor run` does) and
    anchored: verify says so; once the records below it change, verify fails naming it."""
    from anchor.log import MerkleLog
    from vitalproof.settings import Settings

    with AuditLog(audit_path(home)) as audit:
        cp = audit.checkpoint()
    assert cp is not None
    log_dir = Settings(paths=PathSettings(home=home)).anchor_dir / "log"
    with MerkleLog(log_dir) as mlog:
        mlog.append(*cp)
        mlog.record_anchor(mlog.size, mlog.root(), {"tx_hash": "0x01"})
    proc = run(home, "verify")
    assert proc.returncode == 0, proc.stderr
    assert "1 checkpoints in the anchor log match, latest anchored at size 7" in proc.stdout
    assert json.loads(run(home, "verify", "--json").stdout)["checkpoints_anchored"] == [7]

    db = sqlite3.connect(audit_path(home))
    db.execute("DROP TRIGGER records_no_delete")
    db.execute("DELETE FROM records WHERE seq = 7")
    db.execute("DELETE FROM checkpoints")
    db.commit()
    db.close()
    proc = run(home, "verify")
    assert proc.returncode == 1
    assert "audit-7" in _one_error_line(proc)
