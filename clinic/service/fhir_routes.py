"""The FHIR REST base (``/fhir``): CapabilityStatement, Observation search over the lake,
AuditEvent search over the audit log."""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from clinic.audit import AuditAction, to_fhir_audit_event
from clinic.auth import Role
from clinic.service import disclosure
from clinic.service.deps import FHIR_JSON, Ctx, Who
from clinic.service.search import BadSearch, date_range, metrics_for_codes
from streams.lake.export.fhir import fhir_observations

router = APIRouter()
FHIR_VERSION = "4.0.1"


def fhir(body: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON)


@router.get("/metadata")
async def metadata(request: Request) -> JSONResponse:
    """The CapabilityStatement: answered without a token, as FHIR requires."""
    base = str(request.base_url).rstrip("/") + "/fhir"
    return fhir(capability_statement(base))


def capability_statement(base: str) -> dict[str, Any]:
    def search(name: str, kind: str, doc: str) -> dict[str, str]:
        return {"name": name, "type": kind, "documentation": doc}

    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": dt.date.today().isoformat(),
        "kind": "instance",
        "software": {"name": "vitalproof"},
        "implementation": {"description": "vitalproof clinician service", "url": base},
        "fhirVersion": FHIR_VERSION,
        "format": ["json"],
        "rest": [
            {
                "mode": "server",
                "security": {
                    "service": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                    "code": "SMART-on-FHIR",
                                }
                            ]
                        }
                    ],
                    "description": "Bearer JWT (ES256); SMART v2 scopes; consent per reading",
                },
                "resource": [
                    {
                        "type": "Observation",
                        "profile": "http://hl7.org/fhir/StructureDefinition/vitalsigns",
                        "interaction": [{"code": "search-type"}],
                        "searchParam": [
                            search("patient", "reference", "required: one patient"),
                            search("date", "date", "ge/gt/le/lt/eq; repeat to narrow"),
                            search("code", "token", "LOINC codes, comma for OR"),
                        ],
                    },
                    {
                        "type": "Consent",
                        "interaction": [
                            {"code": "read"},
                            {"code": "search-type"},
                            {"code": "create"},
                            {"code": "delete"},
                        ],
                        "searchParam": [
                            search("patient", "reference", "whose consent"),
                            search("actor", "reference", "to whom"),
                        ],
                    },
                    {
                        "type": "Subscription",
                        "documentation": "R5 topic-based: channelType websocket or sse",
                        "interaction": [
                            {"code": "create"},
                            {"code": "read"},
                            {"code": "delete"},
                            {"code": "search-type"},
                        ],
                        "operation": [
                            {
                                "name": "events",
                                "definition": "http://hl7.org/fhir/OperationDefinition/Subscription-events",
                            },
                            {
                                "name": "status",
                                "definition": "http://hl7.org/fhir/OperationDefinition/Subscription-status",
                            },
                        ],
                    },
                    {
                        "type": "SubscriptionTopic",
                        "interaction": [{"code": "read"}, {"code": "search-type"}],
                    },
                    {
                        "type": "AuditEvent",
                        "interaction": [{"code": "search-type"}],
                        "searchParam": [search("patient", "reference", "whose disclosures")],
                    },
                ],
            }
        ],
    }


def _patient_param(value: str | None) -> str:
    if not value:
        raise BadSearch("patient: required (Observation search covers one patient at a time)")
    return value.removeprefix("Patient/")


@router.get("/Observation")
async def search_observations(request: Request, ctx: Ctx, who: Who) -> JSONResponse:
    q = request.query_params
    patient_id = _patient_param(q.get("patient") or q.get("subject"))
    what = f"Observation?{request.url.query}"
    if not who.may("Observation", "s", dict(q)):
        disclosure.refuse(
            ctx,
            who,
            patient_id,
            AuditAction.READ,
            what,
            "the token's scopes do not allow searching Observation",
        )
    start_us, end_us = date_range(q.getlist("date"))
    metrics = metrics_for_codes(q.getlist("code"))
    table = disclosure.history(
        ctx,
        who,
        patient_id=patient_id,
        start_us=start_us,
        end_us=end_us,
        metrics=metrics,
        what=what,
    )
    observations, _skipped = fhir_observations(table)
    return fhir(searchset(observations, str(request.url)))


def searchset(resources: list[dict[str, Any]], self_url: str | None = None) -> dict[str, Any]:
    """A FHIR searchset Bundle of ``resources`` (each a match, at ``Type/id``)."""
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
    }
    if self_url is not None:
        bundle["link"] = [{"relation": "self", "url": self_url}]
    bundle["entry"] = [
        {
            **({"fullUrl": f"{r['resourceType']}/{r['id']}"} if "id" in r else {}),
            "resource": r,
            "search": {"mode": "match"},
        }
        for r in resources
    ]
    return bundle


@router.get("/AuditEvent")
async def search_audit(request: Request, ctx: Ctx, who: Who) -> JSONResponse:
    """A patient reads their own disclosures; an operator any; a clinician their own acts."""
    q = request.query_params
    patient = q.get("patient")
    patient_id = patient.removeprefix("Patient/") if patient else None
    what = f"AuditEvent?{request.url.query}"
    if who.role is Role.PATIENT:
        if patient_id not in (None, who.patient_id):
            disclosure.refuse(
                ctx,
                who,
                patient_id,
                AuditAction.READ,
                what,
                f"a patient token for {who.patient_id} may not read another patient's audit",
            )
        records = ctx.audit.records(patient_id=who.patient_id)
    elif who.role is Role.OPERATOR:
        records = ctx.audit.records(patient_id=patient_id)
    else:
        records = ctx.audit.records(patient_id=patient_id, actor=who.subject)
    return fhir(searchset([to_fhir_audit_event(r) for r in records]))
