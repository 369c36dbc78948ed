"""The Open mHealth export: one data point (header + body) per reading.

Open mHealth: one data point per reading, or per systolic/diastolic pair; the CLI writes them
one per line. Schemas are the omh ones (``../shared/standards/openmhealth``). Open mHealth
units are not UCUM (``beats/min``, ``C``, ``mmHg``); the mapping table converts.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from streams.lake.export.rows import Row, Skipped, _has_value, _rows, _split_bp
from vitalproof.units import Metric

__all__ = ["OMH_BP", "OMH_MAP", "OmhMapping", "omh_data_points"]


@dataclass(frozen=True, slots=True)
class OmhMapping:
    """How one metric becomes an Open mHealth body."""

    name: str  # schema name, e.g. heart-rate
    version: str
    field: str  # body property holding the unit value
    unit: str  # Open mHealth unit (not UCUM)
    extra: tuple[tuple[str, str], ...] = ()  # constant body properties


OMH_MAP: dict[str, OmhMapping] = {
    Metric.HEART_RATE.value: OmhMapping("heart-rate", "2.0", "heart_rate", "beats/min"),
    Metric.PULSE_RATE.value: OmhMapping("heart-rate", "2.0", "heart_rate", "beats/min"),
    Metric.SPO2.value: OmhMapping(
        "oxygen-saturation",
        "2.0",
        "oxygen_saturation",
        "%",
        (("system", "peripheral capillary"), ("measurement_method", "pulse oximetry")),
    ),
    Metric.BODY_TEMPERATURE.value: OmhMapping("body-temperature", "3.0", "body_temperature", "C"),
    Metric.RESPIRATORY_RATE.value: OmhMapping(
        "respiratory-rate", "2.0", "respiratory_rate", "breaths/min"
    ),
    Metric.BODY_WEIGHT.value: OmhMapping("body-weight", "2.0", "body_weight", "kg"),
    Metric.BODY_HEIGHT.value: OmhMapping("body-height", "1.0", "body_height", "m"),
    Metric.BMI.value: OmhMapping("body-mass-index", "2.0", "body_mass_index", "kg/m^2"),
    Metric.BLOOD_GLUCOSE.value: OmhMapping("blood-glucose", "3.0", "blood_glucose", "mg/dL"),
    Metric.RR_INTERVAL.value: OmhMapping("rr-interval", "1.0", "rr_interval", "ms"),
    # step-count needs a time interval: handled by _step_points
    Metric.STEP_COUNT.value: OmhMapping("step-count", "3.0", "step_count", "steps"),
}
OMH_BP = OmhMapping("blood-pressure", "3.1", "", "mmHg")


def _omh_header(row: Row, m: OmhMapping, reading_ids: Sequence[str]) -> dict[str, Any]:
    header: dict[str, Any] = {
        "id": str(uuid.UUID(hex=row["reading_id"])),
        # When the reading reached the system that stores it: deterministic, unlike "now".
        "creation_date_time": row["receive_time"],
        "schema_id": {"namespace": "omh", "name": m.name, "version": m.version},
        "acquisition_provenance": {
            "source_name": row["device_id"],
            "source_data_point_id": ",".join(reading_ids),
            "modality": "sensed",
        },
        "user_id": row["patient_id"],
    }
    return header


def _omh_point(row: Row, m: OmhMapping) -> dict[str, Any]:
    body: dict[str, Any] = {
        m.field: {"value": row["value"], "unit": m.unit},
        "effective_time_frame": {"date_time": row["device_time"]},
    }
    body.update(m.extra)
    return {"header": _omh_header(row, m, [row["reading_id"]]), "body": body}


def _step_points(rows: list[Row], skipped: Skipped) -> list[dict[str, Any]]:
    """Step counts are counts since the device's previous report: an interval, as omh wants.

    The interval runs from the previous step report of the same device to this one, so the
    first report of each device in the export has no known start and is skipped (counted).
    """
    m = OMH_MAP[Metric.STEP_COUNT.value]
    out = []
    prev: dict[str, str] = {}
    for row in sorted(rows, key=lambda r: (r["device_id"], r["device_time_us"], r["seq"])):
        start = prev.get(row["device_id"])
        prev[row["device_id"]] = row["device_time"]
        if start is None or start == row["device_time"]:
            skipped["step_count without a previous report (interval start unknown)"] += 1
            continue
        body = {
            m.field: {"value": row["value"], "unit": m.unit},
            "effective_time_frame": {
                "time_interval": {"start_date_time": start, "end_date_time": row["device_time"]}
            },
        }
        out.append({"header": _omh_header(row, m, [row["reading_id"]]), "body": body})
    return out


def omh_data_points(table: pa.Table) -> tuple[list[dict[str, Any]], Skipped]:
    """Open mHealth data points (header + body) of the lake rows, and what was skipped.

    Open mHealth has no "absent value": readings flagged INVALID are skipped and counted, as
    are unmapped metrics, blood pressure without both systolic and diastolic, and the first
    step report of a device (see :func:`_step_points`). Quality flags other than INVALID have
    no place in the omh schemas; use the FHIR or tabular exports when they matter.
    """
    other, groups = _split_bp(list(_rows(table)))
    out: list[dict[str, Any]] = []
    skipped = Skipped()
    steps: list[Row] = []
    for row in other:
        m = OMH_MAP.get(row["metric"])
        if m is None:
            skipped[f"no Open mHealth mapping for {row['metric']}"] += 1
        elif not _has_value(row):
            skipped[f"{row['metric']} flagged INVALID (no value)"] += 1
        elif row["metric"] == Metric.STEP_COUNT.value:
            steps.append(row)
        else:
            out.append(_omh_point(row, m))
    out.extend(_step_points(steps, skipped))
    for g in groups:
        if g.mean is not None:
            skipped["no Open mHealth mapping for mean_arterial_pressure"] += 1
        pair = [r for r in (g.systolic, g.diastolic) if r is not None]
        if not pair:
            continue
        if len(pair) < 2 or not all(_has_value(r) for r in pair):
            skipped["blood pressure without a valid systolic/diastolic pair"] += len(pair)
            continue
        s, d = pair
        body = {
            "systolic_blood_pressure": {"value": s["value"], "unit": OMH_BP.unit},
            "diastolic_blood_pressure": {"value": d["value"], "unit": OMH_BP.unit},
            "effective_time_frame": {"date_time": s["device_time"]},
        }
        header = _omh_header(s, OMH_BP, [s["reading_id"], d["reading_id"]])
        out.append({"header": header, "body": body})
    out.sort(key=lambda p: (_effective(p), p["header"]["id"]))
    return out, skipped


def _effective(point: dict[str, Any]) -> str:
    tf = point["body"]["effective_time_frame"]
    return str(tf.get("date_time") or tf["time_interval"]["end_date_time"])
