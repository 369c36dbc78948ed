"""Erasing a patient ("Patient keys" in docs/invariants.md; issue 10, item 6).

A lake sealed by the real sealer and keystore for three patients in two batches, anchored on
the embedded chain; proof bundles exported for every reading; then patient B is erased. What
must hold afterwards: B's files do not decrypt, B's bundles cannot be exported, B's salts
cannot be recomputed (so B's leaves link to nothing); every bundle of A and C exported before
still verifies, offline and against the chain, and the ones exported after are the same
bundles against the same anchors; nothing sealed changed by a byte; B's grants are revoked
with their history kept, B's devices retired, a live stream on B closed by the revocation;
the audit log holds the erasure and still verifies. Then the command, as an operator runs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from anchor.job import AnchorJob
from clinic.audit import AuditAction, AuditError, AuditLog, Outcome
from clinic.auth import Principal, Role, Scope
from clinic.consent import ALL_VITALS, ConsentStatus
from clinic.consent_store import ConsentStore
from clinic.erasure import (
    AlreadyErased,
    InvalidPatientId,
    UnknownPatient,
    erase_patient,
    plan_erasure,
)
from clinic.live import Hub
from clinic.patients import list_patients
from clinic.proofs import LakeView, ProofExportError
from streams import lake
from streams.lake.keystore import KeyErased, LocalKeystore
from streams.lake.storage import LakeRoot, as_root
from streams.sealer import Pending, Sealer
from tests.s3 import s3_lake
from vitalproof.manifest import BatchManifest
from vitalproof.registry import DeviceStatus, Registry
from vitalproof.schema import SampleBatch, Transport
from vitalproof.settings import ChainSettings, KafkaSettings, LakeSettings, PathSettings, Settings
from vitalproof_verify import merkle
from vitalproof_verify.bundle import ProofBundleV2, verify_offline
from vitalproof_verify.leaves import leaf_hash_salted
from vitalproof_verify.verify import verify_bundle

REPO = Path(__file__).resolve().parents[1]
T0 = 1_800_000_000_000_000  # 2027-01-15T08:00:00Z
PATIENTS = {"pt-a": "dev-a", "pt-b": "dev-b", "pt-c": "dev-c"}
PER_BATCH = 10  # readings of each metric, per patient and batch
DR_A, DR_B = "Practitioner/dr-a", "Practitioner/dr-b"
ACTOR = "Operator/test"
REASON = "erasure request #17 (GDPR art. 17)"


def settings_for(home: Path, prefix: str = "", lake_s3: LakeSettings | None = None) -> Settings:
    return Settings(
        paths=PathSettings(home=home),
        kafka=KafkaSettings(topic_prefix=prefix),
        chain=ChainSettings(kind="embedded"),
        lake=lake_s3 or LakeSettings(),
    )


def seal(settings: Settings, batch_no: int, patients: dict[str, str] = PATIENTS) -> BatchManifest:
    """One batch of heart rate and SpO2 for each patient, sealed by the real sealer."""
    pendings = []
    for n, (patient, device) in enumerate(sorted(patients.items())):
        b = SampleBatch(
            device_id=device,
            patient_id=patient,
            gateway_id="gw",
            transport=Transport.MQTT,
            receive_time_us=T0,
        )
        for i in range(PER_BATCH):
            k = batch_no * PER_BATCH + i
            b.add("heart_rate", "/min", T0 + k * 1_000_000, 2 * k, float(60 + k % 9))
            b.add("spo2", "%", T0 + k * 1_000_000, 2 * k + 1, float(95 + k % 4))
        b.fill_reading_ids()
        pendings.append(Pending(settings.kafka.topic_clean, n, batch_no, b))
    kms = LocalKeystore(settings.paths.keys_dir)
    manifest = Sealer(lake.open_lake(settings), kms).seal(pendings)
    assert manifest is not None
    return manifest


def enroll_and_grant(settings: Settings) -> dict[str, list[str]]:
    """Devices in the registry, grants in the store; patient -> grant ids."""
    registry = Registry(settings.paths.registry_path)
    for patient, device in PATIENTS.items():
        registry.enroll(device, patient)
    grants: dict[str, list[str]] = {p: [] for p in PATIENTS}
    with ConsentStore(settings.paths.consent_path) as store:
        for patient, grantee in [("pt-a", DR_A), ("pt-b", DR_A), ("pt-b", DR_B), ("pt-c", DR_B)]:
            g = store.grant(
                patient_id=patient,
                grantee=grantee,
                metrics=[ALL_VITALS],
                purpose="TREAT",
                actor="cli:test",
            )
            grants[patient].append(g.grant_id)
        old = store.grant(
            patient_id="pt-b", grantee=DR_A, metrics=["spo2"], purpose="HRESCH", actor="cli:test"
        )
        store.revoke(old.grant_id, actor="cli:test")  # revoked before: left as it is
        grants["pt-b"].append(old.grant_id)
    return grants


def digests(root: Path | LakeRoot) -> dict[str, str]:
    """Every file's sha256 by its path below ``root`` (a folder, or a lake on S3)."""
    if isinstance(root, Path):
        root = as_root(root)
    return {
        info.path.removeprefix(root.base + "/"): hashlib.sha256(
            root.read(info.path.removeprefix(root.base + "/")) or b""
        ).hexdigest()
        for info in root.files(suffix="")
    }


@dataclass
class Home:
    settings: Settings
    w3: Any  # the embedded chain the batches are anchored on
    grants: dict[str, list[str]]
    rows: dict[str, dict[str, Any]]  # reading id -> its lake row, before the erasure
    bundles: dict[str, bytes] = field(default_factory=dict)  # reading id -> bundle JSON

    def ids_of(self, patient: str) -> list[str]:
        return sorted(r for r, row in self.rows.items() if row["patient_id"] == patient)


@pytest.fixture
def home(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Home]:
    """Sealed and anchored in a local lake, or (``s3``) in one on the session's SeaweedFS."""
    lake_s3 = None
    if getattr(request, "param", "local") == "s3":
        lake_s3 = s3_lake(request.getfixturevalue("seaweedfs_lake"))
    settings = settings_for(tmp_path, lake_s3=lake_s3)
    grants = enroll_and_grant(settings)
    job = AnchorJob.from_settings(settings)
    try:
        for batch_no in range(2):  # two batches, two anchors
            job.add_manifest(seal(settings, batch_no).to_json_bytes())
            assert job.anchor_once() is not None
    finally:
        job.close()
    view = LakeView(settings)
    table = view.table()
    ids = lake.hex_ids(table["reading_id"]).to_pylist()
    rows = {rid: row | {"reading_id": rid} for rid, row in zip(ids, table.to_pylist(), strict=True)}
    assert len(rows) == 3 * 2 * 2 * PER_BATCH
    h = Home(settings, job.chain.w3, grants, rows)
    for rid, row in rows.items():
        h.bundles[rid] = view.bundle(rid, row).to_json()
    with AuditLog(settings.paths.audit_path) as audit:  # an earlier disclosure of B
        audit.append(
            actor=DR_A,
            role="clinician",
            patient_id="pt-b",
            action=AuditAction.READ,
            what="Observation?patient=pt-b",
            purpose="TREAT",
            outcome=Outcome.ALLOWED,
            reason="consented",
            count=40,
        )
    yield h


@pytest.mark.parametrize("home", ["local", "s3"], indirect=True)
def test_erasure_shreds_b_and_every_other_proof_still_verifies(home: Home) -> None:
    settings = home.settings
    root = lake.open_lake(settings)
    assert root.local == (settings.lake.root is None)
    lake_before = digests(root)
    sealed = {k for k in lake_before if not k.endswith((".index", ".owner"))}  # per partition
    assert len(sealed) == 2 * 3 + 2  # 2 batches: 3 patients' files and a manifest each
    anchors_before = digests(settings.anchor_dir)
    b_files = lake.list_patient_files(root, "pt-b", kms=LocalKeystore(settings.paths.keys_dir))
    assert len(b_files) == 2  # one per batch (one UTC date)

    plan = plan_erasure(settings, "pt-b")
    assert plan.has_keys and plan.file_count == 2 and plan.readings == 4 * PER_BATCH
    assert plan.grants == home.grants["pt-b"][:2] and plan.devices == ["dev-b"]
    report = erase_patient(settings, "pt-b", actor=ACTOR, reason=REASON)
    assert report.keys_destroyed
    assert report.files_unreadable == 2 and report.files_by_namespace == {"default": 2}
    assert report.readings_unreadable == 4 * PER_BATCH
    assert report.grants_revoked == home.grants["pt-b"][:2]  # the active ones only
    assert report.devices_retired == ["dev-b"]
    assert report.audit_seq == 2

    # nothing sealed changed: the erasure destroys keys, it rewrites no byte of the lake
    assert digests(root) == lake_before
    assert digests(settings.anchor_dir) == anchors_before

    # B's files cannot be decrypted, by a fresh keystore (another process's view) too
    kms = LocalKeystore(settings.paths.keys_dir)
    with pytest.raises(lake.LakeKeyUnavailable) as err:
        lake.read_patient(root, "pt-b", kms)
    assert isinstance(err.value.cause, KeyErased)
    for path in b_files:
        rel = path.removeprefix(root.base + "/")
        with pytest.raises(lake.LakeKeyUnavailable):
            lake.read_reading_ids(root, rel, kms, "pt-b")
    assert lake.lake_stats(root, kms)["unreadable_files"] == 2

    # B's leaf salts cannot be recomputed, and B's bundles cannot be exported
    b_ids = home.ids_of("pt-b")
    with pytest.raises(KeyErased):
        kms.salts("pt-b", b_ids[:1])
    view = LakeView(settings)
    for rid in b_ids[:3]:
        with pytest.raises(ProofExportError, match="erased"):
            view.bundle(rid)  # its row cannot be found any more...
        with pytest.raises(ProofExportError, match="erased"):
            view.bundle(rid, home.rows[rid])  # ...and whoever kept it gets no salt
    assert len(view.erased_files) == 2

    # A's and C's bundles exported before still verify, offline and on the chain; exported
    # now, they are the same bundles, against the same anchors
    others = home.ids_of("pt-a") + home.ids_of("pt-c")
    assert len(others) == 2 * 2 * 2 * PER_BATCH
    table = view.table()
    after_ids = set(lake.hex_ids(table["reading_id"]).to_pylist())
    assert after_ids == set(others)
    for rid in others:
        before = ProofBundleV2.model_validate_json(home.bundles[rid])
        # its batch path climbs past B's subtree root, which the manifest still holds
        assert before.batch.patient_count == 3
        verify_offline(home.bundles[rid])
        verify_bundle(before, home.w3)
        now = view.bundle(rid)
        verify_offline(now.to_json())
        verify_bundle(now, home.w3)
        assert now.anchor == before.anchor and now.log == before.log
        assert now.to_json() == home.bundles[rid]

    # grants: B's are inactive, each with its history; nobody else's changed
    with ConsentStore(settings.paths.consent_path) as store:
        for gid in home.grants["pt-b"][:2]:
            versions = store.history(gid)
            assert [g.status for g in versions] == [ConsentStatus.ACTIVE, ConsentStatus.INACTIVE]
            assert versions[-1].recorded_by == ACTOR
        assert len(store.history(home.grants["pt-b"][2])) == 2  # revoked before, untouched
        assert not store.grants(patient_id="pt-b", active_at_us=store.now_us())
        for p in ("pt-a", "pt-c"):
            assert [g.status for g in store.grants(patient_id=p)] == [ConsentStatus.ACTIVE]

    # devices: B's retired (normalization rejects its readings), the others active
    registry = Registry(settings.paths.registry_path)
    assert {d.device_id: d.status for d in registry.list()} == {
        "dev-a": DeviceStatus.ACTIVE,
        "dev-b": DeviceStatus.RETIRED,
        "dev-c": DeviceStatus.ACTIVE,
    }

    # the audit log holds the erasure, the earlier record of B stays, and it all verifies
    with AuditLog(settings.paths.audit_path, readonly=True) as audit:
        assert audit.verify() == 2
        rec = audit.record(report.audit_seq)
        assert (rec.actor, rec.role, rec.patient_id, rec.what) == (
            ACTOR,
            "operator",
            "pt-b",
            "patient pt-b",
        )
        assert (rec.action, rec.outcome, rec.purpose, rec.reason, rec.count) == (
            AuditAction.ERASURE,
            Outcome.ALLOWED,
            None,
            REASON,
            0,
        )
        assert report.erased_at_us == rec.time_us
        assert [r.action for r in audit.records(patient_id="pt-b")] == [
            AuditAction.READ,
            AuditAction.ERASURE,
        ]

    # listed as erased, with what it held, by pseudonym only: the id went with the keys
    listed = {p.patient_id: p for p in list_patients(settings)}
    assert "pt-b" not in listed and not any(p.erased for p in listed.values() if p.patient_id)
    assert listed[None].erased and listed[None].files == 2
    assert listed[None].pseudonym == LocalKeystore(settings.paths.keys_dir).pseudonym("pt-b")
    assert (listed[None].active_devices, listed[None].active_grants) == (0, 0)
    assert "pt-b" not in json.dumps([p.to_json_dict() for p in listed.values()])
    assert not listed["pt-a"].erased and listed["pt-a"].readings == 4 * PER_BATCH

    # a second erasure is refused, and changes nothing
    with pytest.raises(AlreadyErased, match="already erased"):
        erase_patient(settings, "pt-b", actor=ACTOR, reason=REASON)
    with AuditLog(settings.paths.audit_path, readonly=True) as audit:
        assert audit.size == 2


def test_b_leaves_link_to_nothing_without_the_destroyed_salt(home: Home) -> None:
    """B's subtree roots stay in the manifests (the anchored roots depend on them; B's leaves
    were never stored), but only the destroyed salts reproduce them: a bundle handed out
    earlier carries its own salt and cannot be recalled, while a guess with any other salt
    (the new generation's) matches nothing, whatever the attacker knows of B's readings."""
    settings = home.settings
    manifests = LakeView(settings).manifests()
    b_roots = {}
    for m in manifests:
        assert m.patient_roots is not None and m.leaves_path is None
        h = LocalKeystore(settings.paths.keys_dir).pseudonym("pt-b")
        b_roots[m.batch_id] = bytes.fromhex(m.patient_roots[m.patients.index(h)])
    b_ids = home.ids_of("pt-b")
    old = {rid: ProofBundleV2.model_validate_json(home.bundles[rid]) for rid in b_ids}
    old_leaves = {bytes.fromhex(b.leaf_hash) for b in old.values()}

    erase_patient(settings, "pt-b", actor=ACTOR, reason=REASON)
    kms = LocalKeystore(settings.paths.keys_dir)
    with pytest.raises(KeyErased):
        kms.salt_key("pt-b")
    for b in old.values():  # the control: with the destroyed salt the link is there
        leaf = leaf_hash_salted(bytes.fromhex(b.salt), b.reading.canonical_bytes())
        merkle.verify_inclusion(
            leaf, b.patient.leaf_index, b.patient.size, _hashes(b.patient.path),
            b_roots[b.batch.batch_id],
        )  # fmt: skip
    # new data of B would open a new key generation; its salts link to none of the old
    # leaves, and B's rows (all an attacker could know) rebuild neither of B's roots
    assert kms.current_key_id("pt-b") == "patient:pt-b:v2"
    fresh = dict(zip(b_ids, kms.salts("pt-b", b_ids), strict=True))
    for batch_id, root in b_roots.items():
        subtree = sorted((b for b in old.values() if b.batch.batch_id == batch_id),
                         key=lambda b: b.patient.leaf_index)  # fmt: skip
        assert [b.patient.leaf_index for b in subtree] == list(range(2 * PER_BATCH))
        guessed = [
            leaf_hash_salted(fresh[b.reading.reading_id], b.reading.canonical_bytes())
            for b in subtree
        ]
        assert not old_leaves & set(guessed)
        assert merkle.root(guessed) != root


def _hashes(path: list[str]) -> list[bytes]:
    return [bytes.fromhex(p) for p in path]


def test_revoking_is_how_a_live_stream_on_b_ends(home: Home) -> None:
    """The service's hub notices the consent store's change (it polls every 0.5 s) and closes
    the subscription that named B, with the reason; a stream over A is untouched."""
    settings = home.settings
    scopes = (Scope.parse("user/Observation.rs"),)
    dr_a = Principal(subject=DR_A, role=Role.CLINICIAN, scopes=scopes)
    with (
        ConsentStore(settings.paths.consent_path) as store,
        AuditLog(settings.paths.audit_path) as audit,
    ):
        hub = Hub(store, audit)
        on_b = hub.subscribe(dr_a, ["pt-b"], None)
        on_a = hub.subscribe(dr_a, ["pt-a"], None)
        assert not hub.consent_changed()
        erase_patient(settings, "pt-b", actor=ACTOR, reason=REASON)
        assert hub.consent_changed()
        assert on_b.closed is not None and "consent ended" in on_b.closed
        assert on_a.closed is None and set(hub.subscriptions) == {on_a.id}


def test_unknown_invalid_and_unchecked_input_change_nothing(home: Home) -> None:
    settings = home.settings
    with pytest.raises(UnknownPatient, match="unknown patient 'pt-z'"):
        erase_patient(settings, "pt-z", actor=ACTOR, reason=REASON)
    with pytest.raises(InvalidPatientId):
        plan_erasure(settings, "pt b")
    with pytest.raises(AuditError, match="reason"):  # checked before anything is destroyed
        erase_patient(settings, "pt-b", actor=ACTOR, reason="")
    kms = LocalKeystore(settings.paths.keys_dir)
    assert kms.has_keys("pt-b")
    assert lake.read_patient(settings.lake_dir, "pt-b", kms).num_rows == 4 * PER_BATCH
    assert plan_erasure(settings, "pt-b").grants == home.grants["pt-b"][:2]


def test_a_fresh_home_is_not_touched_by_looking(tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "home")
    with pytest.raises(UnknownPatient):
        plan_erasure(settings, "pt-a")
    with pytest.raises(UnknownPatient):
        erase_patient(settings, "pt-a", actor=ACTOR, reason=REASON)
    assert list_patients(settings) == []
    assert not (tmp_path / "home" / "keys").exists()
    assert not settings.paths.registry_path.exists()


def test_an_interrupted_erasure_is_finished_by_a_rerun(home: Home) -> None:
    """Keys destroyed, then the process died before the audit record (and before the
    grants): the rerun revokes, records, and reports that no live key was left."""
    settings = home.settings
    LocalKeystore(settings.paths.keys_dir).erase("pt-b")
    report = erase_patient(settings, "pt-b", actor=ACTOR, reason=REASON)
    assert not report.keys_destroyed
    assert report.grants_revoked == home.grants["pt-b"][:2]
    with pytest.raises(AlreadyErased):
        plan_erasure(settings, "pt-b")


def test_data_after_an_erasure_is_erased_again(home: Home) -> None:
    """A reading in flight when B was erased is sealed under a new key generation: B is not
    'already erased' then, and a second erasure destroys that generation too."""
    settings = home.settings
    erase_patient(settings, "pt-b", actor=ACTOR, reason=REASON)
    seal(settings, 2, {"pt-b": "dev-b"})
    kms = LocalKeystore(settings.paths.keys_dir)
    assert kms.has_keys("pt-b") and not kms.is_erased("pt-b")
    erased: list[str] = []
    assert lake.read_patient(settings.lake_dir, "pt-b", kms, erased=erased).num_rows == 20
    assert len(erased) == 2  # the old generation's files are skipped, not fatal
    report = erase_patient(settings, "pt-b", actor=ACTOR, reason="the late readings")
    assert report.keys_destroyed and report.files_unreadable == 3
    assert report.grants_revoked == [] and report.devices_retired == []
    with pytest.raises(lake.LakeKeyUnavailable):
        lake.read_patient(settings.lake_dir, "pt-b", kms)


def test_the_keys_are_per_home_so_every_namespace_is_counted(tmp_path: Path) -> None:
    one, two = settings_for(tmp_path), settings_for(tmp_path, "ns2.")
    seal(one, 0)
    seal(two, 0, {"pt-b": "dev-b"})
    report = erase_patient(one, "pt-b", actor=ACTOR, reason=REASON)
    assert report.files_by_namespace == {"default": 1, "ns2": 1}
    assert report.files_unreadable == 2 and report.readings_unreadable == 4 * PER_BATCH
    kms = LocalKeystore(tmp_path / "keys")
    with pytest.raises(lake.LakeKeyUnavailable):
        lake.read_patient(two.lake_dir, "pt-b", kms)


# -- the command ------------------------------------------------------------------------------


def run(
    home: Path, *args: str, stdin: Any = subprocess.DEVNULL
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITALPROOF_")}
    env["VITALPROOF_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "vitalproof", "patients", *args],
        cwd=REPO,
        env=env,
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


@pytest.fixture
def cli_home(tmp_path: Path) -> Path:
    settings = settings_for(tmp_path)
    enroll_and_grant(settings)
    for batch_no in range(2):
        seal(settings, batch_no)
    return tmp_path


def test_cli_erase_needs_yes_without_a_tty_then_reports(cli_home: Path) -> None:
    line = one_error(run(cli_home, "erase", "pt-b", "--reason", REASON), 2)
    assert "not a terminal" in line and "--yes" in line
    assert LocalKeystore(cli_home / "keys").has_keys("pt-b")  # refused: nothing happened

    proc = run(cli_home, "erase", "pt-b", "--reason", REASON, "--yes")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("erased patient pt-b\n")
    assert "keys destroyed       yes" in out and "files unreadable     2 (2 in default)" in out
    assert "grants revoked       2: " in out and "devices retired      1: dev-b" in out
    assert "readings unreadable  40" in out and "audit record         1" in out

    line = one_error(run(cli_home, "erase", "pt-b", "--reason", REASON, "--yes"), 1)
    assert "already erased" in line and "audit record 1" in line
    with AuditLog(cli_home / "clinic" / "audit.sqlite3", readonly=True) as audit:
        assert audit.verify() == 1
        assert audit.record(1).actor == "Operator/cli"  # the default actor


def test_cli_erase_json_and_list(cli_home: Path) -> None:
    listed = run(cli_home, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["patient_id"]: r for r in json.loads(listed.stdout)}
    assert set(rows) == set(PATIENTS)
    h = LocalKeystore(cli_home / "keys").pseudonym("pt-b")
    assert rows["pt-b"] == {
        "patient_id": "pt-b",
        "pseudonym": h,
        "files": 2,
        "readings": 40,
        "batches": 2,
        "bytes": rows["pt-b"]["bytes"],
        "active_devices": 1,
        "active_grants": 2,
        "erased": False,
    }
    assert rows["pt-b"]["bytes"] > 0

    proc = run(
        cli_home, "erase", "pt-b", "--reason", REASON, "--actor", "Operator/jo", "--yes", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["patient_id"] == "pt-b" and report["keys_destroyed"] is True
    assert report["files_unreadable"] == 2 and report["files_by_namespace"] == {"default": 2}
    assert len(report["grants_revoked"]) == 2 and report["devices_retired"] == ["dev-b"]
    assert report["audit_seq"] == 1 and report["erased_at"].endswith("Z")

    text = run(cli_home, "list")
    assert text.returncode == 0, text.stderr
    lines = {ln.split()[0]: ln for ln in text.stdout.splitlines()[1:]}
    assert "pt-b" not in text.stdout  # the erased id is gone: the line shows its pseudonym
    assert lines[f"({h[:12]}…)"].endswith("erased") and lines["pt-a"].endswith("keys held")


def test_cli_erase_errors_are_one_line(cli_home: Path) -> None:
    line = one_error(run(cli_home, "erase", "pt-z", "--reason", REASON, "--yes"), 1)
    assert "unknown patient 'pt-z'" in line
    one_error(run(cli_home, "erase", "pt z", "--reason", REASON, "--yes"), 2)
    line = one_error(run(cli_home, "erase", "pt-b", "--reason", "  ", "--yes"), 2)
    assert "--reason" in line
    missing = run(cli_home, "erase", "pt-b", "--yes")  # --reason is required (argparse)
    assert missing.returncode == 2 and "--reason" in missing.stderr
    assert LocalKeystore(cli_home / "keys").has_keys("pt-b")


def test_cli_erase_asks_on_a_terminal(cli_home: Path) -> None:
    """On a tty the patient id typed back is the only yes."""
    for answer, code in [("pt-a\n", 1), ("pt-b\n", 0)]:
        primary, secondary = os.openpty()
        try:
            os.write(primary, answer.encode())
            proc = run(cli_home, "erase", "pt-b", "--reason", REASON, stdin=secondary)
        finally:
            os.close(secondary)
            os.close(primary)
        assert proc.returncode == code, proc.stderr
        assert "This cannot be undone." in proc.stderr
        if code:
            assert "not confirmed" in proc.stderr.splitlines()[-1]
            assert LocalKeystore(cli_home / "keys").has_keys("pt-b")
        else:
            assert proc.stdout.startswith("erased patient pt-b")
    assert LocalKeystore(cli_home / "keys").is_erased("pt-b")
