"""The patient's page in a real chromium against `vitalproof serve`: a lake sealed by the real
sealer and anchored on a real Anvil, consent in the service's store, the audit log the
service writes and whose checkpoints the anchor job anchors.

What a patient would check: the grants they gave are listed; one made through the form is
in the consent store exactly as asked; a revoked one is revoked in the store and cuts the
clinician off at the next request; every clinician's read and a break-glass access are in
"Who looked at my data" (the break-glass marked, with its reason), pending until an audit
checkpoint covering them is anchored and anchored after, with a proof that verifies offline
and on the chain; and nobody else's records are shown.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, expect
from web3 import Web3

from anchor.chain import AnchorReceipt, Chain
from anchor.job import AnchorJob
from clinic.audit import AuditLog, CheckpointSource, verify_disclosure_proof
from clinic.auth import DevIssuer
from clinic.consent import ALL_VITALS, ConsentStatus
from clinic.consent_store import ConsentStore
from clinic.service import patient_routes
from clinic.service.context import ServiceContext, clinic_dir
from clinic.service.patient_routes import proof_status
from tests.test_audit import filled, rewrite_from
from tests.test_clinic_service import _answers_metadata, seal, serving
from tests.web import check_accessibility, screenshot, sign_in
from vitalproof.settings import ChainSettings, PathSettings, Settings
from vitalproof_verify.onchain import check_anchor_on_chain

PATIENT_SCOPES = ["patient/Observation.rs", "patient/Consent.cruds", "patient/AuditEvent.rs"]
PAGE_PATH = "/ui/patient.html"


@dataclass
class Clinic:
    url: str
    settings: Settings
    issuer: DevIssuer
    rpc_url: str

    def patient(self, patient_id: str) -> str:
        return self.issuer.issue(
            f"Patient/{patient_id}", "patient", PATIENT_SCOPES, patient=patient_id
        )

    def clinician(self, subject: str) -> str:
        return self.issuer.issue(subject, "clinician", ["user/Observation.rs"])

    def call(self, method: str, path: str, token: str, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"}
        return httpx.request(method, self.url + path, headers=headers, timeout=30, **kw)

    def consent(self) -> ConsentStore:
        return ConsentStore(self.settings.paths.consent_path)

    def anchor_audit(self) -> AnchorReceipt:
        receipt = anchor_audit(self.settings, Chain.from_settings(self.settings))
        assert receipt is not None
        return receipt


def anchor_audit(settings: Settings, chain: Chain) -> AnchorReceipt | None:
    """What `vitalproof anchor` does each period: the audit log's checkpoint becomes one more
    entry of the Merkle log, anchored with the batches."""
    source = CheckpointSource(settings.paths.audit_path)
    job = AnchorJob(settings, chain, checkpoints=source)
    try:
        return job.anchor_once()
    finally:
        job.close()
        source.close()


@pytest.fixture(scope="module")
def clinic(tmp_path_factory: pytest.TempPathFactory, anvil_rpc_url: str) -> Iterator[Clinic]:
    home = tmp_path_factory.mktemp("patient-home")
    settings = Settings(
        paths=PathSettings(home=home), chain=ChainSettings(kind="anvil", rpc_url=anvil_rpc_url)
    )
    seal(settings)  # pt-1 and pt-2: 30 heart rate and 30 SpO2 readings each, anchored
    issuer = DevIssuer(clinic_dir(settings))
    env = os.environ | {"VITALPROOF_HOME": str(home)}
    with serving(env, home / "serve.log", _answers_metadata) as url:
        yield Clinic(url, settings, issuer, anvil_rpc_url)


def _grant(clinic: Clinic, patient: str, grantee: str, metrics: set[str], purpose: str) -> str:
    with clinic.consent() as store:
        return store.grant(
            patient_id=patient,
            grantee=grantee,
            metrics=frozenset(metrics),
            purpose=purpose,
            actor=f"Patient/{patient}",
        ).grant_id


def _grant_row(page: Page, grantee: str) -> Any:
    return page.locator("#grants tbody tr").filter(has=page.get_by_role("cell", name=grantee))


def _local_midnight_us(page: Page, days_from_today: int) -> int:
    """Midnight in the browser's time zone, as the page computes a day's start."""
    ms: float = page.evaluate(
        "d => { const t = new Date(); return new Date(t.getFullYear(), t.getMonth(), "
        "t.getDate() + d).getTime(); }",
        days_from_today,
    )
    return int(ms) * 1000


def test_a_patient_sees_their_grants_shares_and_revokes(clinic: Clinic, page: Page) -> None:
    dr_a = _grant(clinic, "pt-1", "Practitioner/dr-a", {"heart_rate"}, "TREAT")
    assert clinic.call("GET", "/fhir/Observation", clinic.clinician("Practitioner/dr-a"),
                       params={"patient": "pt-1"}).status_code == 200  # fmt: skip

    sign_in(page, clinic.url, clinic.patient("pt-1"), PAGE_PATH)
    expect(page.get_by_test_id("who")).to_have_text("Patient/pt-1 (patient)")
    row = _grant_row(page, "Practitioner/dr-a")
    expect(row).to_contain_text("Heart rate")
    expect(row).to_contain_text("treatment (TREAT)")
    expect(row).to_contain_text("Active")

    # Nothing chosen to share: the page says so and sends nothing.
    page.get_by_label("Who (a practitioner or organisation)").fill("Practitioner/dr-b")
    page.get_by_role("button", name="Share", exact=True).click()
    expect(page.locator("#share-status [role=alert]")).to_contain_text("Choose what they may see")

    # Share SpO2 with dr-b for care management, for 31 days from today.
    page.get_by_label("Oxygen saturation").check()
    page.get_by_label("Why (purpose)").select_option("CAREMGT")
    today = page.get_by_label("From (first day)").input_value()
    last = (dt.date.fromisoformat(today) + dt.timedelta(days=30)).isoformat()
    page.get_by_label("Until (last day; empty: until you revoke)").fill(last)
    page.get_by_role("button", name="Share", exact=True).click()
    expect(page.locator("#share-status")).to_contain_text("Shared with Practitioner/dr-b.")
    row_b = _grant_row(page, "Practitioner/dr-b")
    expect(row_b).to_contain_text("Oxygen saturation")
    expect(row_b).to_contain_text("care management (CAREMGT)")
    with clinic.consent() as store:
        (b,) = store.grants(patient_id="pt-1", grantee="Practitioner/dr-b")
    assert b.status is ConsentStatus.ACTIVE and b.metrics == {"spo2"} and b.purpose == "CAREMGT"
    assert b.start_us == _local_midnight_us(page, 0)
    assert b.end_us == _local_midnight_us(page, 31)  # the last day is included
    assert b.recorded_by == "Patient/pt-1"

    # All vital signs with an organisation, until revoked.
    page.get_by_label("Who (a practitioner or organisation)").fill("Organization/ward-7")
    page.get_by_label("All vital signs").check()
    expect(page.get_by_label("Heart rate")).to_be_disabled()
    page.get_by_label("Why (purpose)").select_option("HRESCH")
    page.get_by_role("button", name="Share", exact=True).click()
    expect(_grant_row(page, "Organization/ward-7")).to_contain_text("All vital signs")
    with clinic.consent() as store:
        (w,) = store.grants(patient_id="pt-1", grantee="Organization/ward-7")
    assert w.metrics == {ALL_VITALS} and w.end_us is None and w.purpose == "HRESCH"

    # Revoke dr-a: asked first; cancelling keeps the grant.
    page.get_by_role("button", name="Revoke Practitioner/dr-a").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Practitioner/dr-a loses access to Heart rate at once")
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    with clinic.consent() as store:
        assert store.get(dr_a).status is ConsentStatus.ACTIVE  # type: ignore[union-attr]
    # By keyboard: Escape cancels too; Enter on the focused Revoke button revokes.
    page.get_by_role("button", name="Revoke Practitioner/dr-a").focus()
    page.keyboard.press("Enter")
    expect(dialog).to_be_visible()
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    page.get_by_role("button", name="Revoke Practitioner/dr-a").click()
    dialog.get_by_role("button", name="Revoke").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#grants-status")).to_contain_text(
        "Practitioner/dr-a can no longer see your data."
    )
    expect(page.locator("#grants-status")).to_be_focused()
    expect(row).to_contain_text("Revoked")
    expect(page.get_by_role("button", name="Revoke Practitioner/dr-a")).to_have_count(0)
    with clinic.consent() as store:
        assert store.get(dr_a).status is ConsentStatus.INACTIVE  # type: ignore[union-attr]
    refused = clinic.call("GET", "/fhir/Observation", clinic.clinician("Practitioner/dr-a"),
                          params={"patient": "pt-1"})  # fmt: skip
    assert refused.status_code == 403 and "revoked" in refused.text

    # Revoked elsewhere meanwhile: the page shows the service's reason.
    with clinic.consent() as store:
        store.revoke(b.grant_id, actor="Organization/ops")
    page.get_by_role("button", name="Revoke Practitioner/dr-b").click()
    dialog.get_by_role("button", name="Revoke").click()
    expect(page.locator("#grants-status [role=alert]")).to_contain_text(
        f"grant {b.grant_id} was already revoked"
    )
    expect(row_b).to_contain_text("Revoked")


def _log_row(page: Page, seq: int) -> Any:
    return page.locator(f"#log tbody tr[data-seq='{seq}']")


def _seqs(page: Page) -> list[int]:
    return [int(s) for s in page.locator("#log tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.seq).filter(Boolean)")]  # fmt: skip


def _records(clinic: Clinic, patient: str) -> list[Any]:
    with AuditLog(clinic.settings.paths.audit_path, readonly=True) as audit:
        return audit.records(patient_id=patient)


def test_reads_and_break_glass_are_in_the_log_pending_then_anchored(
    clinic: Clinic, page: Page, tmp_path: Path
) -> None:
    _grant(clinic, "pt-2", "Practitioner/dr-c", {ALL_VITALS}, "TREAT")
    dr_c = clinic.clinician("Practitioner/dr-c")
    read = clinic.call("GET", "/fhir/Observation", dr_c, params={"patient": "pt-2"})
    assert read.status_code == 200 and read.json()["total"] == 60
    er = clinic.clinician("Practitioner/dr-er")
    reason = "collapsed in the waiting room, unresponsive"
    opened = clinic.call("POST", "/break-glass", er, json={"patient": "pt-2", "reason": reason})
    assert opened.status_code == 201, opened.text
    glass_seq = opened.json()["audit_seq"]
    assert (
        clinic.call("GET", "/fhir/Observation", er, params={"patient": "pt-2"}).json()["total"]
        == 60
    )
    records = _records(clinic, "pt-2")
    (read_rec,) = [r for r in records if r.actor == "Practitioner/dr-c" and r.action == "read"]
    (er_read,) = [r for r in records if r.actor == "Practitioner/dr-er" and r.action == "read"]

    sign_in(page, clinic.url, clinic.patient("pt-2"), PAGE_PATH)
    expect(page.locator("body[data-ready=true]")).to_have_count(1)
    seqs = _seqs(page)
    assert seqs == sorted((r.seq for r in records), reverse=True)  # all of them, newest first
    read_row = _log_row(page, read_rec.seq)
    expect(read_row).to_contain_text("Practitioner/dr-c")
    expect(read_row).to_contain_text("Read your history")
    expect(read_row.locator("td").nth(3)).to_have_text("60")
    expect(read_row).to_contain_text("treatment (TREAT)")
    expect(read_row).to_contain_text("Allowed")
    expect(read_row.locator(".badge", has_text="Break-glass")).to_have_count(0)
    glass = _log_row(page, glass_seq)
    expect(glass).to_have_class("break-glass")
    expect(glass.locator(".badge", has_text="Break-glass")).to_be_visible()
    expect(glass).to_contain_text(f"Reason given: {reason}")
    expect(glass).to_contain_text("Practitioner/dr-er")
    expect(_log_row(page, er_read.seq).locator(".badge", has_text="Break-glass")).to_be_visible()
    for seq in seqs:
        expect(_log_row(page, seq).locator(".badge", has_text="Pending")).to_be_visible()
    expect(page.get_by_role("button", name="Download proof")).to_have_count(0)

    receipt = clinic.anchor_audit()
    later = clinic.call("GET", "/fhir/Observation", dr_c, params={"patient": "pt-2"})
    assert later.status_code == 200
    page.reload()
    expect(page.locator("body[data-ready=true]")).to_have_count(1)
    (newest, *older) = _seqs(page)
    expect(_log_row(page, newest).locator(".badge", has_text="Pending")).to_be_visible()
    assert older == seqs
    for seq in older:
        expect(_log_row(page, seq).locator(".badge", has_text="Anchored")).to_be_visible()
    expect(glass).to_contain_text(receipt.tx_hash[:10])

    # The break-glass record's proof: it verifies offline, and its anchor is on the chain.
    with page.expect_download() as dl:
        glass.get_by_role("button", name="Download proof").click()
    assert dl.value.suggested_filename == f"disclosure-{glass_seq}.json"
    doc = json.loads(Path(dl.value.path()).read_text())
    verify_disclosure_proof(doc)
    assert doc["record"]["seq"] == glass_seq and doc["record"]["reason"] == reason
    assert doc["anchor"]["tx_hash"] == receipt.tx_hash
    anchor = dataclasses.asdict(AnchorReceipt.from_json_dict(doc["anchor"]))
    anchor.pop("gas_used")
    check_anchor_on_chain(Web3(Web3.HTTPProvider(clinic.rpc_url)), **anchor)
    pending = clinic.call("GET", f"/api/disclosures/{newest}/proof", clinic.patient("pt-2"))
    assert pending.status_code == 404 and "no anchored checkpoint" in pending.text

    check_accessibility(page)
    screenshot(page, "patient", tmp_path)


def test_a_patient_sees_only_their_own_records(clinic: Clinic, page: Page) -> None:
    _grant(clinic, "pt-2", "Practitioner/dr-zed", {"spo2"}, "TREAT")
    zed = clinic.clinician("Practitioner/dr-zed")
    assert (
        clinic.call("GET", "/fhir/Observation", zed, params={"patient": "pt-2"}).json()["total"]
        == 30
    )
    theirs = [r.seq for r in _records(clinic, "pt-2")]
    pt1 = clinic.patient("pt-1")

    refused = clinic.call("GET", "/api/disclosures", pt1, params={"patient": "pt-2"})
    assert refused.status_code == 403
    assert "may not read another patient's disclosure log" in refused.text
    assert "dr-zed" not in refused.text
    proof = clinic.call("GET", f"/api/disclosures/{theirs[-1]}/proof", pt1)
    assert proof.status_code == 403 and "dr-zed" not in proof.text
    # The refusals are in pt-2's log (someone tried), not in pt-1's.
    (attempt, *_) = [r for r in _records(clinic, "pt-2") if r.actor == "Patient/pt-1"]
    assert attempt.outcome == "refused"

    sign_in(page, clinic.url, pt1, PAGE_PATH)
    expect(page.locator("body[data-ready=true]")).to_have_count(1)
    mine = {r.seq for r in _records(clinic, "pt-1")}
    shown = _seqs(page)
    assert shown and set(shown) <= mine and not set(shown) & set(theirs)
    expect(page.locator("#log")).not_to_contain_text("dr-zed")
    # A clinician has no disclosure log of anyone's.
    assert (
        clinic.call("GET", "/api/disclosures", zed, params={"patient": "pt-2"}).status_code == 403
    )


def test_the_log_loads_older_records_on_demand(clinic: Clinic, page: Page) -> None:
    nosy = clinic.clinician("Practitioner/dr-nosy")
    with httpx.Client(base_url=clinic.url, headers={"Authorization": f"Bearer {nosy}"}) as http:
        for _ in range(60):  # no grant: each try is refused, and audited
            assert http.get("/fhir/Observation", params={"patient": "pt-3"}).status_code == 403

    sign_in(page, clinic.url, clinic.patient("pt-3"), PAGE_PATH)
    expect(page.locator("#log tbody tr")).to_have_count(50)
    expect(page.locator("#log tbody tr").first).to_contain_text("Refused")
    expect(page.locator("#log tbody tr").first).to_contain_text("no grant from patient pt-3")
    expect(page.get_by_role("cell", name="You share your data with nobody.")).to_be_visible()
    page.get_by_role("button", name="Load more").click()
    expect(page.locator("#log tbody tr")).to_have_count(60)
    expect(page.get_by_role("button", name="Load more")).to_be_hidden()
    assert _seqs(page) == sorted((r.seq for r in _records(clinic, "pt-3")), reverse=True)
    too_many = clinic.call(
        "GET", "/api/disclosures", clinic.patient("pt-3"), params={"limit": 10_000}
    )
    assert too_many.status_code == 422


def test_proof_status_names_the_anchor_and_trusts_no_log_that_no_longer_matches(
    tmp_path: Path,
) -> None:
    """The rule behind the badges, without the browser: covered by an anchored checkpoint is
    anchored (with its checkpoint and transaction), after it pending; once a record below an
    anchored checkpoint is rewritten, nothing is called anchored and the reason names it."""
    settings = Settings(paths=PathSettings(home=tmp_path), chain=ChainSettings(kind="embedded"))
    audit_path = settings.paths.audit_path
    with AuditLog(audit_path) as audit:
        filled(audit, 5)
    receipt = anchor_audit(settings, Chain.embedded())
    assert receipt is not None
    with AuditLog(audit_path) as audit:
        filled(audit, 1)  # record 6: after the anchored checkpoint
    ctx = ServiceContext.open(settings)
    try:
        status = proof_status(ctx)
        assert status.problem is None
        assert status.of(3) == {
            "status": "anchored",
            "checkpoint": "audit-5",
            "log_index": 0,
            "tree_size": 1,
            "tx_hash": receipt.tx_hash,
            "block_number": receipt.block_number,
            "chain_id": receipt.chain_id,
        }
        assert status.of(5)["status"] == "anchored"
        assert status.of(6) == {"status": "pending"}
    finally:
        ctx.close()

    rewrite_from(audit_path, 2)  # the chain verifies again; the anchored root does not
    ctx = ServiceContext.open(settings)
    try:
        status = proof_status(ctx)
        assert status.problem is not None and "audit-5" in status.problem
        assert status.of(3)["status"] == "unverified"
    finally:
        ctx.close()


def test_proof_status_is_read_once_until_the_merkle_log_grows_then_pending_turns_anchored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disclosure log asks for the proof status on every page; the logs are read again
    only when the Merkle log's files change (or the audit log shrinks, or the status is
    PROOF_STATUS_MAX_AGE_S old), so pending still becomes anchored once the anchor job runs."""
    settings = Settings(paths=PathSettings(home=tmp_path), chain=ChainSettings(kind="embedded"))
    with AuditLog(settings.paths.audit_path) as audit:
        filled(audit, 5)
    reads: list[int] = []
    real = patient_routes._read_proof_status
    monkeypatch.setattr(
        patient_routes, "_read_proof_status", lambda ctx: reads.append(1) or real(ctx)
    )
    now = [1_000.0]
    ctx = ServiceContext.open(settings)
    ctx.clock = lambda: now[0]
    try:
        assert proof_status(ctx).of(3) == {"status": "pending"}
        filled(ctx.audit, 2)  # the log grows: still pending, nothing to re-read
        assert proof_status(ctx).of(3) == {"status": "pending"} and len(reads) == 1
        receipt = anchor_audit(settings, Chain.embedded())  # a checkpoint and its anchor
        assert receipt is not None
        status = proof_status(ctx)
        assert len(reads) == 2
        assert status.of(3)["status"] == "anchored" and status.of(7)["status"] == "anchored"
        assert status.of(3)["tx_hash"] == receipt.tx_hash
        assert proof_status(ctx) is status and len(reads) == 2
        now[0] += patient_routes.PROOF_STATUS_MAX_AGE_S
        assert proof_status(ctx).of(3)["status"] == "anchored" and len(reads) == 3
    finally:
        ctx.close()
