"""Grants as FHIR ``Consent`` resources: export as R4, import R4 (and R4B) or R5.

Export (:func:`consent_to_fhir`): one grant version -> one R4 Consent: scope
``patient-privacy``, category LOINC 59284-0, ``patient``, ``dateTime`` (when this version was
recorded), ``policyRule`` OPTIN, and one ``provision`` of type ``permit`` with the grantee as
its actor (role IRCP, information recipient), its ``period`` (the end is the expiry), its
``purpose`` (an HL7 v3 ActReason code) and its ``code``: one CodeableConcept per metric with
the LOINC codings of the lake's FHIR export (:data:`streams.lake.export.FHIR_MAP`, the blood
pressure components of ``FHIR_BP``) plus a ``urn:vitalproof:metric`` coding, so the metric
comes back exactly; no ``code`` at all means all vitals. Revocation is ``status: inactive``.
The grant id travels as an identifier (and as the resource id when it is a FHIR id), the
version as ``meta.versionId``, who recorded it in an extension.

Import (:func:`grant_from_fhir`): the document is validated with ``fhir.resources`` (the
R4B model for an R4 shape: R4B's Consent is R4's; the default R5 model for an R5 shape, whose
``provision`` is a list and whose permit/deny is ``decision``), then read field by field.
Anything that would make the grant narrower than vitalproof can enforce is refused rather
than dropped, so an import never grants more than the document says: a **deny provision is
an error** ("deny provisions are not supported"; vitalproof has no deny rules, and reading
one as a permit, or ignoring it, would disclose what the patient refused), as are nested
provisions, ``data``, ``dataPeriod``, ``class``, ``securityLabel``, actions other than
access/use/disclose, and modifier extensions. A metric given only by LOINC code maps to
every metric that code names in the export map (8867-4 is heart rate and pulse rate).

FHIR reads a period's end as inclusive to its precision; vitalproof's end is exclusive. A
date-only end therefore imports as the following midnight, and a full dateTime end as that
instant (a grant at most one second narrower than FHIR's reading; never wider).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import pydantic

from clinic.consent import (
    ALL_VITALS,
    METRICS,
    PURPOSES,
    ConsentStatus,
    Grant,
    InvalidConsent,
    iso_from_us,
    new_grant_id,
    parse_grantee,
)
from streams.lake.export import FHIR_BP, FHIR_MAP
from streams.lake.export.fhir import LOINC, PATIENT_ID_SYSTEM

__all__ = ["ACT_REASON", "METRIC_SYSTEM", "consent_to_fhir", "grant_from_fhir"]

ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
METRIC_SYSTEM = "urn:vitalproof:metric"
CONSENT_ID_SYSTEM = "urn:vitalproof:consent-id"
RECORDED_BY_EXTENSION = "urn:vitalproof:fhir:extension:recorded-by"
_ID_SYS, _BY_EXT = CONSENT_ID_SYSTEM, RECORDED_BY_EXTENSION
PATIENT_CONSENT_LOINC = "59284-0"

_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_CODES = {**FHIR_MAP, **FHIR_BP}
#: LOINC code -> the metrics the export map gives it (as main or additional coding).
_LOINC_METRICS: dict[str, frozenset[str]] = {}
for _metric, _code in _CODES.items():
    for _loinc, _display in _code.codings:
        _LOINC_METRICS[_loinc] = _LOINC_METRICS.get(_loinc, frozenset()) | {_metric}
_ALLOWED_ACTIONS = frozenset({"access", "use", "disclose"})
#: Provision fields that narrow a permit in ways vitalproof does not enforce.
_NARROWING: tuple[str, ...] = ("data", "dataPeriod", "class", "class_fhir", "securityLabel")
_NARROWING += ("documentType", "resourceType", "expression", "provision")
#: Fields only an R5 Consent has.
_R5_ONLY: tuple[str, ...] = ("decision", "subject", "grantee", "grantor", "date", "controller")
_R5_ONLY += ("manager", "period", "regulatoryBasis", "policyBasis", "policyText")


# -- export ---------------------------------------------------------------------------------


def _metric_concept(metric: str) -> dict[str, Any]:
    code = _CODES.get(metric)
    codings = [_concept(LOINC, c, d)["coding"][0] for c, d in code.codings] if code else []
    codings.append({"system": METRIC_SYSTEM, "code": metric})
    return {"coding": codings, "text": metric if code is None else code.text}


def _patient_reference(patient_id: str) -> dict[str, Any]:
    # Registry ids allow '_', FHIR ids do not: keep the id exact as a logical reference.
    if _FHIR_ID.fullmatch(patient_id):
        return {"reference": f"Patient/{patient_id}"}
    return {"type": "Patient", "identifier": {"system": PATIENT_ID_SYSTEM, "value": patient_id}}


def _concept(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    coding = {"system": system, "code": code} | ({"display": display} if display else {})
    return {"coding": [coding]}


def consent_to_fhir(grant: Grant) -> dict[str, Any]:
    """One grant version as an R4 ``Consent`` resource (a JSON-ready dict)."""
    period = {"start": iso_from_us(grant.start_us)}
    if grant.end_us is not None:
        period["end"] = iso_from_us(grant.end_us)
    provision: dict[str, Any] = {
        "type": "permit",
        "period": period,
        "actor": [
            {
                "role": _concept(PARTICIPATION_TYPE, "IRCP", "information recipient"),
                "reference": {"reference": grant.grantee},
            }
        ],
        "purpose": [_concept(ACT_REASON, grant.purpose, PURPOSES[grant.purpose])["coding"][0]],
    }
    if not grant.all_vitals:
        provision["code"] = [_metric_concept(m) for m in sorted(grant.metrics)]
    doc: dict[str, Any] = {"resourceType": "Consent"}
    if _FHIR_ID.fullmatch(grant.grant_id):
        doc["id"] = grant.grant_id
    return doc | {
        "meta": {"versionId": str(grant.version), "lastUpdated": iso_from_us(grant.recorded_us)},
        "extension": [{"url": RECORDED_BY_EXTENSION, "valueString": grant.recorded_by}],
        "identifier": [{"system": CONSENT_ID_SYSTEM, "value": grant.grant_id}],
        "status": grant.status.value,
        "scope": _concept(CONSENT_SCOPE, "patient-privacy", "Privacy Consent"),
        "category": [_concept(LOINC, PATIENT_CONSENT_LOINC, "Patient Consent")],
        "patient": _patient_reference(grant.patient_id),
        "dateTime": iso_from_us(grant.recorded_us),
        "policyRule": _concept(ACT_CODE, "OPTIN"),
        "provision": provision,
    }


# -- import ---------------------------------------------------------------------------------


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if part == "root":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + ("class" if part == "class_fhir" else str(part))
    return out or "(document)"


def _say(error: Mapping[str, Any]) -> str:
    msg = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    kind = error.get("type")
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown field"
    if msg.startswith("Input should be a valid datetime"):
        return f"not a dateTime ({msg.partition(', ')[2] or msg})"
    for name in ("DateTime", "Instant", "Date"):
        if msg.startswith(f"{name} value") and "regex" in msg:
            return f"not a {name[0].lower()}{name[1:]}"
    return msg


def _validate(doc: dict[str, Any], r5: bool) -> None:
    if r5:
        from fhir.resources.consent import Consent as Model
    else:
        from fhir.resources.R4B.consent import Consent as Model  # type: ignore[assignment]
    try:
        Model.model_validate(doc)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        raise InvalidConsent(_say(first), field=_where(tuple(first["loc"]))) from None


def _parse_time(text: Any, field: str, *, end: bool) -> int:
    """A FHIR dateTime -> microseconds: its first instant, or for an end the first instant
    after it (a partial date covers its whole year, month or day)."""
    if not isinstance(text, str):
        _bad(field, "not a dateTime")
    try:
        if len(text) in (4, 7, 10):
            year, month, day = ([int(p) for p in text.split("-")] + [1, 1])[:3]
            t = dt.datetime(year, month, day, tzinfo=dt.UTC)
            if end:
                if len(text) == 4:
                    t = t.replace(year=year + 1)
                elif len(text) == 7:
                    t = (t + dt.timedelta(days=32)).replace(day=1)
                else:
                    t += dt.timedelta(days=1)
        else:
            m = re.fullmatch(r"([^.]+)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
            if m is None:
                raise ValueError(text)
            t = dt.datetime.fromisoformat(m[1] + m[3].replace("Z", "+00:00"))
            if t.tzinfo is None:
                raise ValueError(text)
            t = t.replace(microsecond=int((m[2] or "0")[:6].ljust(6, "0")))
    except ValueError:
        raise InvalidConsent("not a dateTime", field=field) from None
    delta = t - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _bad(field: str, message: str) -> NoReturn:
    raise InvalidConsent(message, field=field)


def _patient(ref: Any, field: str) -> str:
    if not isinstance(ref, dict):
        _bad(field, "required (the patient who consents)")
    if "reference" in ref:
        kind, _, ident = str(ref["reference"]).partition("/")
        if kind != "Patient" or not ident:
            _bad(f"{field}.reference", f"{ref['reference']!r} is not Patient/<id>")
        return ident
    logical = ref.get("identifier") or {}
    if logical.get("system") != PATIENT_ID_SYSTEM or not logical.get("value"):
        _bad(f"{field}.identifier", f"Patient/<id>, or an identifier of {PATIENT_ID_SYSTEM}")
    return str(logical["value"])


def _grantee(actors: Any, field: str) -> str:
    if not actors:
        _bad(field, "required: the practitioner or organisation granted access")
    if len(actors) != 1:
        _bad(field, f"{len(actors)} actors: one grantee per Consent is supported")
    ref = actors[0].get("reference")
    if not isinstance(ref, dict):  # R5 Consent.grantee holds the references themselves
        ref = actors[0]
    text = ref.get("reference")
    if not isinstance(text, str):
        _bad(f"{field}[0].reference", "required: Practitioner/<id> or Organization/<id>")
    return parse_grantee(text, field=f"{field}[0].reference")


def _purpose(codings: Any, field: str) -> str:
    ours = [(i, c) for i, c in enumerate(codings or ()) if c.get("system") == ACT_REASON]
    if len(ours) != 1:
        _bad(field, f"exactly one code of system {ACT_REASON} is needed")
    i, coding = ours[0]
    if coding.get("code") not in PURPOSES:
        _bad(
            f"{field}[{i}].code",
            f"unknown purpose {coding.get('code')!r}: use an HL7 v3 PurposeOfUse code such "
            "as TREAT, ETREAT, HRESCH, BTG",
        )
    return str(coding["code"])


def _metrics(concepts: Any, field: str) -> frozenset[str]:
    if not concepts:
        return frozenset({ALL_VITALS})
    out: set[str] = set()
    for i, concept in enumerate(concepts):
        codings = concept.get("coding") or []
        ours = [c.get("code") for c in codings if c.get("system") == METRIC_SYSTEM]
        for name in ours:  # ours is exact: it wins over any LOINC coding beside it
            if name not in METRICS:
                _bad(f"{field}[{i}].coding", f"unknown metric {name!r}")
        loinc = [c.get("code") for c in codings if c.get("system") == LOINC]
        found = set(ours) or {m for c in loinc for m in _LOINC_METRICS.get(c, ())}
        if not found:
            known = ", ".join(sorted(_LOINC_METRICS))
            _bad(f"{field}[{i}]", f"no metric vitalproof knows (LOINC codes: {known})")
        out |= found
    return frozenset(out)


def _check_narrowing(provision: dict[str, Any], field: str) -> None:
    if provision.get("modifierExtension"):
        _bad(f"{field}.modifierExtension", "modifier extensions are not supported")
    for name in _NARROWING:
        if provision.get(name):
            what = "nested provisions (exceptions) are" if name == "provision" else "it is"
            _bad(
                f"{field}.{'class' if name == 'class_fhir' else name}",
                f"not supported: {what} a restriction vitalproof cannot enforce",
            )
    for i, action in enumerate(provision.get("action") or ()):
        codes = {c.get("code") for c in action.get("coding") or ()}
        if not codes or not codes <= _ALLOWED_ACTIONS:
            _bad(f"{field}.action[{i}]", "only access, use and disclose actions are supported")


#: What the two shapes say: (provision, patient, actors, period, recorded time, and the paths
#: of the provision, the actors, the period and the time for error messages).
_Parts = tuple[dict[str, Any], str, Any, dict[str, Any], Any, tuple[str, str, str, str]]


def _r4_parts(body: dict[str, Any]) -> _Parts:
    prov = body.get("provision") or {}
    if prov.get("type", "permit") == "deny":
        _bad("provision.type", "deny provisions are not supported")
    patient = _patient(body.get("patient"), "patient")
    paths = ("provision", "provision.actor", "provision.period", "dateTime")
    return prov, patient, prov.get("actor"), prov.get("period") or {}, body.get("dateTime"), paths


def _r5_parts(body: dict[str, Any]) -> _Parts:
    if body.get("decision", "permit") == "deny":
        _bad("decision", "deny provisions are not supported")
    provisions = body.get("provision") or [{}]
    if len(provisions) != 1:
        _bad("provision", f"{len(provisions)} provisions: one is supported")
    prov = provisions[0]
    patient = _patient(body.get("subject"), "subject")
    actors, afield = prov.get("actor"), "provision[0].actor"
    if not actors:
        actors, afield = body.get("grantee"), "grantee"
    period, tfield = prov.get("period"), "provision[0].period"
    if not period:
        period, tfield = body.get("period") or {}, "period"
    return prov, patient, actors, period, body.get("date"), ("provision[0]", afield, tfield, "date")


def grant_from_fhir(
    doc: Mapping[str, Any] | str | bytes, *, new_id: Callable[[], str] = new_grant_id
) -> Grant:
    """A FHIR Consent (R4/R4B or R5; a dict or JSON text) -> the grant it describes.

    Raises :class:`~clinic.consent.InvalidConsent` naming the field. The grant id is the
    document's ``urn:vitalproof:consent-id`` identifier, else its id, else ``new_id()``.
    """
    if isinstance(doc, str | bytes):
        try:
            doc = json.loads(doc)
        except ValueError as e:
            _bad("(document)", f"not JSON ({e})")
    if not isinstance(doc, Mapping):
        _bad("(document)", "a FHIR Consent is a JSON object")
    body = dict(doc)
    if body.get("resourceType") != "Consent":
        _bad("resourceType", f"expected 'Consent', got {body.get('resourceType')!r}")
    r5 = isinstance(body.get("provision"), list) or any(k in body for k in _R5_ONLY)
    _validate(body, r5)
    if body.get("modifierExtension"):
        _bad("modifierExtension", "modifier extensions are not supported")
    status = body.get("status")
    if status not in (ConsentStatus.ACTIVE.value, ConsentStatus.INACTIVE.value):
        _bad("status", f"{status!r} is not supported (active or inactive)")

    prov, patient, actors, period, recorded_text, (pfield, afield, tfield, rfield) = (
        _r5_parts(body) if r5 else _r4_parts(body)
    )
    _check_narrowing(prov, pfield)
    grantee = _grantee(actors, afield)
    purpose = _purpose(prov.get("purpose"), f"{pfield}.purpose")
    metrics = _metrics(prov.get("code"), f"{pfield}.code")
    recorded = None if recorded_text is None else _parse_time(recorded_text, rfield, end=False)
    if "start" in period:
        start = _parse_time(period["start"], f"{tfield}.start", end=False)
    elif recorded is not None:
        start = recorded
    else:
        _bad(f"{tfield}.start", f"required (or {rfield})")
    end = None if "end" not in period else _parse_time(period["end"], f"{tfield}.end", end=True)
    if end is not None and end <= start:
        _bad(f"{tfield}.end", "the period ends before it starts")

    ids = [i.get("value") for i in body.get("identifier") or () if i.get("system") == _ID_SYS]
    version_text = str((body.get("meta") or {}).get("versionId", "1"))
    by = [e.get("valueString") for e in body.get("extension") or () if e.get("url") == _BY_EXT]
    try:
        return Grant(
            grant_id=str(ids[0] if ids else body.get("id") or new_id()),
            version=int(version_text) if version_text.isdigit() else 1,
            patient_id=patient,
            grantee=grantee,
            metrics=metrics,
            purpose=purpose,
            start_us=start,
            end_us=end,
            status=ConsentStatus(status),
            recorded_us=start if recorded is None else recorded,
            recorded_by=str(by[0]) if by and by[0] else "fhir-import",
        )
    except InvalidConsent as e:  # a grant's field -> the document's
        where = {
            "grant_id": "identifier" if ids else "id",
            "patient_id": "subject" if r5 else "patient",
        }
        raise InvalidConsent(e.reason, field=where.get(e.field or "", e.field)) from None
