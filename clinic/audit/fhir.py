"""Audit records as FHIR R4 ``AuditEvent`` resources (also valid R4B; R5 renamed fields).

The mapping follows the FHIR AuditEvent guidance and IHE BALP's shape for RESTful access:

* ``type``/``subtype``: a DICOM or HL7 event type for the kind of event, plus our own action
  code (system :data:`ACTION_SYSTEM`) so the record's action survives the round trip;
* ``action``: the CRUDE code (R read, E execute, C create, U update, D delete);
* ``recorded``: the record's time, to the microsecond; ``outcome`` 0 (success) for an
  allowed disclosure, 4 (minor failure: refused, nothing disclosed) for a refusal, with the
  reason in ``outcomeDesc``;
* ``purposeOfEvent`` and the agent's ``purposeOfUse``: the HL7 v3 ActReason (TREAT, BTG...);
* ``agent``: who (a FHIR reference such as ``Practitioner/dr-a``) in which role;
* ``entity``: the patient (role 1, Patient) and what was disclosed (its query or stream,
  with the count and the record's place in the hash chain as details: seq, hash,
  prev_hash), so a FHIR export still names the record a checker must find.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from clinic.audit.records import AuditAction, AuditRecord, Outcome

__all__ = ["ACTION_SYSTEM", "to_fhir_audit_event", "to_fhir_bundle"]

ACTION_SYSTEM = "urn:vitalproof:audit-action"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL = "http://hl7.org/fhir/restful-interaction"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
ROLE_SYSTEM = "urn:vitalproof:role"

# action -> (type coding, restful subtype or None, CRUDE action)
_TYPES: dict[AuditAction, tuple[dict[str, str], str | None, str]] = {
    AuditAction.READ: (
        {"system": AUDIT_EVENT_TYPE, "code": "rest", "display": "RESTful Operation"},
        "search-type",
        "E",
    ),
    AuditAction.STREAM: ({"system": DCM, "code": "110106", "display": "Export"}, None, "R"),
    AuditAction.PROOF: (
        {"system": AUDIT_EVENT_TYPE, "code": "rest", "display": "RESTful Operation"},
        "read",
        "R",
    ),
    AuditAction.SUBSCRIBE: (
        {"system": AUDIT_EVENT_TYPE, "code": "rest", "display": "RESTful Operation"},
        "create",
        "C",
    ),
    AuditAction.CONSENT: (
        {"system": AUDIT_EVENT_TYPE, "code": "rest", "display": "RESTful Operation"},
        "update",
        "U",
    ),
    AuditAction.BREAK_GLASS: (
        {"system": DCM, "code": "110113", "display": "Security Alert"},
        None,
        "E",
    ),
    AuditAction.ERASURE: (
        {"system": DCM, "code": "110110", "display": "Patient Record"},
        None,
        "D",
    ),
}


def _instant(time_us: int) -> str:
    t = dt.datetime.fromtimestamp(time_us // 1_000_000, tz=dt.UTC)
    t = t.replace(microsecond=time_us % 1_000_000)  # exact, not through a float
    return t.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _who(actor: str) -> dict[str, Any]:
    """A FHIR reference when the actor is one (``Type/id``), else an identifier."""
    kind, _, ident = actor.partition("/")
    if ident and kind[:1].isupper() and kind.isalpha():
        return {"reference": actor}
    return {"identifier": {"system": "urn:vitalproof:actor", "value": actor}}


def _purpose(code: str) -> list[dict[str, Any]]:
    return [{"coding": [{"system": ACT_REASON, "code": code}]}]


def to_fhir_audit_event(rec: AuditRecord) -> dict[str, Any]:
    """One record as a FHIR R4 AuditEvent (a plain dict, ready for ``json.dumps``)."""
    type_coding, subtype, crude = _TYPES[rec.action]
    subtypes: list[dict[str, str]] = [
        {"system": ACTION_SYSTEM, "code": rec.action.value},
    ]
    if subtype is not None:
        subtypes.insert(0, {"system": RESTFUL, "code": subtype})
    agent: dict[str, Any] = {
        "type": {"coding": [{"system": ROLE_SYSTEM, "code": rec.role}]},
        "who": _who(rec.actor),
        "requestor": rec.role != "system",
    }
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": f"audit-{rec.seq}",
        "type": type_coding,
        "subtype": subtypes,
        "action": crude,
        "recorded": _instant(rec.time_us),
        "outcome": "0" if rec.outcome is Outcome.ALLOWED else "4",
        "outcomeDesc": rec.reason,
        "agent": [agent],
        "source": {
            "observer": {"display": "vitalproof"},
            "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
    }
    if rec.purpose is not None:
        event["purposeOfEvent"] = _purpose(rec.purpose)
        agent["purposeOfUse"] = _purpose(rec.purpose)
    entities: list[dict[str, Any]] = []
    if rec.patient_id is not None:
        entities.append(
            {
                "what": {"reference": f"Patient/{rec.patient_id}"},
                "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
                "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"},
            }
        )
    entities.append(
        {
            "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
            "description": rec.what,
            "detail": [
                {"type": "count", "valueString": str(rec.count)},
                {"type": "seq", "valueString": str(rec.seq)},
                {"type": "time_us", "valueString": str(rec.time_us)},
                {"type": "prev_hash", "valueString": rec.prev_hash},
                {"type": "hash", "valueString": rec.hash},
            ],
        }
    )
    event["entity"] = entities
    return event


def to_fhir_bundle(records: list[AuditRecord]) -> dict[str, Any]:
    """Records as one FHIR Bundle of type ``collection`` (what ``audit list --fhir`` prints)."""
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": f"urn:vitalproof:audit:{r.seq}", "resource": to_fhir_audit_event(r)}
            for r in records
        ],
    }
