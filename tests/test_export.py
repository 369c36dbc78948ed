"""streams.lake.export: every format from a real encrypted lake, standards checked by validators.

FHIR: ``fhir.resources`` (R4B models; R4B's Observation and Bundle are R4's) parses the
Bundle and every Observation, and our own asserts pin LOINC codes, UCUM units and category,
which a structural parser cannot know. Open mHealth: ``jsonschema`` against the shared omh
schemas (``$VITALPROOF_SHARED/standards/openmhealth``, default ``<repo>/../shared``), with
``$ref`` resolved locally through a ``referencing.Registry``. Missing schemas FAIL the suite:
an export never checked against its standard is not an export.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import referencing
import referencing.jsonschema
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.observation import Observation

from streams import lake
from streams.lake import export
from streams.lake.export.fhir import QUALITY_EXTENSION
from streams.lake.keystore import LocalKeystore
from vitalproof.schema import Quality, SampleBatch, Transport

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VITALPROOF_SHARED", REPO.parent / "shared"))
OMH_DIR = SHARED / "standards" / "openmhealth" / "schema" / "omh"
OMH_TESTS = SHARED / "standards" / "openmhealth" / "test-data" / "omh"
OMH_BASE = "https://w3id.org/openmhealth/schemas/omh/"

T0 = 1_732_200_000_000_000  # 2024-11-21T14:40:00Z
US = 1_000_000
PATIENT = "patient-alpha"
ODD_DEVICE = 'cuff "7", ünïcode\\x'  # needs CSV quoting, JSON escaping, no FHIR id

# -- the lake under test ---------------------------------------------------------------------


def _watch() -> SampleBatch:
    b = SampleBatch(
        device_id="watch-1",
        patient_id=PATIENT,
        gateway_id="gw-test",
        transport=Transport.BLE,
        receive_time_us=T0 + 60 * US,
        tz_offset_min=60,
    )
    for i in range(4):
        t = T0 + i * US
        b.add("heart_rate", "/min", t, i, 61.0 + i, int(Quality.IMPLAUSIBLE) if i == 2 else 0)
        spo2, q = (math.nan, int(Quality.INVALID)) if i == 3 else (96.0 + i / 4, 0)
        b.add("spo2", "%", t, 100 + i, spo2, q)
        b.add("step_count", "{steps}", T0 + i * 10 * US, 200 + i, 10.0 * i)
    b.add("pulse_rate", "/min", T0, 300, 64.0)
    b.add("body_temperature", "Cel", T0, 301, 36.85, int(Quality.CONVERTED))
    b.add("respiratory_rate", "/min", T0, 302, 14.5)
    b.add("rr_interval", "ms", T0, 303, 812.0)
    b.add("skin_temperature", "Cel", T0, 304, 33.1)  # no mapping anywhere
    b.add("ppg", "1", T0, 305, 51234.0)  # no mapping anywhere
    b.fill_reading_ids()
    return b


def _cuff() -> SampleBatch:
    b = SampleBatch(
        device_id=ODD_DEVICE,
        patient_id=PATIENT,
        gateway_id="gw-test",
        transport=Transport.MQTT,
        receive_time_us=T0 + 120 * US,
        tz_offset_min=None,
    )
    t1, t2, t3 = T0 + 30 * US, T0 + 90 * US, T0 + 100 * US
    b.add("systolic_bp", "mm[Hg]", t1, 1, 121.0)
    b.add("diastolic_bp", "mm[Hg]", t1, 2, 79.0)
    b.add("mean_arterial_pressure", "mm[Hg]", t1, 3, 93.0)
    b.add("systolic_bp", "mm[Hg]", t2, 4, 135.0)  # its diastolic never arrived
    b.add("systolic_bp", "mm[Hg]", t3, 5, 118.0)
    b.add("diastolic_bp", "mm[Hg]", t3, 6, math.nan, int(Quality.INVALID))
    b.add("body_weight", "kg", t1, 7, 72.4)
    b.add("body_height", "m", t1, 8, 1.78)
    b.add("bmi", "kg/m2", t1, 9, 22.9)
    b.add("blood_glucose", "mg/dL", t1, 10, 98.0)
    b.fill_reading_ids()
    return b


@pytest.fixture
def lake_table(tmp_path: Path) -> pa.Table:
    """One patient's rows read back (decrypted) from a real lake of two batches.

    The second batch re-seals one heart-rate reading: tabular exports keep both rows, the
    standard exports carry the reading once.
    """
    kms = LocalKeystore(tmp_path / "keys")
    root = tmp_path / "lake"
    watch, cuff = _watch(), _cuff()
    lake.write_batch(root, "b-0001", lake.build_table([watch, cuff], "b-0001"), kms)
    again = SampleBatch(
        device_id="watch-1",
        patient_id=PATIENT,
        gateway_id="gw-test",
        transport=Transport.BLE,
        receive_time_us=T0 + 61 * US,
        tz_offset_min=60,
    )
    again.add("heart_rate", "/min", T0, 0, 61.0)
    again.fill_reading_ids()
    lake.write_batch(root, "b-0002", lake.build_table([again], "b-0002"), kms)
    return lake.read_patient(root, PATIENT, kms)


def _expected() -> dict[str, dict[str, Any]]:
    out = {}
    for b in (_watch(), _cuff()):
        for r in b.readings():
            out[r.reading_id] = {
                "device_id": r.device_id,
                "metric": r.metric,
                "value": r.value,
                "unit": r.unit,
                "device_time_us": r.device_time_us,
                "quality": r.quality,
                "seq": r.seq,
            }
    return out


def _iso_us(text: str) -> int:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", text), text
    t = dt.datetime.fromisoformat(text)
    assert t.utcoffset() == dt.timedelta(0)
    return (t - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)


# -- tabular ---------------------------------------------------------------------------------


def test_csv(lake_table: pa.Table) -> None:
    buf = io.BytesIO()
    assert export.write_csv(lake_table, buf) == lake_table.num_rows
    rows = list(csv.DictReader(io.StringIO(buf.getvalue().decode())))
    assert list(rows[0]) == export.EXPORT_COLUMNS
    assert len(rows) == lake_table.num_rows == len(_expected()) + 1  # + the re-sealed reading
    expected = _expected()
    for row in rows:
        e = expected[row["reading_id"]]
        assert re.fullmatch(r"[0-9a-f]{32}", row["reading_id"])
        assert row["device_id"] == e["device_id"]
        assert row["metric"] == e["metric"]
        assert row["unit"] == e["unit"]
        assert _iso_us(row["device_time"]) == e["device_time_us"]
        assert int(row["quality"]) == e["quality"]
        assert row["quality_flags"] == "|".join(export.quality_names(e["quality"]))
        if e["value"] is None:
            assert row["value"] == ""
        else:
            assert float(row["value"]) == e["value"]
        assert row["patient_id"] == PATIENT
    assert {r["batch_id"] for r in rows} == {"b-0001", "b-0002"}
    assert any(r["device_id"] == ODD_DEVICE for r in rows)  # quoted and back intact


def test_csv_empty_keeps_header() -> None:
    buf = io.BytesIO()
    assert export.write_csv(lake.SCHEMA.empty_table(), buf) == 0
    assert buf.getvalue().decode().strip() == ",".join(f'"{c}"' for c in export.EXPORT_COLUMNS)


def test_jsonl(lake_table: pa.Table) -> None:
    buf = io.BytesIO()
    assert export.write_jsonl(lake_table, buf) == lake_table.num_rows
    text = buf.getvalue().decode()
    assert text.endswith("\n")
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == lake_table.num_rows
    expected = _expected()
    for obj in lines:
        assert list(obj) == export.EXPORT_COLUMNS
        e = expected[obj["reading_id"]]
        assert (obj["device_id"], obj["metric"], obj["unit"], obj["seq"]) == (
            e["device_id"],
            e["metric"],
            e["unit"],
            e["seq"],
        )
        assert obj["value"] == e["value"]  # None for INVALID: JSON null, never NaN
        assert _iso_us(obj["device_time"]) == e["device_time_us"]
        assert obj["quality_flags"] == export.quality_names(e["quality"])
        assert obj["tz_offset_min"] in (60, None)
        assert isinstance(obj["leaf_index"], int)


def test_jsonl_matches_csv_and_table(lake_table: pa.Table) -> None:
    """The column-wise JSON builder agrees with Arrow's own view of every cell."""
    buf = io.BytesIO()
    export.write_jsonl(lake_table, buf)
    plain = export.plain_table(lake_table).to_pylist()
    for obj, row in zip(map(json.loads, buf.getvalue().decode().splitlines()), plain, strict=True):
        row["quality_flags"] = row["quality_flags"].split("|") if row["quality_flags"] else []
        assert obj == row


def test_parquet_is_plain_and_lossless(lake_table: pa.Table, tmp_path: Path) -> None:
    path = tmp_path / "out.parquet"
    assert export.write_parquet(lake_table, str(path)) == lake_table.num_rows
    back = pq.read_table(path)  # no keys needed: plaintext
    assert back.schema.metadata[b"vitalproof.export"] == b"plaintext"
    assert back.schema.remove_metadata().equals(lake.SCHEMA.remove_metadata())
    assert back.to_pylist() == lake_table.to_pylist()  # dictionaries may be re-unified


# -- FHIR ------------------------------------------------------------------------------------

LOINC_OF = {
    "heart_rate": ["8867-4"],
    "pulse_rate": ["8867-4", "8889-8"],
    "spo2": ["2708-6", "59408-5"],
    "body_temperature": ["8310-5"],
    "respiratory_rate": ["9279-1"],
    "body_weight": ["29463-7"],
    "body_height": ["8302-2"],
    "bmi": ["39156-5"],
}
UCUM_OF = {
    "8867-4": "/min",
    "2708-6": "%",
    "8310-5": "Cel",
    "9279-1": "/min",
    "29463-7": "kg",
    "8302-2": "cm",
    "39156-5": "kg/m2",
    "8480-6": "mm[Hg]",
    "8462-4": "mm[Hg]",
    "8478-0": "mm[Hg]",
}


def _quantity_ok(holder: dict[str, Any], loinc: str) -> None:
    q = holder["valueQuantity"]
    assert q["system"] == "http://unitsofmeasure.org"
    assert q["code"] == UCUM_OF[loinc]
    assert isinstance(q["value"], float)
    assert "dataAbsentReason" not in holder


def test_fhir_bundle(lake_table: pa.Table) -> None:
    bundle, skipped = export.fhir_bundle(lake_table)
    parsed = Bundle.model_validate(bundle)
    assert parsed.type == "collection"
    obs = [e["resource"] for e in bundle["entry"]]
    for o in obs:
        Observation.model_validate(o)
    # readings once each, even the one sealed twice
    ids = [i["value"] for o in obs for i in o["identifier"]]
    assert len(ids) == len(set(ids))
    assert len({e["fullUrl"] for e in bundle["entry"]}) == len(obs)

    expected = _expected()
    by_loinc: dict[str, list[dict[str, Any]]] = {}
    for o in obs:
        assert o["status"] == "final"
        assert o["category"][0]["coding"][0] == {
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "vital-signs",
            "display": "Vital Signs",
        }
        codes = [c["code"] for c in o["code"]["coding"]]
        assert all(c["system"] == "http://loinc.org" for c in o["code"]["coding"])
        by_loinc.setdefault(codes[0], []).append(o)
        first = expected[o["identifier"][0]["value"]]
        assert _iso_us(o["effectiveDateTime"]) == first["device_time_us"]
        if first["device_id"] == "watch-1":
            assert o["device"] == {"reference": "Device/watch-1"}
        else:  # not a valid FHIR id: a logical reference keeps it exact
            assert o["device"]["identifier"]["value"] == ODD_DEVICE
        assert o["subject"] == {"reference": f"Patient/{PATIENT}"}
        if codes[0] == "85354-9":
            continue
        metric = first["metric"]
        assert codes == LOINC_OF[metric]
        if first["value"] is None:
            assert "valueQuantity" not in o
            assert o["dataAbsentReason"]["coding"][0]["code"] == "not-a-number"
        else:
            _quantity_ok(o, codes[0])
            scale = 100.0 if metric == "body_height" else 1.0
            assert o["valueQuantity"]["value"] == pytest.approx(first["value"] * scale)
        if first["quality"]:
            ext = o["extension"][0]
            assert ext["url"] == QUALITY_EXTENSION
            assert ext["extension"][0] == {"url": "mask", "valueInteger": first["quality"]}
            assert "quality flags" in o["note"][0]["text"]

    assert len(by_loinc["8867-4"]) == 5  # 4 heart rate + 1 pulse rate
    assert len(by_loinc["2708-6"]) == 4
    assert len(by_loinc["8310-5"]) == 1
    assert len(by_loinc["9279-1"]) == 1

    panels = by_loinc["85354-9"]
    assert len(panels) == 3
    for p in panels:
        comps = {c["code"]["coding"][0]["code"]: c for c in p["component"]}
        assert {"8480-6", "8462-4"} <= set(comps)
        members = [expected[i["value"]] for i in p["identifier"]]
        assert len({(m["device_id"], m["device_time_us"]) for m in members}) == 1
        for loinc, c in comps.items():
            if "valueQuantity" in c:
                _quantity_ok(c, loinc)
    full = next(p for p in panels if len(p["component"]) == 3)
    values = {
        c["code"]["coding"][0]["code"]: c["valueQuantity"]["value"] for c in full["component"]
    }
    assert values == {"8480-6": 121.0, "8462-4": 79.0, "8478-0": 93.0}
    reasons = sorted(
        c["dataAbsentReason"]["coding"][0]["code"]
        for p in panels
        for c in p["component"]
        if "dataAbsentReason" in c
    )
    assert reasons == ["not-a-number", "unknown"]  # INVALID diastolic, missing diastolic

    assert dict(skipped) == {
        "no FHIR vital-sign mapping for step_count": 4,
        "no FHIR vital-sign mapping for rr_interval": 1,
        "no FHIR vital-sign mapping for skin_temperature": 1,
        "no FHIR vital-sign mapping for ppg": 1,
        "no FHIR vital-sign mapping for blood_glucose": 1,
    }


def test_fhir_observation_count_matches_skips(lake_table: pa.Table) -> None:
    obs, skipped = export.fhir_observations(lake_table)
    bp = sum(1 for o in obs if o["code"]["coding"][0]["code"] == "85354-9")
    readings_in_panels = sum(len(o["identifier"]) for o in obs if "component" in o)
    assert len(obs) - bp + readings_in_panels + skipped.total() == len(_expected())


# -- Open mHealth ----------------------------------------------------------------------------


def _pointer_target(pointer: Path, target: str) -> str:
    """The name of the file in the pointer's own folder that its relative ``target`` names."""
    folder = Path(os.path.normpath(pointer.parent))
    resolved = Path(os.path.normpath(folder / target))
    if resolved.parent != folder:
        pytest.fail(f"{pointer} points outside {folder}: {target!r}")
    return resolved.name


def _omh_registry() -> referencing.Registry:
    """Every omh schema under its w3id URI; ``N.x`` pointers resolved to local files.

    A pointer names the newest ``N.M`` file; when that one refers to IEEE 1752.1 schemas
    (not shipped here) the newest ``N.M`` without such references stands in (e.g.
    systolic-blood-pressure-1.x -> 1.0, as the shared README says). A few pointer files
    hold a schema instead of a name; they are used as they are.

    Pointers are symbolic links in a git checkout of the omh schemas, and small plain files
    holding the link's relative path where links were not kept (``core.symlinks=false``,
    archives, copies). Both are read as pointers: following a link as if it were the schema
    would bypass the IEEE fallback above and leave ``$ref``s to IEEE schemas unresolvable.
    """
    if not OMH_DIR.is_dir():
        pytest.fail(f"Open mHealth schemas not found at {OMH_DIR} (set VITALPROOF_SHARED)")
    docs: dict[str, Any] = {}
    pointers: dict[str, str] = {}
    for path in sorted(OMH_DIR.glob("*.json")):
        if path.is_symlink():
            pointers[path.name] = _pointer_target(path, os.readlink(path))
            continue
        text = path.read_text()
        try:
            docs[path.name] = json.loads(text)
        except json.JSONDecodeError:
            pointers[path.name] = _pointer_target(path, text.strip())

    def local(name: str) -> bool:
        return "ieee-1752" not in json.dumps(docs[name])

    def minor(name: str) -> tuple[int, ...]:
        return tuple(int(x) for x in name.removesuffix(".json").rsplit("-", 1)[1].split("."))

    for pointer, target in pointers.items():
        if target not in docs or not local(target):
            family = pointer.removesuffix(".x.json")
            candidates = [
                n for n in docs if n.startswith(family + ".") and re.search(r"\d+\.\d+\.json$", n)
            ]
            candidates = [n for n in candidates if local(n)]
            if candidates:  # else keep the pointer's (IEEE-dependent) schema, unused here
                target = max(candidates, key=minor)
        docs[pointer] = docs[target]

    resources = []
    for name, doc in docs.items():
        spec = referencing.jsonschema.specification_with(
            doc.get("$schema", "http://json-schema.org/draft-07/schema#")
        )
        # $id-less schemas are identified by where they are registered; drop absolute $ids
        # so the pointer alias (name) and the file name resolve the same content.
        body = {k: v for k, v in doc.items() if k != "$id"}
        resources.append((OMH_BASE + name, spec.create_resource(body)))
    return referencing.Registry().with_resources(resources)


@pytest.fixture(scope="module")
def omh_registry() -> referencing.Registry:
    return _omh_registry()


def _omh_validator(registry: referencing.Registry, name: str) -> jsonschema.Validator:
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", "$ref": OMH_BASE + name}
    return jsonschema.Draft7Validator(schema, registry=registry)


@pytest.mark.parametrize(
    ("schema", "version"),
    [
        ("heart-rate", "2.0"),
        ("oxygen-saturation", "2.0"),
        ("body-temperature", "3.0"),
        ("blood-pressure", "3.1"),
        ("respiratory-rate", "2.0"),
        ("step-count", "3.0"),
        ("body-weight", "2.0"),
        ("blood-glucose", "3.0"),
    ],
)
def test_omh_registry_agrees_with_shared_test_data(
    omh_registry: referencing.Registry, schema: str, version: str
) -> None:
    """Our local $ref resolution accepts the shouldPass and rejects the shouldFail examples."""
    v = _omh_validator(omh_registry, f"{schema}-{version}.json")
    folder = OMH_TESTS / schema / version
    passes = sorted((folder / "shouldPass").glob("*.json"))
    assert passes, f"no shared test data in {folder}"
    for p in passes:
        errors = list(v.iter_errors(json.loads(p.read_text())))
        assert not errors, f"{p.name}: {errors[0].message}"
    for p in sorted((folder / "shouldFail").glob("*.json")):
        assert not v.is_valid(json.loads(p.read_text())), f"{p.name} should fail"


def test_omh_data_points(lake_table: pa.Table, omh_registry: referencing.Registry) -> None:
    points, skipped = export.omh_data_points(lake_table)
    dp = _omh_validator(omh_registry, "data-point-1.0.json")
    expected = _expected()
    names: dict[str, int] = {}
    for p in points:
        errors = list(dp.iter_errors(p))
        assert not errors, errors[0].message
        sid = p["header"]["schema_id"]
        assert sid["namespace"] == "omh"
        body_v = _omh_validator(omh_registry, f"{sid['name']}-{sid['version']}.json")
        errors = list(body_v.iter_errors(p["body"]))
        assert not errors, f"{sid}: {errors[0].message}"
        names[sid["name"]] = names.get(sid["name"], 0) + 1
        # date-time formats (jsonschema checks them only with optional extras installed)
        _iso_us(p["header"]["creation_date_time"])
        tf = p["body"]["effective_time_frame"]
        for t in tf.get("time_interval", {"x": tf.get("date_time")}).values():
            _iso_us(t)
        source = p["header"]["acquisition_provenance"]["source_data_point_id"].split(",")
        assert all(s in expected for s in source)
        assert p["header"]["user_id"] == PATIENT

    assert names == {
        "heart-rate": 5,
        "oxygen-saturation": 3,
        "step-count": 3,
        "body-temperature": 1,
        "respiratory-rate": 1,
        "rr-interval": 1,
        "blood-pressure": 1,
        "body-weight": 1,
        "body-height": 1,
        "body-mass-index": 1,
        "blood-glucose": 1,
    }
    bp = next(p for p in points if p["header"]["schema_id"]["name"] == "blood-pressure")
    assert bp["body"]["systolic_blood_pressure"] == {"value": 121.0, "unit": "mmHg"}
    assert bp["body"]["diastolic_blood_pressure"] == {"value": 79.0, "unit": "mmHg"}
    temp = next(p for p in points if p["header"]["schema_id"]["name"] == "body-temperature")
    assert temp["body"]["body_temperature"] == {"value": 36.85, "unit": "C"}
    steps = sorted(
        p["body"]["step_count"]["value"]
        for p in points
        if p["header"]["schema_id"]["name"] == "step-count"
    )
    assert steps == [10.0, 20.0, 30.0]

    assert dict(skipped) == {
        "no Open mHealth mapping for skin_temperature": 1,
        "no Open mHealth mapping for ppg": 1,
        "no Open mHealth mapping for mean_arterial_pressure": 1,
        "spo2 flagged INVALID (no value)": 1,
        "step_count without a previous report (interval start unknown)": 1,
        "blood pressure without a valid systolic/diastolic pair": 3,
    }
    in_points = sum(
        len(p["header"]["acquisition_provenance"]["source_data_point_id"].split(","))
        for p in points
    )
    assert in_points + skipped.total() == len(expected)


def test_omh_validator_rejects_a_wrong_unit(omh_registry: referencing.Registry) -> None:
    """The validation above has teeth: a UCUM unit where omh wants its own is an error."""
    v = _omh_validator(omh_registry, "heart-rate-2.0.json")
    body = {
        "heart_rate": {"value": 61, "unit": "/min"},
        "effective_time_frame": {"date_time": "2024-11-21T14:40:00Z"},
    }
    assert not v.is_valid(body)
    body["heart_rate"]["unit"] = "beats/min"
    assert v.is_valid(body)
