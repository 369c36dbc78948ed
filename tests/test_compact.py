"""Lake compaction (issue 16, item 3): many small sealed files -> one per patient-day.

A lake sealed by the real sealer and keystore (three patients, batches on two UTC days, one
batch straddling midnight), its batches appended to a real anchor log and "anchored" with a
receipt (no chain: the offline half of a bundle is what compaction could break). Compaction
must leave every reader's view as it was: the same rows, the same stats, bundles exported
before byte-identical after and verifying; erasure must still shred a compacted patient.
Killed with SIGKILL at every step (a real ``vitalproof lake compact`` subprocess, crash points
of :mod:`vitalproof.crashpoints`), the lake shows every reading exactly once, and the next run
finishes. Sealing and reading go on while it runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anchor.log import MerkleLog
from clinic.erasure import erase_patient
from clinic.proofs import LakeView
from streams import lake
from streams.lake.compact import CRASH_POINTS, MAX_FILE_ROWS, compact_lake, recover
from streams.lake.keystore import KeyErased, LocalKeystore
from streams.lake.layout import COMPACTED_PREFIX, COMPACTIONS_DIR
from streams.lake.records import load_state
from streams.sealer import Pending, Sealer
from vitalproof.cli.lake import lake_compact, lake_read
from vitalproof.crashpoints import ENV_VAR, MARKER
from vitalproof.manifest import BatchManifest
from vitalproof.schema import SampleBatch, Transport
from vitalproof.settings import PathSettings, Settings
from vitalproof_verify.bundle import verify_offline

REPO = Path(__file__).resolve().parents[1]
MIDNIGHT = 1_800_057_600_000_000  # 2027-01-16T00:00:00Z
PATIENTS = ("pt-a", "pt-b", "pt-c")
DAY1, DAY2 = "2027-01-15", "2027-01-16"


def settings_for(home: Path) -> Settings:
    return Settings(paths=PathSettings(home=home))


def _batch(patient: str, start_us: int, n: int, seq0: int) -> SampleBatch:
    b = SampleBatch(
        device_id=f"dev-{patient}",
        patient_id=patient,
        gateway_id="gw",
        transport=Transport.MQTT,
        receive_time_us=start_us + n * 1_000_000,
    )
    for i in range(n):
        k = seq0 + i
        t = start_us + i * 1_000_000
        b.add("heart_rate", "/min", t, 3 * k, float(60 + k % 9))
        b.add("spo2", "%", t, 3 * k + 1, float(95 + k % 4))
        b.add("rr_interval", "ms", t, 3 * k + 2, math.nan if k % 7 == 3 else float(800 + k % 50))
    b.fill_reading_ids()
    return b


def seal_batch(
    settings: Settings, offset: int, start_us: int, n: int, patients: tuple[str, ...] = PATIENTS
) -> BatchManifest | None:
    """One batch of ``n`` seconds of three metrics for each patient, by the real sealer."""
    pend = [
        Pending(settings.kafka.topic_clean, p, offset, _batch(pt, start_us, n, offset * 1000))
        for p, pt in enumerate(patients)
    ]
    return Sealer(settings.lake_dir, LocalKeystore(settings.paths.keys_dir)).seal(pend)


def anchor(settings: Settings, manifests: list[BatchManifest]) -> None:
    """Append the batches to the anchor log and record an anchor of its head (no chain)."""
    with MerkleLog(settings.anchor_dir / "log") as log:
        for m in manifests:
            log.append(m.batch_id, bytes.fromhex(m.merkle_root), m.rows)
        root = log.root()
        receipt = {
            "chain_id": 31337,
            "contract": "0x5FbDB2315678afecb367f032d93F642f64180aa3",
            "tx_hash": "0x" + hashlib.sha256(root).hexdigest(),
            "block_number": 12,
            "block_hash": "0x" + hashlib.sha256(b"block" + root).hexdigest(),
            "log_index": 0,
            "root": "0x" + root.hex(),
            "tree_size": log.size,
            "block_timestamp": 1_800_000_100,
            "gas_used": 48_213,
        }
        log.record_anchor(log.size, root, receipt)


def build_lake(home: Path, batches: int = 8) -> Settings:
    """``batches`` 4-second batches on day 1, one straddling midnight, two on day 2."""
    settings = settings_for(home)
    manifests = []
    starts = [MIDNIGHT - (batches + 1) * 10_000_000 + i * 10_000_000 for i in range(batches)]
    starts += [MIDNIGHT - 2_000_000, MIDNIGHT + 60_000_000, MIDNIGHT + 70_000_000]
    for offset, start in enumerate(starts):
        m = seal_batch(settings, offset, start, 4)
        assert m is not None
        manifests.append(m)
    anchor(settings, manifests)
    return settings


def kms_of(settings: Settings) -> LocalKeystore:
    return LocalKeystore(settings.paths.keys_dir)


def visible_ids(settings: Settings) -> list[str]:
    """Every reading id a reader sees, duplicates kept (so "exactly once" can be checked)."""
    root, kms = settings.lake_dir, kms_of(settings)
    sealed = lake.sealed_batch_ids(root)
    out: list[str] = []
    for p in PATIENTS:
        t = lake.read_patient(root, p, kms, batches=sealed)
        out.extend(lake.hex_ids(t["reading_id"]).to_pylist())
    return out


def rows_of(settings: Settings, patients: tuple[str, ...] = PATIENTS) -> list[dict[str, Any]]:
    root, kms = settings.lake_dir, kms_of(settings)
    sealed = lake.sealed_batch_ids(root)
    rows = []
    for p in patients:
        t = lake.read_patient(root, p, kms, batches=sealed)
        ids = lake.hex_ids(t["reading_id"]).to_pylist()
        rows += [r | {"reading_id": i} for r, i in zip(t.to_pylist(), ids, strict=True)]
    return sorted(rows, key=lambda r: r["reading_id"])


def data_files(settings: Settings) -> list[Path]:
    return sorted(p for p in settings.lake_dir.rglob("*.parquet") if not p.name.startswith("."))


def patient_of_folder(settings: Settings, path: Path) -> str:
    """The patient whose folder ``path`` is in (folders hold pseudonyms: ``patient=<h>``)."""
    h = path.parent.parent.name.removeprefix("patient=")
    patient = kms_of(settings).patient_of(h)
    assert patient is not None, path
    return patient


def per_day(settings: Settings) -> Counter[tuple[str, str]]:
    """Files per (patient id, ``date=<d>`` folder)."""
    return Counter((patient_of_folder(settings, p), p.parent.name) for p in data_files(settings))


def stats(settings: Settings) -> dict[str, int]:
    root = settings.lake_dir
    return lake.lake_stats(root, kms_of(settings), batches=lake.sealed_batch_ids(root))


@dataclass
class Before:
    ids: list[str]
    rows: list[dict[str, Any]]
    stats: dict[str, int]
    bundles: dict[str, bytes]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Before]:
    """A sealed, anchored lake, and what readers see of it, built once for the module."""
    home = tmp_path_factory.mktemp("template")
    settings = build_lake(home)
    view = LakeView(settings)
    table = view.table()
    ids = lake.hex_ids(table["reading_id"]).to_pylist()
    picks = sorted(ids)[:: max(1, len(ids) // 12)]
    bundles = {rid: view.bundle(rid).to_json() for rid in picks}
    return home, Before(sorted(ids), rows_of(settings), stats(settings), bundles)


@pytest.fixture
def world(template: tuple[Path, Before], tmp_path: Path) -> Iterator[tuple[Settings, Before]]:
    home, before = template
    shutil.copytree(home, tmp_path / "home")
    yield settings_for(tmp_path / "home"), before


def test_many_small_files_become_one_per_patient_day_and_readers_see_the_same(
    world: tuple[Settings, Before],
) -> None:
    settings, before = world
    assert per_day(settings) == {
        (p, f"date={d}"): n for p in PATIENTS for d, n in ((DAY1, 9), (DAY2, 3))
    }
    report = compact_lake(settings.lake_dir, kms_of(settings))
    assert (report.groups, report.files_in, report.files_out) == (6, 36, 6)
    assert report.rows == before.stats["readings"] and report.bytes_out < report.bytes_in / 4
    assert per_day(settings) == {(p, f"date={d}"): 1 for p in PATIENTS for d in (DAY1, DAY2)}
    assert all(p.name.startswith(COMPACTED_PREFIX) for p in data_files(settings))

    # every row as it was (batch_id and leaf_index included), the same counts
    assert rows_of(settings) == before.rows
    after = stats(settings)
    for key in ("readings", "distinct_reading_ids", "duplicates", "batches", "patients"):
        assert after[key] == before.stats[key], key
    assert after["files"] == 6 and after["bytes_on_disk"] < before.stats["bytes_on_disk"] / 4

    # bundles exported before export byte for byte the same after, and verify
    view = LakeView(settings)
    for rid, doc in before.bundles.items():
        assert view.bundle(rid).to_json() == doc
        verify_offline(doc)

    # each file is sorted as the lake is (metric, then time) and holds one date
    kms = kms_of(settings)
    for path in data_files(settings):
        rel = str(path.relative_to(settings.lake_dir))
        patient = patient_of_folder(settings, path)
        t = lake.read_patient(settings.lake_dir, patient, kms)  # whole, file by file
        stamps = [r["device_time"] for r in t.to_pylist()]
        assert {d.date().isoformat() for d in stamps} <= {DAY1, DAY2}
        one = [
            (r["metric"], r["device_time"])
            for r in t.to_pylist()
            if r["device_time"].date().isoformat() in rel
        ]
        assert one == sorted(one)

    # a second run finds nothing to do
    again = compact_lake(settings.lake_dir, kms)
    assert again.groups == 0 and not again.recovered


def test_lake_read_gives_the_same_rows_and_a_rerun_merges_new_batches(
    world: tuple[Settings, Before], tmp_path: Path
) -> None:
    settings, _ = world

    def read_csv(name: str) -> list[bytes]:
        out = tmp_path / name
        assert lake_read(settings, patient="pt-b", output=str(out)) == 0
        header, *lines = out.read_bytes().splitlines()
        return [header, *sorted(lines)]

    csv_before = read_csv("before.csv")
    assert lake_compact(settings, as_json=True) == 0
    assert read_csv("after.csv") == csv_before

    # new batches on day 2 merge with the compacted file; the superseded record goes
    more = [seal_batch(settings, 100 + i, MIDNIGHT + 200_000_000 + i * 10_000_000, 3)
            for i in range(3)]  # fmt: skip
    assert all(m is not None for m in more)
    assert per_day(settings)[("pt-b", f"date={DAY2}")] == 4
    ids_before = sorted(visible_ids(settings))
    report = compact_lake(settings.lake_dir, kms_of(settings), patient_id="pt-b")
    assert (report.groups, report.files_in, report.files_out) == (1, 4, 1)
    assert per_day(settings)[("pt-b", f"date={DAY2}")] == 1
    assert per_day(settings)[("pt-a", f"date={DAY2}")] == 4  # only pt-b asked
    assert sorted(visible_ids(settings)) == ids_before
    b_dir = f"patient={kms_of(settings).pseudonym('pt-b')}"
    records = list((settings.lake_dir / COMPACTIONS_DIR / b_dir).glob("*.json"))
    assert len(records) == 2  # one per day: the first day-2 record was superseded and dropped
    assert all(not r.inputs for r in load_state(pa.fs.LocalFileSystem(),
                                                str(settings.lake_dir)).records)  # fmt: skip


def test_before_settle_and_max_rows_limit_what_is_merged(world: tuple[Settings, Before]) -> None:
    settings, before = world
    kms = kms_of(settings)
    report = compact_lake(settings.lake_dir, kms, before=DAY2)
    assert report.groups == 3  # day 1 of each patient
    assert per_day(settings)[("pt-a", f"date={DAY2}")] == 3
    assert compact_lake(settings.lake_dir, kms, settle_s=3600).groups == 0  # everything is new
    # small files: a patient-day becomes ceil(rows / max_rows) files, the full ones stay
    report = compact_lake(settings.lake_dir, kms, max_rows=20)
    day2_rows = sum(1 for r in before.rows if r["patient_id"] == "pt-a"
                    and r["device_time"].date().isoformat() == DAY2)  # fmt: skip
    assert per_day(settings)[("pt-a", f"date={DAY2}")] == -(-day2_rows // 20)
    assert sorted(visible_ids(settings)) == before.ids
    assert MAX_FILE_ROWS >= 8 * 128 * 1024


def test_erasure_shreds_a_compacted_patient_and_spares_the_others(
    world: tuple[Settings, Before],
) -> None:
    settings, before = world
    compact_lake(settings.lake_dir, kms_of(settings))
    erase_patient(settings, "pt-b", actor="Operator/test", reason="erasure request (test)")
    kms = kms_of(settings)
    with pytest.raises(lake.LakeKeyUnavailable) as err:
        lake.read_patient(settings.lake_dir, "pt-b", kms)
    assert isinstance(err.value.cause, KeyErased)
    assert stats(settings)["unreadable_files"] == 2

    # a later compaction leaves B's files as they are and mints no key for B
    more = seal_batch(settings, 200, MIDNIGHT + 300_000_000, 2, patients=("pt-a", "pt-c"))
    assert more is not None
    b_files = {p: p.read_bytes() for p in data_files(settings) if "pt-b" in str(p)}
    report = compact_lake(settings.lake_dir, kms)
    assert report.groups == 2  # day 2 of A and C
    assert {p: p.read_bytes() for p in data_files(settings) if "pt-b" in str(p)} == b_files
    assert not kms.has_keys("pt-b")

    view = LakeView(settings)
    for rid, doc in before.bundles.items():
        patient = next(r["patient_id"] for r in before.rows if r["reading_id"] == rid)
        if patient == "pt-b":
            continue
        assert view.bundle(rid).to_json() == doc
        verify_offline(doc)


# -- crashes ------------------------------------------------------------------------------


def run_compact(settings: Settings, crash_at: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'verifier'}",
        "VITALPROOF_HOME": str(settings.paths.home),
        ENV_VAR: crash_at,
    }
    return subprocess.run(
        [sys.executable, "-m", "vitalproof", "lake", "compact"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_killed_at_every_step_readers_see_each_reading_once_and_a_rerun_finishes(
    world: tuple[Settings, Before], point: str
) -> None:
    settings, before = world
    # the second patient-day: one group is done before the crash, one is cut in the middle
    proc = run_compact(settings, f"{point}:2")
    assert proc.returncode == -9, proc.stderr
    assert f"{MARKER} {point}" in proc.stderr
    assert sorted(visible_ids(settings)) == before.ids  # never both copies, never neither

    report = compact_lake(settings.lake_dir, kms_of(settings))
    assert sorted(visible_ids(settings)) == before.ids
    assert set(per_day(settings).values()) == {1}
    assert rows_of(settings) == before.rows
    state = load_state(pa.fs.LocalFileSystem(), str(settings.lake_dir))
    assert all(not r.inputs for r in state.records)
    assert {str(p.relative_to(settings.lake_dir)) for p in data_files(settings)} == state.outputs
    if point in ("compact_before_output", "compact_mid_output", "compact_after_output"):
        assert report.groups == 5  # the cut group is done again (its outputs were orphans)
    elif point == "compact_after_settle":
        assert report.groups == 4 and not report.recovered  # it was done
    else:
        assert report.recovered.get("records_settled") == 1  # finished, not done again
        assert report.groups == 4
    view = LakeView(settings)
    for rid, doc in before.bundles.items():
        assert view.bundle(rid).to_json() == doc


def test_killed_again_while_finishing_a_killed_run(world: tuple[Settings, Before]) -> None:
    settings, before = world
    assert run_compact(settings, "compact_after_commit").returncode == -9
    assert run_compact(settings, "compact_mid_delete").returncode == -9  # in the recovery
    assert sorted(visible_ids(settings)) == before.ids
    recover(settings.lake_dir)
    assert sorted(visible_ids(settings)) == before.ids
    compact_lake(settings.lake_dir, kms_of(settings))
    assert rows_of(settings) == before.rows and set(per_day(settings).values()) == {1}


def test_a_second_compactor_is_refused_while_one_runs(world: tuple[Settings, Before]) -> None:
    settings, _ = world
    from streams.lake.compact import _lock

    fs = pa.fs.LocalFileSystem()
    with _lock(fs, str(settings.lake_dir)), pytest.raises(lake.CompactionBusy, match="another"):
        compact_lake(settings.lake_dir, kms_of(settings))


# -- concurrency ----------------------------------------------------------------------------


def test_concurrent_sealing_into_the_same_day_and_readers(world: tuple[Settings, Before]) -> None:
    """The sealer keeps sealing into day 2 while compaction rounds run and a reader reads:
    every read shows each reading once, and nothing sealed before it is missing."""
    settings, _ = world
    root = settings.lake_dir
    stop = threading.Event()
    errors: list[str] = []
    sealed_ids: set[str] = set(visible_ids(settings))
    lock = threading.Lock()
    reads = 0

    def sealer() -> None:
        kms = kms_of(settings)
        for i in range(10):
            start = MIDNIGHT + 400_000_000 + i * 5_000_000
            pend = [
                Pending(settings.kafka.topic_clean, p, 300 + i, _batch(pt, start, 2, 9000 + i * 10))
                for p, pt in enumerate(PATIENTS)
            ]
            ids = {rid for x in pend for rid in x.batch.reading_id}
            assert Sealer(root, kms).seal(pend) is not None
            with lock:
                sealed_ids.update(ids)
        stop.set()

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            reads += 1
            with lock:
                floor = set(sealed_ids)
            ids = visible_ids(settings)
            if len(ids) != len(set(ids)):
                errors.append(f"duplicates: {len(ids) - len(set(ids))}")
            if not floor <= set(ids):
                errors.append(f"missing: {len(floor - set(ids))}")

    threads = [threading.Thread(target=sealer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    rounds = 0
    while not stop.is_set() or rounds < 2:
        compact_lake(root, kms_of(settings))
        rounds += 1
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert reads >= 2 and rounds >= 2
    compact_lake(root, kms_of(settings))
    final = visible_ids(settings)
    assert len(final) == len(set(final)) and sealed_ids <= set(final)
    manifests = [BatchManifest.model_validate_json(p.read_bytes())
                 for p in (root / "_batches").glob("*.json")]  # fmt: skip
    assert len(final) == sum(m.rows for m in manifests)
    assert set(per_day(settings).values()) == {1}


# -- properties -----------------------------------------------------------------------------


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    plan=st.lists(st.tuples(st.integers(-3, 3), st.integers(1, 6)), min_size=2, max_size=5),
    max_rows=st.sampled_from([7, 50, MAX_FILE_ROWS]),
)
def test_any_plan_of_batches_keeps_every_row(
    tmp_path_factory: pytest.TempPathFactory, plan: list[tuple[int, int]], max_rows: int
) -> None:
    """Batches anywhere around midnight, of any size, and any file size: compaction keeps
    every row, and each patient-day ends in ceil(rows / max_rows) files."""
    settings = settings_for(tmp_path_factory.mktemp("prop"))
    for offset, (minute, n) in enumerate(plan):
        seal_batch(settings, offset, MIDNIGHT + minute * 60_000_000 - 2_000_000, n,
                   patients=("pt-a", "pt-b"))  # fmt: skip
    before = rows_of(settings, ("pt-a", "pt-b"))
    inputs = per_day(settings)
    compact_lake(settings.lake_dir, kms_of(settings), max_rows=max_rows)
    assert rows_of(settings, ("pt-a", "pt-b")) == before
    days = Counter((r["patient_id"], r["device_time"].date()) for r in before)
    files = per_day(settings)
    for (p, d), n in days.items():
        key = (p, f"date={d.isoformat()}")
        assert files[key] == (1 if inputs[key] == 1 else -(-n // max_rows))


# -- the command ----------------------------------------------------------------------------


def test_the_command_watches_and_refuses_bad_input_in_one_line(
    world: tuple[Settings, Before],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings, before = world
    from vitalproof.cli.main import main

    monkeypatch.setenv("VITALPROOF_HOME", str(settings.paths.home))
    for args, what in [
        (["--before", "yesterday"], "--before 'yesterday' is not a date"),
        (["--every", "0", "--watch"], "--every 0: must be > 0"),
        (["--settle", "-1"], "--settle -1: must be >= 0"),
        (["--patient", "../x"], "patient id '../x' is not a safe path segment"),
    ]:
        assert main(["lake", "compact", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and what in err[0], err

    # a namespace with no lake: nothing to do, and no folder made for it
    empty = settings.evolve(kafka={"topic_prefix": "nothing-here."})
    assert lake_compact(empty) == 0 and not empty.lake_dir.exists()
    assert capsys.readouterr().out.strip() == "nothing to compact"

    # two rounds of the watch loop: the first merges everything old enough, the second nothing
    code = lake_compact(settings, watch=True, every_s=0.05, settle_s=0, as_json=True, rounds=2)
    assert code == 0
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert first["groups"] == 6 and first["files_out"] == 6 and second["groups"] == 0
    assert sorted(visible_ids(settings)) == before.ids


def test_the_sealer_still_remembers_readings_that_were_merged(
    world: tuple[Settings, Before],
) -> None:
    """A replay after a restart (the same readings under new offsets) must not be sealed
    twice: the sealer reloads its memory of recent ids from the compacted files too."""
    settings, before = world
    compact_lake(settings.lake_dir, kms_of(settings))
    sealer = Sealer(settings.lake_dir, kms_of(settings))
    topic = settings.kafka.topic_clean
    memories = [sealer.recent((topic, p)) for p in range(len(PATIENTS))]  # one per partition
    assert set().union(*(m.seen(before.ids) for m in memories)) == set(before.ids)
    start = MIDNIGHT - 9 * 10_000_000  # the first batch's readings again, at offset 500
    replay = [
        Pending(settings.kafka.topic_clean, p, 500, _batch(pt, start, 4, 0))
        for p, pt in enumerate(PATIENTS)
    ]
    assert sealer.seal(replay) is None
    assert sorted(visible_ids(settings)) == before.ids
