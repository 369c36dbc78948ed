"""The FHIR R4 export: vital-sign Observations in one Bundle.

FHIR: one Bundle of type ``collection`` (not NDJSON): a single document that a FHIR server, a
validator or ``fhir.resources`` accepts as is. Observations follow the R4 vital-signs profile
(category ``vital-signs``, LOINC codes, UCUM quantities). Systolic and diastolic readings of
one device at one device time become one blood-pressure panel (85354-9) with components
8480-6 and 8462-4 (and 8478-0 when the device also reported the mean pressure).
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from streams.lake.export.rows import (
    _MAP_METRIC,
    Row,
    Skipped,
    _BpGroup,
    _has_value,
    _rows,
    _split_bp,
    quality_names,
)
from vitalproof.units import Metric

__all__ = [
    "FHIR_BP",
    "FHIR_MAP",
    "FhirCode",
    "fhir_bundle",
    "fhir_observations",
    "reading_observation",
]

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DATA_ABSENT_REASON = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
#: Identifier systems and extension URL: URNs, because vitalproof owns no web domain.
READING_ID_SYSTEM = "urn:vitalproof:reading-id"
PATIENT_ID_SYSTEM = "urn:vitalproof:patient-id"
DEVICE_ID_SYSTEM = "urn:vitalproof:device-id"
QUALITY_EXTENSION = "urn:vitalproof:fhir:extension:quality"
READING_ID_EXTENSION = "urn:vitalproof:fhir:extension:reading-id"  # on panel components

_FHIR_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@dataclass(frozen=True, slots=True)
class FhirCode:
    """How one metric becomes a FHIR Observation (or a panel component)."""

    codings: tuple[tuple[str, str], ...]  # (LOINC code, display); the first is the main one
    text: str
    ucum: str  # valueQuantity.code (UCUM)
    unit: str  # valueQuantity.unit (for people)
    scale: float = 1.0  # lake canonical unit -> ucum (1 unless the profile wants another)


#: Vital signs per the FHIR R4 vital-signs profiles. Units are the profiles' UCUM codes, which
#: are the lake's canonical units except body height (profile allows cm or [in_i]).
FHIR_MAP: dict[str, FhirCode] = {
    Metric.HEART_RATE.value: FhirCode(
        (("8867-4", "Heart rate"),), "Heart rate", "/min", "beats/minute"
    ),
    Metric.PULSE_RATE.value: FhirCode(
        (("8867-4", "Heart rate"), ("8889-8", "Heart rate by Pulse oximetry")),
        "Pulse rate",
        "/min",
        "beats/minute",
    ),
    Metric.SPO2.value: FhirCode(
        (
            ("2708-6", "Oxygen saturation in Arterial blood"),
            ("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry"),
        ),
        "Oxygen saturation",
        "%",
        "%",
    ),
    Metric.BODY_TEMPERATURE.value: FhirCode(
        (("8310-5", "Body temperature"),), "Body temperature", "Cel", "C"
    ),
    Metric.RESPIRATORY_RATE.value: FhirCode(
        (("9279-1", "Respiratory rate"),), "Respiratory rate", "/min", "breaths/minute"
    ),
    Metric.BODY_WEIGHT.value: FhirCode((("29463-7", "Body weight"),), "Body weight", "kg", "kg"),
    Metric.BODY_HEIGHT.value: FhirCode(
        (("8302-2", "Body height"),), "Body height", "cm", "cm", scale=100.0
    ),
    Metric.BMI.value: FhirCode(
        (("39156-5", "Body mass index (BMI) [Ratio]"),), "BMI", "kg/m2", "kg/m2"
    ),
}

#: The blood-pressure panel and its components (metric -> component code).
FHIR_BP_PANEL = (("85354-9", "Blood pressure panel with all children optional"),)
FHIR_BP: dict[str, FhirCode] = {
    Metric.SYSTOLIC_BP.value: FhirCode(
        (("8480-6", "Systolic blood pressure"),), "Systolic", "mm[Hg]", "mmHg"
    ),
    Metric.DIASTOLIC_BP.value: FhirCode(
        (("8462-4", "Diastolic blood pressure"),), "Diastolic", "mm[Hg]", "mmHg"
    ),
    Metric.MEAN_ARTERIAL_PRESSURE.value: FhirCode(
        (("8478-0", "Mean blood pressure"),), "Mean", "mm[Hg]", "mmHg"
    ),
}


def _codeable(code: FhirCode | tuple[tuple[str, str], ...], text: str) -> dict[str, Any]:
    codings = code.codings if isinstance(code, FhirCode) else code
    return {
        "coding": [{"system": LOINC, "code": c, "display": d} for c, d in codings],
        "text": text,
    }


def _reference(kind: str, ident: str, system: str) -> dict[str, Any]:
    """``Kind/<id>`` when the id is a valid FHIR id, else a logical reference by identifier.

    Lake ids allow ``_``, ``@`` and ``+``, which FHIR ids do not; a logical reference keeps
    the (pseudonymous) id exact instead of mangling it.
    """
    if _FHIR_ID_RE.match(ident):
        return {"reference": f"{kind}/{ident}"}
    return {"type": kind, "identifier": {"system": system, "value": ident}}


def _value_or_absent(row: Row, code: FhirCode) -> dict[str, Any]:
    if not _has_value(row):
        # Quality.INVALID: the device sent an IEEE-11073 special value, not a number.
        return {
            "dataAbsentReason": {
                "coding": [{"system": DATA_ABSENT_REASON, "code": "not-a-number"}],
                "text": "the device reported no numeric value (flagged INVALID)",
            }
        }
    value = row["value"] * code.scale if code.scale != 1.0 else row["value"]
    return {
        "valueQuantity": {
            "value": value,
            "unit": code.unit,
            "system": UCUM,
            "code": code.ucum,
        }
    }


def _quality_extension(row: Row) -> dict[str, Any] | None:
    mask = int(row["quality"])
    if not mask:
        return None
    return {
        "url": QUALITY_EXTENSION,
        "extension": [
            {"url": "mask", "valueInteger": mask},
            *({"url": "flag", "valueCode": n.lower()} for n in quality_names(mask)),
        ],
    }


def _obs_id(reading_id: str) -> str:
    return f"vp-{reading_id}"


def _observation(
    rows: Sequence[Row], code: FhirCode | tuple[tuple[str, str], ...], text: str
) -> dict[str, Any]:
    """The skeleton shared by single-reading and panel Observations."""
    first = rows[0]
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": _obs_id(first["reading_id"]),
        "identifier": [{"system": READING_ID_SYSTEM, "value": r["reading_id"]} for r in rows],
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": OBSERVATION_CATEGORY,
                        "code": "vital-signs",
                        "display": "Vital Signs",
                    }
                ],
                "text": "Vital Signs",
            }
        ],
        "code": _codeable(code, text),
        "subject": _reference("Patient", first["patient_id"], PATIENT_ID_SYSTEM),
        "effectiveDateTime": first["device_time"],
        "issued": max(r["receive_time"] for r in rows),
        "device": _reference("Device", first["device_id"], DEVICE_ID_SYSTEM),
    }
    exts = [e for r in rows if (e := _quality_extension(r)) is not None]
    flagged = sorted({n for r in rows for n in quality_names(int(r["quality"]))})
    if exts and len(rows) == 1:
        obs["extension"] = exts
    if flagged:
        obs["note"] = [{"text": f"vitalproof quality flags: {', '.join(flagged)}"}]
    return obs


def _single(row: Row, code: FhirCode) -> dict[str, Any]:
    obs = _observation([row], code, code.text)
    obs.update(_value_or_absent(row, code))
    return obs


def _panel(group: _BpGroup) -> dict[str, Any]:
    obs = _observation(group.members, FHIR_BP_PANEL, "Blood pressure")
    components = []
    for metric, row in (
        (Metric.SYSTOLIC_BP.value, group.systolic),
        (Metric.DIASTOLIC_BP.value, group.diastolic),
        (Metric.MEAN_ARTERIAL_PRESSURE.value, group.mean),
    ):
        code = FHIR_BP[metric]
        comp: dict[str, Any]
        if row is None:
            if metric == _MAP_METRIC:
                continue  # optional; the profile requires systolic and diastolic only
            comp = {
                "code": _codeable(code, code.text),
                "dataAbsentReason": {
                    "coding": [{"system": DATA_ABSENT_REASON, "code": "unknown"}],
                    "text": "not in the lake for this device and time",
                },
            }
        else:
            comp = {"code": _codeable(code, code.text), **_value_or_absent(row, code)}
            ext = _quality_extension(row)
            comp["extension"] = [
                {
                    "url": READING_ID_EXTENSION,
                    "valueIdentifier": {"system": READING_ID_SYSTEM, "value": row["reading_id"]},
                },
                *([ext] if ext else []),
            ]
        components.append(comp)
    obs["component"] = components
    return obs


def reading_observation(row: Row) -> dict[str, Any] | None:
    """One reading as its own FHIR Observation (a live stream sends readings one by one, so
    blood pressure comes as its component Observations, not as a panel); None if the metric
    has no vital-sign mapping. ``row`` has the keys of a lake row, times as ISO strings."""
    code = FHIR_MAP.get(row["metric"]) or FHIR_BP.get(row["metric"])
    return None if code is None else _single(row, code)


def fhir_observations(table: pa.Table) -> tuple[list[dict[str, Any]], Skipped]:
    """FHIR R4 Observations (as JSON-ready dicts) of the lake rows, and what was skipped.

    One Observation per mapped reading (:data:`FHIR_MAP`), one blood-pressure panel per
    (device, device time) group of systolic/diastolic/mean readings. A lone mean pressure
    (no systolic or diastolic beside it) and unmapped metrics are skipped and counted.
    """
    other, groups = _split_bp(list(_rows(table)))
    out: list[dict[str, Any]] = []
    skipped = Skipped()
    for row in other:
        code = FHIR_MAP.get(row["metric"])
        if code is None:
            skipped[f"no FHIR vital-sign mapping for {row['metric']}"] += 1
            continue
        out.append(_single(row, code))
    for g in groups:
        if g.systolic is None and g.diastolic is None:
            skipped["mean_arterial_pressure without systolic/diastolic"] += 1
            continue
        out.append(_panel(g))
    out.sort(key=lambda o: (o["effectiveDateTime"], o["id"]))
    return out, skipped


def _urn(reading_id: str) -> str:
    return f"urn:uuid:{uuid.UUID(hex=reading_id)}"


def fhir_bundle(
    table: pa.Table, *, timestamp: dt.datetime | None = None
) -> tuple[dict[str, Any], Skipped]:
    """A FHIR R4 Bundle of type ``collection`` holding :func:`fhir_observations`.

    ``fullUrl`` is ``urn:uuid:`` + the reading id read as a UUID (128 bits each), so it is
    stable across exports. ``timestamp`` defaults to now (UTC).
    """
    observations, skipped = fhir_observations(table)
    when = (timestamp or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": when.isoformat(timespec="seconds").replace("+00:00", "Z"),
        # no "total": bdl-1 allows it only in search and history bundles
        "entry": [
            {"fullUrl": _urn(o["identifier"][0]["value"]), "resource": o} for o in observations
        ],
    }
    return bundle, skipped
