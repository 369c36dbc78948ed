"""Exports of decrypted lake rows: CSV, JSON lines, plain Parquet, FHIR R4 and Open mHealth.

Every function here is pure: it takes an Arrow table with the lake's :data:`streams.lake.SCHEMA`
(what :func:`streams.lake.read_patient` returns) and writes to a binary sink or returns
documents. Reading and decrypting the lake is the caller's business (``vitalproof.cli.lake``),
so these functions are testable without a keystore and usable from notebooks.

**Every output of this module is plaintext health data.** The lake is encrypted per patient
for a reason; whoever exports takes over the duty to protect the result.

Tabular formats (CSV, JSON lines, Parquet) keep every lake row, including a reading sealed in
two batches (each row names its batch and leaf, which is what a proof needs). They are built
column-wise with Arrow compute: no Python object per sample. Dictionary-encoded string
columns are JSON-escaped once per *distinct* value and then gathered by index.

Standard formats (FHIR, Open mHealth) describe clinical facts, so they carry each reading id
once (the first row wins) and are built per reading, which is their nature. Readings without
a mapping are never dropped silently: every builder returns a :class:`Skipped` counter (reason
-> readings) that the CLI prints to stderr.

FHIR: one Bundle of type ``collection`` (not NDJSON): a single document that a FHIR server, a
validator or ``fhir.resources`` accepts as is. Observations follow the R4 vital-signs profile
(category ``vital-signs``, LOINC codes, UCUM quantities). Systolic and diastolic readings of
one device at one device time become one blood-pressure panel (85354-9) with components
8480-6 and 8462-4 (and 8478-0 when the device also reported the mean pressure).

Open mHealth: one data point (header + body) per reading, or per systolic/diastolic pair; the
CLI writes them one per line. Schemas are the omh ones (``../shared/standards/openmhealth``).
Open mHealth units are not UCUM (``beats/min``, ``C``, ``mmHg``); the mapping table converts.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import struct
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from streams.lake import SCHEMA, hex_ids
from vitalproof.schema import Quality
from vitalproof.units import Metric

__all__ = [
    "EXPORT_COLUMNS",
    "FHIR_BP",
    "FHIR_MAP",
    "OMH_BP",
    "OMH_MAP",
    "FhirCode",
    "OmhMapping",
    "Skipped",
    "fhir_bundle",
    "fhir_observations",
    "omh_data_points",
    "plain_table",
    "quality_names",
    "write_csv",
    "write_jsonl",
    "write_parquet",
]

#: Columns of the tabular exports, in order (times ISO 8601 UTC, reading_id as 32 hex chars).
EXPORT_COLUMNS = [
    "reading_id",
    "patient_id",
    "device_id",
    "metric",
    "value",
    "unit",
    "device_time",
    "receive_time",
    "seq",
    "quality",
    "quality_flags",
    "transport",
    "gateway_id",
    "tz_offset_min",
    "clock_offset_us",
    "batch_id",
    "leaf_index",
]

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # Arrow prints %S with the microseconds of the unit
_CHUNK_ROWS = 64 * 1024  # bounds memory of the string columns built per chunk
_FLAGS = [f for f in Quality if f.value]  # single flags, in bit order

#: One reading as the per-reading (FHIR, Open mHealth) builders see it.
Row = dict[str, Any]


class Skipped(Counter[str]):
    """Readings left out of a standard export: reason -> count. Never silent."""

    def describe(self) -> str:
        """One line for stderr, e.g. ``3 readings: no FHIR mapping for rr_interval (3)``."""
        n = self.total()
        parts = ", ".join(f"{reason} ({k})" for reason, k in sorted(self.items()))
        return f"{n} reading{'s' if n != 1 else ''}: {parts}"


def quality_names(mask: int) -> list[str]:
    """Names of the :class:`Quality` flags set in ``mask``, in bit order (``[]`` when clean)."""
    return [f.name for f in _FLAGS if mask & f.value and f.name is not None]


# -- tabular exports (column-wise) -----------------------------------------------------------


def _iso(ts: pa.Array) -> pa.Array:
    """timestamp[us, UTC] -> ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` strings, in one compute call."""
    return pc.strftime(ts, format=_TIME_FORMAT)


def _by_distinct(col: pa.Array, render: Any, out_type: pa.DataType) -> pa.Array:
    """Apply ``render`` (Python) to each *distinct* value of ``col`` and gather by index.

    Health columns have few distinct values per chunk (devices, metrics, units, quality
    masks), so this costs a handful of Python calls per chunk instead of one per sample.
    """
    enc = col if pa.types.is_dictionary(col.type) else pc.dictionary_encode(col)
    rendered = pa.array([render(v) for v in enc.dictionary.to_pylist()], out_type)
    return rendered.take(enc.indices)


def _chunks(table: pa.Table) -> Iterator[pa.RecordBatch]:
    _check_schema(table)
    yield from table.to_batches(max_chunksize=_CHUNK_ROWS)


def _check_schema(table: pa.Table) -> None:
    missing = [f.name for f in SCHEMA if f.name not in table.column_names]
    if missing:
        raise ValueError(f"not a lake table: missing columns {missing}")


def _plain_batch(rb: pa.RecordBatch) -> pa.RecordBatch:
    cols: dict[str, pa.Array] = {}
    for name in EXPORT_COLUMNS:
        if name == "reading_id":
            cols[name] = hex_ids(rb["reading_id"])
        elif name in ("device_time", "receive_time"):
            cols[name] = _iso(rb[name])
        elif name == "quality_flags":
            cols[name] = _by_distinct(
                rb["quality"], lambda q: "|".join(quality_names(q)), pa.string()
            )
        elif pa.types.is_dictionary(rb[name].type):
            cols[name] = rb[name].cast(pa.string())
        else:
            cols[name] = rb[name]
    return pa.RecordBatch.from_pydict(cols)


def plain_table(table: pa.Table) -> pa.Table:
    """The lake rows as people read them: hex ids, ISO 8601 UTC times, named quality flags.

    Columns are :data:`EXPORT_COLUMNS`. ``quality_flags`` is ``|``-separated flag names
    (empty when clean); ``value`` is null for readings flagged INVALID. ``clock_offset_us``
    is the device clock's estimated offset (streams.clock) when the row arrived:
    ``device_time + clock_offset_us`` is the reading's time on the receiving clock.
    """
    batches = [_plain_batch(rb) for rb in _chunks(table)]
    if not batches:  # keep the header (and types) of an empty export
        batches = [_plain_batch(pa.RecordBatch.from_pylist([], schema=SCHEMA))]
    return pa.Table.from_batches(batches)


def write_csv(table: pa.Table, sink: BinaryIO) -> int:
    """CSV with a header row, one line per lake row; returns the number of rows written."""
    out = plain_table(table)
    pacsv.write_csv(out, sink, pacsv.WriteOptions(include_header=True))
    return out.num_rows


def _json_string(v: Any) -> str:
    return "null" if v is None else json.dumps(v, ensure_ascii=False)


def _json_number(col: pa.Array) -> pa.Array:
    """Numbers as JSON text; null, NaN and infinities as ``null`` (JSON has no NaN)."""
    text = pc.cast(col, pa.string())
    if pa.types.is_floating(col.type):
        text = pc.if_else(pc.is_finite(col), text, pa.scalar(None, pa.string()))
    return pc.fill_null(text, "null")


def _json_lines(rb: pa.RecordBatch) -> pa.Array:
    """One JSON object per row, built by concatenating JSON-encoded columns (column-wise)."""
    pieces: list[pa.Array | str] = []
    for i, name in enumerate(EXPORT_COLUMNS):
        pieces.append(("{" if i == 0 else ",") + json.dumps(name) + ":")
        if name == "reading_id":
            pieces.append(pc.binary_join_element_wise('"', hex_ids(rb[name]), '"', ""))
        elif name in ("device_time", "receive_time"):
            pieces.append(pc.binary_join_element_wise('"', _iso(rb[name]), '"', ""))
        elif name == "quality_flags":
            pieces.append(
                _by_distinct(rb["quality"], lambda q: json.dumps(quality_names(q)), pa.string())
            )
        elif pa.types.is_dictionary(rb[name].type) or pa.types.is_string(rb[name].type):
            pieces.append(pc.fill_null(_by_distinct(rb[name], _json_string, pa.string()), "null"))
        else:
            pieces.append(_json_number(rb[name]))
    pieces.append("}\n")
    return pc.binary_join_element_wise(*pieces, "")


def _string_data(arr: pa.Array) -> pa.Buffer:
    """The concatenated bytes of a string array's values (no copy, no Python strings)."""
    n, off = len(arr), arr.offset
    offsets = arr.buffers()[1]
    start = struct.unpack_from("<i", offsets, 4 * off)[0]
    end = struct.unpack_from("<i", offsets, 4 * (off + n))[0]
    data = arr.buffers()[2]
    return pa.py_buffer(b"") if data is None else data.slice(start, end - start)


def write_jsonl(table: pa.Table, sink: BinaryIO) -> int:
    """JSON lines: one object per lake row with the :data:`EXPORT_COLUMNS` keys.

    ``value``, ``tz_offset_min`` and ``clock_offset_us`` are numbers or null,
    ``quality_flags`` an array of flag names, times ISO 8601 UTC strings. Returns the number
    of rows written.
    """
    rows = 0
    for rb in _chunks(table):
        if rb.num_rows:
            sink.write(_string_data(_json_lines(rb)))
            rows += rb.num_rows
    return rows


def write_parquet(table: pa.Table, sink: BinaryIO | str) -> int:
    """A plain (UNENCRYPTED) Parquet copy of the rows, with the lake's schema and types.

    WARNING: the result is plaintext health data. The lake encrypts every file under the
    patient's key so that erasure works by destroying that key; a plaintext copy escapes
    erasure, access control and the audit trail. Write it only where the data may live.

    Lake types are kept (``reading_id`` as 16 raw bytes, ``streams.lake.hex_ids`` converts)
    so a copy can be compared with, or fed back to, lake tooling; use CSV or JSON for hex.
    """
    _check_schema(table)
    meta = dict(SCHEMA.metadata or {})
    meta[b"vitalproof.export"] = b"plaintext"
    out = table.select(SCHEMA.names).cast(SCHEMA).replace_schema_metadata(meta)
    pq.write_table(out, sink, compression="zstd")
    return out.num_rows


# -- standard exports: shared per-reading view -----------------------------------------------


def _rows(table: pa.Table) -> Iterator[Row]:
    """Each distinct reading once (first row wins), as a dict; times as ISO strings."""
    _check_schema(table)
    seen: set[str] = set()
    for rb in table.to_batches(max_chunksize=_CHUNK_ROWS):
        cols = {
            "reading_id": hex_ids(rb["reading_id"]).to_pylist(),
            "device_time": _iso(rb["device_time"]).to_pylist(),
            "receive_time": _iso(rb["receive_time"]).to_pylist(),
            "device_time_us": pc.cast(rb["device_time"], pa.int64()).to_pylist(),
        }
        for name in ("patient_id", "device_id", "metric", "value", "unit", "seq", "quality"):
            cols[name] = rb[name].to_pylist()
        for i in range(rb.num_rows):
            rid = cols["reading_id"][i]
            if rid in seen:
                continue
            seen.add(rid)
            yield {k: v[i] for k, v in cols.items()}


def _has_value(row: Row) -> bool:
    v = row["value"]
    return v is not None and v == v and v not in (float("inf"), float("-inf"))


_BP_METRICS = (Metric.SYSTOLIC_BP.value, Metric.DIASTOLIC_BP.value)
_MAP_METRIC = Metric.MEAN_ARTERIAL_PRESSURE.value


@dataclass
class _BpGroup:
    """Blood-pressure readings of one device at one device time, paired in seq order."""

    systolic: Row | None
    diastolic: Row | None
    mean: Row | None

    @property
    def first(self) -> Row:
        for r in (self.systolic, self.diastolic, self.mean):
            if r is not None:
                return r
        raise AssertionError("empty blood-pressure group")

    @property
    def members(self) -> list[Row]:
        return [r for r in (self.systolic, self.diastolic, self.mean) if r is not None]


def _split_bp(rows: Sequence[Row]) -> tuple[list[Row], list[_BpGroup]]:
    """(other readings, blood-pressure groups by (device, device time)).

    A device reports one measurement as simultaneous systolic, diastolic and (often) mean
    pressure with one device time; several at one time are paired in seq order.
    """
    other: list[Row] = []
    by_key: dict[tuple[str, int], dict[str, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["metric"] in _BP_METRICS or r["metric"] == _MAP_METRIC:
            by_key[(r["device_id"], r["device_time_us"])][r["metric"]].append(r)
        else:
            other.append(r)
    groups: list[_BpGroup] = []
    for parts in by_key.values():
        s, d, m = (
            sorted(parts.get(k, []), key=lambda r: r["seq"]) for k in (*_BP_METRICS, _MAP_METRIC)
        )
        for i in range(max(len(s), len(d), len(m))):
            groups.append(
                _BpGroup(
                    s[i] if i < len(s) else None,
                    d[i] if i < len(d) else None,
                    m[i] if i < len(m) else None,
                )
            )
    return other, groups


# -- FHIR R4 -----------------------------------------------------------------------------------

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


# -- Open mHealth ------------------------------------------------------------------------------


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
