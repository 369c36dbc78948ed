"""`vitalproof lake read` and `lake stats` as a user runs them: real subprocesses, real lake.

Each test gets a home whose ``keys`` and ``lake/default`` were written here with the lake's
own writer, and runs ``python -m vitalproof`` with ``VITALPROOF_HOME`` pointing at it. Tests
marked ``home`` ``s3`` put the lake on the real SeaweedFS instead (``VITALPROOF_LAKE`` an
``s3://`` prefix, the keys in the home's secrets folder).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from streams import lake
from streams.lake.keystore import LocalKeystore
from streams.lake.storage import LakeRoot, as_root, open_uri
from tests.s3 import s3_lake
from vitalproof.durable import write_atomic
from vitalproof.schema import Quality, SampleBatch, Transport
from vitalproof.settings import LakeSettings

REPO = Path(__file__).resolve().parents[1]
T0 = 1_732_200_000_000_000  # 2024-11-21T14:40:00Z
US = 1_000_000


def _batch(device: str, patient: str, t0: int, n: int) -> SampleBatch:
    b = SampleBatch(
        device_id=device,
        patient_id=patient,
        gateway_id="gw-cli",
        transport=Transport.BLE,
        receive_time_us=t0 + n * US,
        tz_offset_min=0,
    )
    for i in range(n):
        b.add("heart_rate", "/min", t0 + i * US, i, 60.0 + i)
        spo2, q = (math.nan, int(Quality.INVALID)) if i == 1 else (97.0, 0)
        b.add("spo2", "%", t0 + i * US, 1000 + i, spo2, q)
    b.add("systolic_bp", "mm[Hg]", t0, 5000, 120.0)
    b.add("diastolic_bp", "mm[Hg]", t0, 5001, 80.0)
    b.add("ppg", "1", t0, 6000, 4242.0)
    b.fill_reading_ids()
    return b


@dataclass
class Home:
    path: Path
    sizes: list[int]  # of the sealed batches' files
    ids: dict[str, set[str]]  # patient -> reading ids
    env: dict[str, str] = field(default_factory=dict)  # where the lake is, if not in home


def _lake_in(request: pytest.FixtureRequest, path: Path) -> tuple[Path | LakeRoot, dict[str, str]]:
    """The home's lake: ``<home>/lake/default``, or on the session's SeaweedFS (``s3``)."""
    if getattr(request, "param", "local") == "local":
        return path / "lake" / "default", {}
    server: LakeSettings = request.getfixturevalue("seaweedfs_lake")
    lake_s3 = s3_lake(server)
    assert lake_s3.root and lake_s3.s3_endpoint and lake_s3.s3_access_key and lake_s3.s3_secret_key
    for var, secret in (
        ("VITALPROOF_S3_ACCESS_KEY", lake_s3.s3_access_key),
        ("VITALPROOF_S3_SECRET_KEY", lake_s3.s3_secret_key),
    ):  # as secret files, never in the environment
        write_atomic(path / "secrets" / var, secret.get_secret_value().encode(), mode=0o600)
    env = {"VITALPROOF_LAKE": lake_s3.root, "VITALPROOF_S3_ENDPOINT": lake_s3.s3_endpoint}
    return open_uri(lake_s3, f"{lake_s3.root}/default"), env


@pytest.fixture
def home(request: pytest.FixtureRequest, tmp_path: Path) -> Home:
    """Two patients, two batches; batch 2 re-seals one reading of patient-a (a duplicate)."""
    path = tmp_path / "home"
    kms = LocalKeystore(path / "keys")
    root, env = _lake_in(request, path)
    a = _batch("watch-a", "patient-a", T0, 5)
    b = _batch("watch-b", "patient-b", T0 + 3600 * US, 3)
    lake.write_batch(root, "b-0001", lake.build_table([a, b], "b-0001"), kms)
    dup = _batch("watch-a", "patient-a", T0, 1)
    dup.keep_only([0])  # heart_rate seq 0: same reading id as in b-0001
    lake.write_batch(root, "b-0002", lake.build_table([dup], "b-0002"), kms)
    # Only batches with a manifest are sealed; b-0003's files stand for a worker killed
    # before its manifest, and readers must not see them.
    for sealed in ("b-0001", "b-0002"):
        as_root(root).write(f"_batches/{sealed}.json", b"{}")
    orphan = _batch("watch-a", "patient-a", T0 + 7200 * US, 2)
    lake.write_batch(root, "b-0003", lake.build_table([orphan], "b-0003"), kms)
    ids = {
        p: {r.reading_id for r in batch.readings()}
        for p, batch in (("patient-a", a), ("patient-b", b))
    }
    sizes = [f.size or 0 for f in as_root(root).files() if "b-0003" not in f.base_name]
    return Home(path, sizes, ids, env)


def run(home: Path | Home, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITALPROOF_")}
    if isinstance(home, Home):
        env |= home.env
        home = home.path
    env["VITALPROOF_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "vitalproof", "lake", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("home", ["local", "s3"], indirect=True)
def test_read_csv(home: Home) -> None:
    proc = run(home, "read", "--patient", "patient-a")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    # 5 heart rate + 5 spo2 + systolic + diastolic + ppg, plus the re-sealed reading
    assert len(rows) == 14
    assert {r["reading_id"] for r in rows} == home.ids["patient-a"]
    assert {r["patient_id"] for r in rows} == {"patient-a"}
    hr0 = [r for r in rows if r["metric"] == "heart_rate" and r["seq"] == "0"]
    assert {r["batch_id"] for r in hr0} == {"b-0001", "b-0002"}
    assert hr0[0]["device_time"] == "2024-11-21T14:40:00.000000Z"
    assert hr0[0]["value"] == "60"
    invalid = next(r for r in rows if r["metric"] == "spo2" and r["seq"] == "1001")
    assert (invalid["value"], invalid["quality_flags"]) == ("", "INVALID")
    assert "14 rows" in proc.stderr


def test_read_filters_by_time_and_metric(home: Home) -> None:
    # naive times are UTC; --to is exclusive
    proc = run(
        home.path,
        "read",
        "--patient",
        "patient-a",
        "--from",
        "2024-11-21T14:40:01",
        "--to",
        "2024-11-21T15:40:03+01:00",
        "--metric",
        "heart_rate",
        "--format",
        "json",
    )
    assert proc.returncode == 0, proc.stderr
    objs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(o["metric"], o["seq"]) for o in objs] == [("heart_rate", 1), ("heart_rate", 2)]
    assert objs[0]["device_time"] == "2024-11-21T14:40:01.000000Z"


def test_read_metric_comma_list(home: Home) -> None:
    proc = run(home.path, "read", "--patient", "patient-b", "--metric", "systolic_bp,diastolic_bp")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert sorted(r["metric"] for r in rows) == ["diastolic_bp", "systolic_bp"]


def test_read_fhir_and_omh_report_skips(home: Home) -> None:
    proc = run(home.path, "read", "--patient", "patient-a", "--format", "fhir")
    assert proc.returncode == 0, proc.stderr
    bundle = json.loads(proc.stdout)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection"
    codes = [e["resource"]["code"]["coding"][0]["code"] for e in bundle["entry"]]
    assert codes.count("8867-4") == 5 and codes.count("85354-9") == 1
    assert "skipped 1 reading: no FHIR vital-sign mapping for ppg (1)" in proc.stderr

    proc = run(home.path, "read", "--patient", "patient-a", "--format", "omh")
    assert proc.returncode == 0, proc.stderr
    points = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(points) == 5 + 4 + 1  # heart rate, valid spo2, one blood-pressure pair
    assert "skipped 2 readings" in proc.stderr
    assert "spo2 flagged INVALID (no value) (1)" in proc.stderr


def test_read_parquet_needs_output(home: Home, tmp_path: Path) -> None:
    proc = run(home.path, "read", "--patient", "patient-a", "--format", "parquet")
    assert proc.returncode == 2
    assert "-o" in _one_error_line(proc)

    out = tmp_path / "a.parquet"
    proc = run(home.path, "read", "--patient", "patient-a", "--format", "parquet", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert pq.read_table(out).num_rows == 14  # readable without any key: plaintext
    assert "NOT encrypted" in proc.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--from", "yesterday"], "--from 'yesterday' is not an ISO 8601 time"),
        (["--to", "2024-13-01"], "--to '2024-13-01' is not an ISO 8601 time"),
        (["--from", "2024-11-22", "--to", "2024-11-21"], "is not before --to"),
        (["--metric", "heart_rate", "--metric", "mood"], "unknown metric 'mood'"),
    ],
)
def test_read_bad_input_exits_2(home: Home, args: list[str], needle: str) -> None:
    proc = run(home.path, "read", "--patient", "patient-a", *args)
    assert proc.returncode == 2
    assert needle in _one_error_line(proc)
    assert proc.stdout == ""


def test_read_unknown_patient_exits_1(home: Home) -> None:
    proc = run(home.path, "read", "--patient", "patient-zz")
    assert proc.returncode == 1
    assert "unknown patient 'patient-zz'" in _one_error_line(proc)
    assert proc.stdout == ""


def test_read_unsafe_patient_id_exits_2(home: Home) -> None:
    proc = run(home.path, "read", "--patient", "../keys")
    assert proc.returncode == 2
    assert "not a safe path segment" in _one_error_line(proc)


def test_read_without_keystore_does_not_create_one(home: Home, tmp_path: Path) -> None:
    other = tmp_path / "other-home"
    (other / "lake").mkdir(parents=True)
    (home.path / "lake" / "default").rename(other / "lake" / "default")
    proc = run(other, "read", "--patient", "patient-a")
    assert proc.returncode == 1
    assert "no keystore" in _one_error_line(proc)
    assert not (other / "keys").exists()


@pytest.mark.parametrize("home", ["local", "s3"], indirect=True)
def test_stats_json(home: Home) -> None:
    proc = run(home, "stats", "--json")
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    stats = json.loads(line)
    total = len(home.ids["patient-a"]) + len(home.ids["patient-b"])
    assert stats["readings"] == total + 1
    assert stats["distinct_reading_ids"] == total
    assert stats["duplicates"] == 1
    assert stats["batches"] == 2
    assert stats["patients"] == 2
    assert stats["bytes_on_disk"] == sum(home.sizes) > 0
    assert stats["namespace"] == "default"
    assert stats["lake"].startswith("s3://" if home.env else str(home.path))
    by_patient = {p["patient_id"]: p for p in stats["by_patient"]}
    assert sorted(by_patient) == ["patient-a", "patient-b"]
    assert by_patient["patient-b"]["readings"] == len(home.ids["patient-b"])
    assert by_patient["patient-a"]["first"] <= by_patient["patient-a"]["last"]
    assert by_patient["patient-b"]["first"].endswith("Z")


def test_an_empty_namespace_points_at_the_ones_with_data(home: Home) -> None:
    proc = run(home, "stats", "--namespace", "demo-1234")
    assert proc.returncode == 0, proc.stderr
    assert "namespace demo-1234" in proc.stdout
    assert "these do: default" in proc.stderr and "--namespace NS" in proc.stderr
    listed = subprocess.run(
        [sys.executable, "-m", "vitalproof", "namespaces", "--json"],
        env={k: v for k, v in os.environ.items() if not k.startswith("VITALPROOF_")}
        | home.env
        | {"VITALPROOF_HOME": str(home.path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert [n["namespace"] for n in json.loads(listed.stdout)] == ["default"]
    bad = run(home, "stats", "--namespace", "no spaces")
    assert bad.returncode == 2 and _one_error_line(bad).startswith("error: --namespace")


def test_stats_plain(home: Home) -> None:
    proc = run(home.path, "stats")
    assert proc.returncode == 0, proc.stderr
    assert "duplicates" in proc.stdout and "bytes on disk" in proc.stdout


def test_stats_empty_home(tmp_path: Path) -> None:
    proc = run(tmp_path / "empty", "stats", "--json")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats["readings"] == stats["bytes_on_disk"] == 0
    assert not (tmp_path / "empty" / "keys").exists()


def test_read_erased_patient_exits_1(home: Home) -> None:
    LocalKeystore(home.path / "keys").erase("patient-a")
    proc = run(home.path, "read", "--patient", "patient-a")
    assert proc.returncode == 1
    assert "cannot decrypt" in _one_error_line(proc)
    assert proc.stdout == ""
    # `lake stats` over erased files is not tested here: pyarrow sometimes aborts at exit
    # ("terminate called without an active exception") after several failed KMS unwraps in
    # streams.lake.lake_stats, which would make this test flaky (reported, not ours to fix).


def test_output_piped_into_head_ends_quietly(tmp_path: Path) -> None:
    """`lake read ... | head -1` on more than a pipe's buffer: no traceback, exit 0 or 141."""
    path = tmp_path / "home"
    kms = LocalKeystore(path / "keys")
    root = path / "lake" / "default"
    big = _batch("watch-a", "patient-a", T0, 2000)
    lake.write_batch(root, "b-0001", lake.build_table([big], "b-0001"), kms)
    (root / "_batches").mkdir()
    (root / "_batches" / "b-0001.json").write_text("{}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITALPROOF_")}
    env["VITALPROOF_HOME"] = str(path)
    proc = subprocess.run(
        [
            "bash",
            "-c",
            f'"{sys.executable}" -m vitalproof lake read --patient patient-a 2>err | head -1;'
            ' echo "status ${PIPESTATUS[0]}"',
        ],
        cwd=tmp_path,
        env=env | {"PYTHONPATH": os.pathsep.join(sys.path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stdout.splitlines()
    assert lines[0].startswith('"reading_id",') and lines[-1] in ("status 0", "status 141")
    assert "Traceback" not in (tmp_path / "err").read_text()
