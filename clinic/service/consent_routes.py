"""Consent through the API (FHIR ``Consent``), break-glass, and the proof of a reading.

Who may change consent: the patient (for themselves) and an operator acting for them; a
clinician reads the grants made to them. Every change is an audit record. Break-glass is a
grant like any other (purpose ``BTG``, every vital sign, one hour by default) made by the
clinician who states a reason: audited as ``break-glass``, shown in the patient's disclosure
log, and announced on ``vitals.events`` for an operator's alerting. Nothing of it is silent.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pyarrow.compute as pc
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from clinic.audit import AuditAction, Outcome
from clinic.auth import Principal, Role
from clinic.consent import ALL_VITALS, ConsentConflict, Grant, InvalidConsent, iso_from_us
from clinic.consent_audit import record_consent_change
from clinic.erasure import AlreadyErased, InvalidPatientId, UnknownPatient, erase_patient
from clinic.fhir_consent import consent_to_fhir, grant_from_fhir
from clinic.proofs import LakeView, ProofExportError
from clinic.service import disclosure
from clinic.service.context import ServiceContext
from clinic.service.deps import FHIR_JSON, Ctx, Who
from clinic.service.fhir_routes import searchset
from clinic.service.refusal import outcome
from streams import lake

log = logging.getLogger(__name__)
router = APIRouter()

#: Break-glass access lasts this long unless asked for less (never more).
BREAK_GLASS_MINUTES = 60
BREAK_GLASS_MIN_REASON = 10


def _json(body: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON)


def _may_manage(who: Principal, patient_id: str) -> bool:
    return who.role is Role.OPERATOR or (who.role is Role.PATIENT and who.patient_id == patient_id)


def _visible(who: Principal, grant: Grant) -> bool:
    if who.role is Role.OPERATOR:
        return True
    if who.role is Role.PATIENT:
        return who.patient_id == grant.patient_id
    return who.subject == grant.grantee


def audit_consent(ctx: ServiceContext, who: Principal, grant: Grant, change: str) -> None:
    record_consent_change(
        ctx.audit, actor=who.subject, role=who.role.value, grant=grant, change=change
    )


@router.get("/fhir/Consent")
async def search_consent(request: Request, ctx: Ctx, who: Who) -> JSONResponse:
    q = request.query_params
    patient = (q.get("patient") or "").removeprefix("Patient/") or None
    grantee = q.get("actor")
    if who.role is Role.PATIENT:
        patient = who.patient_id
    elif who.role is Role.CLINICIAN:
        grantee = who.subject
    grants = ctx.consent.grants(patient_id=patient, grantee=grantee)
    return _json(searchset([consent_to_fhir(g) for g in grants if _visible(who, g)]))


@router.get("/fhir/Consent/{grant_id}")
async def read_consent(grant_id: str, ctx: Ctx, who: Who) -> JSONResponse:
    grant = ctx.consent.get(grant_id)
    if grant is None or not _visible(who, grant):
        return _json(outcome("not-found", f"no Consent {grant_id} visible to you"), 404)
    return _json(consent_to_fhir(grant))


@router.post("/fhir/Consent")
async def create_consent(request: Request, ctx: Ctx, who: Who) -> JSONResponse:
    body = await request.body()
    try:
        grant = grant_from_fhir(body)
    except InvalidConsent as e:
        return _json(outcome("invalid", str(e)) | {"field": e.field}, 422)
    if not _may_manage(who, grant.patient_id) or not who.may("Consent", "c"):
        disclosure.refuse(
            ctx, who, grant.patient_id, AuditAction.CONSENT, "create Consent",
            f"{who.subject} may not record consent for patient {grant.patient_id}",
        )  # fmt: skip
    try:
        stored, changed = ctx.consent.import_grant(grant, actor=who.subject)
    except ConsentConflict as e:
        return _json(outcome("conflict", str(e)), 409)
    if changed:
        audit_consent(ctx, who, stored, "granted" if stored.version == 1 else "changed")
    return _json(consent_to_fhir(stored), 201 if changed else 200)


@router.delete("/fhir/Consent/{grant_id}")
async def revoke_consent(grant_id: str, ctx: Ctx, who: Who) -> JSONResponse:
    """Revocation: a new version with status ``inactive`` (history is kept)."""
    grant = ctx.consent.get(grant_id)
    if grant is None or not _visible(who, grant):
        return _json(outcome("not-found", f"no Consent {grant_id} visible to you"), 404)
    if not _may_manage(who, grant.patient_id):
        disclosure.refuse(
            ctx, who, grant.patient_id, AuditAction.CONSENT, f"revoke Consent {grant_id}",
            f"{who.subject} may not revoke patient {grant.patient_id}'s consent",
        )  # fmt: skip
    try:
        revoked = ctx.consent.revoke(grant_id, actor=who.subject)
    except ConsentConflict as e:
        return _json(outcome("conflict", str(e)), 409)
    audit_consent(ctx, who, revoked, "revoked")
    return _json(consent_to_fhir(revoked))


@router.post("/break-glass")
async def break_glass(request: Request, ctx: Ctx, who: Who) -> JSONResponse:
    """Body: ``{"patient": "P", "reason": "why, in words", "minutes": 60}``."""
    try:
        body = await request.json()
    except ValueError:
        return _json(outcome("invalid", "body: not JSON"), 422)
    patient = str(body.get("patient") or "") if isinstance(body, dict) else ""
    reason = str(body.get("reason") or "").strip() if isinstance(body, dict) else ""
    minutes = body.get("minutes", BREAK_GLASS_MINUTES) if isinstance(body, dict) else 0
    if not patient:
        return _json(outcome("invalid", "patient: required"), 422)
    if len(reason) < BREAK_GLASS_MIN_REASON:
        return _json(
            outcome("invalid", f"reason: say why, in at least {BREAK_GLASS_MIN_REASON} characters"),
            422,
        )
    if not isinstance(minutes, int) or not 1 <= minutes <= BREAK_GLASS_MINUTES:
        return _json(outcome("invalid", f"minutes: 1 to {BREAK_GLASS_MINUTES}"), 422)
    if who.role is not Role.CLINICIAN:
        disclosure.refuse(
            ctx, who, patient, AuditAction.BREAK_GLASS, f"break-glass {patient}",
            "only a clinician may open emergency access",
        )  # fmt: skip
    now = ctx.now_us()
    grant = ctx.consent.grant(
        patient_id=patient,
        grantee=who.subject,
        metrics=frozenset({ALL_VITALS}),
        purpose="BTG",
        start_us=now,
        end_us=now + minutes * 60_000_000,
        actor=who.subject,
    )
    record = ctx.audit.append(
        actor=who.subject,
        role=who.role.value,
        patient_id=patient,
        action=AuditAction.BREAK_GLASS,
        what=f"emergency access {grant.grant_id} until {iso_from_us(grant.end_us or now)}",
        purpose="BTG",
        outcome=Outcome.ALLOWED,
        reason=reason,
    )
    alerted = await _announce(ctx, grant, who, reason)
    return _json(
        {
            "grant": grant.grant_id,
            "patient": patient,
            "until": iso_from_us(grant.end_us or now),
            "seconds_left": minutes * 60,
            "discloses": "every vital sign of the patient, live and history, until then",
            "shown_to_patient": True,
            "audit_seq": record.seq,
            "operator_alerted": alerted,
        },
        201,
    )


async def _announce(ctx: ServiceContext, grant: Grant, who: Principal, reason: str) -> bool:
    """The break-glass event on vitals.events (no health data: who, whom, why, until)."""
    settings = ctx.settings
    event = {
        "kind": "break_glass",
        "grant": grant.grant_id,
        "patient": grant.patient_id,
        "actor": who.subject,
        "reason": reason,
        "until": iso_from_us(grant.end_us or 0),
    }
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap, acks="all", request_timeout_ms=5000
    )
    try:
        await producer.start()
        try:
            await producer.send_and_wait(
                settings.kafka.topic_events,
                json.dumps(event).encode(),
                key=grant.patient_id.encode(),
            )
        finally:
            await producer.stop()
    except (KafkaError, OSError) as e:
        log.error("break-glass %s: the operator alert was not sent: %s", grant.grant_id, e)
        return False
    return True


@router.get("/proof/{reading_id}")
async def proof(reading_id: str, request: Request, ctx: Ctx, who: Who) -> JSONResponse:
    """The proof bundle of one reading the caller may see (``?patient=P``), so a clinician
    can show that the number they acted on is what the device sent."""
    patient = (request.query_params.get("patient") or "").removeprefix("Patient/")
    if not patient:
        return _json(outcome("invalid", "patient: required"), 422)
    what = f"proof of reading {reading_id}"
    table = ctx.read_patient(patient, None, None, None)
    hit = table.filter(pc.equal(lake.hex_ids(table["reading_id"]), reading_id))
    metric = str(hit["metric"][0]) if hit.num_rows else None
    allowed, reason = disclosure.allowed_metrics(
        ctx, who, patient, [metric] if metric else [], ctx.now_us()
    )
    if metric is None or metric not in allowed.metrics:
        disclosure.refuse(
            ctx, who, patient, AuditAction.PROOF, what,
            reason or f"no reading {reading_id} of patient {patient} visible to you",
        )  # fmt: skip
    try:
        bundle = LakeView(ctx.settings).bundle(
            reading_id, hit.slice(0, 1).to_pylist()[0] | {"reading_id": reading_id}
        )
    except ProofExportError as e:
        return _json(outcome("not-found", str(e)), 404)
    disclosure.disclosed(ctx, who, patient, AuditAction.PROOF, what, allowed.purpose, 1)
    return JSONResponse(json.loads(bundle.to_json()))


@router.post("/patients/{patient_id}/$erase")
async def erase(patient_id: str, request: Request, ctx: Ctx, who: Who) -> JSONResponse:
    """Erasure for operators (body ``{"reason": "..."}``): the patient's keys destroyed, their
    grants revoked (which ends their streams), their devices retired, one audit record."""
    try:
        body = await request.json()
    except ValueError:
        body = {}
    reason = str(body.get("reason") or "").strip() if isinstance(body, dict) else ""
    if who.role is not Role.OPERATOR:
        disclosure.refuse(
            ctx, who, patient_id, AuditAction.ERASURE, f"erase {patient_id}",
            "only an operator may erase a patient",
        )  # fmt: skip
    if not reason:
        return _json(outcome("invalid", "reason: required"), 422)
    try:
        report = erase_patient(ctx.settings, patient_id, actor=who.subject, reason=reason)
    except (UnknownPatient, AlreadyErased) as e:
        return _json(outcome("not-found", str(e)), 404)
    except InvalidPatientId as e:
        return _json(outcome("invalid", str(e)), 422)
    request.app.state.hub.forget(patient_id)
    return _json(report.to_json_dict())
