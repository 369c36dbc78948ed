"""`vitalproof consent ...` as a user runs it: ``python -m vitalproof`` subprocesses in a tmp
``VITALPROOF_HOME``, the registry checked through the library afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.consent import Consent

from clinic.consent import ConsentStatus
from clinic.consent_store import ConsentStore
from vitalproof.settings import PathSettings

REPO = Path(__file__).resolve().parents[1]


def run(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITALPROOF_")}
    env["VITALPROOF_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "vitalproof", "consent", *args],
        cwd=REPO,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def ok_json(home: Path, *args: str) -> Any:
    proc = run(home, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def one_error(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


GRANT = ("grant", "--patient", "p1", "--grantee", "Practitioner/dr-a", "--purpose", "TREAT")


def test_grant_list_revoke_show(tmp_path: Path) -> None:
    g = ok_json(tmp_path, *GRANT, "--metrics", "heart_rate,spo2", "--until", "2099-01-01")
    assert g["metrics"] == ["heart_rate", "spo2"] and g["end"] == "2099-01-01T00:00:00Z"
    assert g["status"] == "active" and g["version"] == 1 and g["recorded_by"].startswith("cli")
    other = ok_json(
        tmp_path,
        "grant",
        "--patient",
        "p2",
        "--grantee",
        "Organization/icu",
        "--metrics",
        "all",
        "--purpose",
        "ETREAT",
        "--actor",
        "nurse:7",
    )
    assert other["metrics"] == ["*"] and other["end"] is None and other["recorded_by"] == "nurse:7"

    listed = ok_json(tmp_path, "list")
    assert [x["grant_id"] for x in listed] == [g["grant_id"], other["grant_id"]]
    assert [x["grant_id"] for x in ok_json(tmp_path, "list", "--patient", "p2")] == [
        other["grant_id"]
    ]
    assert ok_json(tmp_path, "list", "--grantee", "Practitioner/dr-b") == []
    text = run(tmp_path, "list")
    assert text.returncode == 0 and g["grant_id"] in text.stdout and "all vitals" in text.stdout

    revoked = ok_json(tmp_path, "revoke", g["grant_id"])
    assert (revoked["version"], revoked["status"]) == (2, "inactive")
    assert [x["grant_id"] for x in ok_json(tmp_path, "list", "--active")] == [other["grant_id"]]
    again = one_error(run(tmp_path, "revoke", g["grant_id"]), code=1)
    assert f"grant {g['grant_id']} was already revoked at" in again

    proc = run(tmp_path, "show", g["grant_id"], "--history", "--json")
    versions = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [v["status"] for v in versions] == ["active", "inactive"]
    assert versions[0] == g  # the first version, unchanged
    shown = run(tmp_path, "show", g["grant_id"])
    assert "status:      inactive" in shown.stdout

    with ConsentStore(PathSettings(home=tmp_path).consent_path) as store:
        assert [v.status for v in store.history(g["grant_id"])] == [
            ConsentStatus.ACTIVE,
            ConsentStatus.INACTIVE,
        ]
        d = store.decide(
            grantee="Organization/icu", patient_id="p2", metric="ppg", at_us=store.now_us()
        )
        assert d.allowed


def test_fhir_show_and_import(tmp_path: Path) -> None:
    g = ok_json(tmp_path, *GRANT, "--metrics", "spo2")
    proc = run(tmp_path, "show", g["grant_id"], "--fhir")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    Consent.model_validate(doc)
    assert doc["status"] == "active" and doc["provision"]["type"] == "permit"

    unchanged = run(tmp_path, "import", "-", stdin=json.dumps(doc))
    assert unchanged.returncode == 0 and unchanged.stdout.startswith("unchanged:")

    doc["status"] = "inactive"  # a revocation from elsewhere
    path = tmp_path / "revoked.json"
    path.write_text(json.dumps(doc))
    imported = ok_json(tmp_path, "import", str(path), "--actor", "ehr")
    assert (imported["version"], imported["status"], imported["recorded_by"]) == (
        2,
        "inactive",
        "ehr",
    )

    # a new consent from another system: no vitalproof id, an R5 document
    r5 = {
        "resourceType": "Consent",
        "status": "active",
        "subject": {"reference": "Patient/p7"},
        "decision": "permit",
        "provision": [
            {
                "actor": [{"reference": {"reference": "Practitioner/dr-z"}}],
                "period": {"start": "2026-01-01T00:00:00Z"},
                "purpose": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                        "code": "TREAT",
                    }
                ],
            }
        ],
    }
    path.write_text(json.dumps(r5))
    new = ok_json(tmp_path, "import", str(path))
    assert (new["patient_id"], new["grantee"], new["metrics"]) == ("p7", "Practitioner/dr-z", ["*"])
    assert new["grant_id"].startswith("g-") and new["version"] == 1


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--metrics", "heart_rat"), "--metrics: unknown metric 'heart_rat'"),
        (("--metrics", ","), "--metrics: name at least one metric"),
        (("--metrics", "all,spo2"), "--metrics: all vitals ('*') cannot be combined"),
        (("--metrics", "all", "--until", "soon"), "--until 'soon' is not an ISO 8601 time"),
        (("--metrics", "all", "--until", "2001-01-01"), "--until: 2001-01-01T00:00:00Z has"),
        (
            ("--metrics", "all", "--from", "2099-02-01", "--until", "2099-01-01"),
            "--until: the grant would end (2099-01-01T00:00:00Z) before it starts",
        ),
    ],
)
def test_bad_grant_input(tmp_path: Path, args: tuple[str, ...], words: str) -> None:
    assert words in one_error(run(tmp_path, *GRANT, *args))


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--grantee", "Doctor/x", "--grantee: 'Doctor/x' is not Practitioner/<id>"),
        ("--patient", "p 1", "--patient: 'p 1' is not a valid id"),
        ("--purpose", "treat", "--purpose: unknown purpose 'treat'"),
    ],
)
def test_bad_grant_option(tmp_path: Path, option: str, value: str, words: str) -> None:
    args = [*GRANT, "--metrics", "all"]
    args[args.index(option) + 1] = value
    assert words in one_error(run(tmp_path, *args))


def test_bad_import_names_file_and_field(tmp_path: Path) -> None:
    g = ok_json(tmp_path, *GRANT, "--metrics", "spo2")
    doc = json.loads(run(tmp_path, "show", g["grant_id"], "--fhir").stdout)
    doc["provision"]["period"]["start"] = "2026-13-45"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    line = one_error(run(tmp_path, "import", str(path)))
    assert line == f"error: {path}: provision.period.start: not a dateTime"
    doc["provision"]["period"]["start"] = "2026-01-01"
    doc["provision"]["type"] = "deny"
    path.write_text(json.dumps(doc))
    assert one_error(run(tmp_path, "import", str(path))).endswith(
        "provision.type: deny provisions are not supported"
    )
    path.write_text("{not json")
    assert "(document): not JSON" in one_error(run(tmp_path, "import", str(path)))
    assert "cannot read" in one_error(run(tmp_path, "import", str(tmp_path / "missing.json")))


def test_unknown_grant_fails(tmp_path: Path) -> None:
    assert one_error(run(tmp_path, "show", "g-nope"), code=1) == "error: no grant 'g-nope'"
    assert one_error(run(tmp_path, "revoke", "g-nope"), code=1) == "error: no grant 'g-nope'"


def test_every_option_has_help(tmp_path: Path) -> None:
    from vitalproof.cli.main import build_parser

    parser = build_parser()
    consent = parser._subparsers._group_actions[0].choices["consent"]  # type: ignore[union-attr]
    for name, sub in consent._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            assert action.help, f"consent {name} {action.dest} has no help"


def test_every_change_from_the_command_line_is_in_the_audit_log(tmp_path: Path) -> None:
    from clinic.audit import AuditAction, AuditLog

    g = ok_json(tmp_path, *GRANT, "--metrics", "heart_rate", "--actor", "nurse:7")
    assert run(tmp_path, "list").returncode == 0  # reading changes nothing
    assert run(tmp_path, "revoke", g["grant_id"], "--actor", "nurse:7").returncode == 0
    with AuditLog(tmp_path / "clinic" / "audit.sqlite3") as audit:
        records = audit.records()
        assert audit.verify() == 2
    assert [(r.action, r.reason, r.actor) for r in records] == [
        (AuditAction.CONSENT, "granted", "nurse:7"),
        (AuditAction.CONSENT, "revoked", "nurse:7"),
    ]
    assert all(g["grant_id"] in r.what and r.patient_id == g["patient_id"] for r in records)
