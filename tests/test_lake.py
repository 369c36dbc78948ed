"""The lake: encrypted Parquet per (batch, patient, date), read back, no plaintext leaks.

Tests taking ``lake_root`` run twice: on a local folder and on the real SeaweedFS (S3).
"""

from __future__ import annotations

import datetime as dt
import importlib
import math
import struct
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe
import pytest

from streams import lake
from streams.lake.crypto import _KMS_CONFIG, _crypto
from streams.lake.keystore import LocalKeystore
from streams.lake.layout import file_path
from streams.lake.storage import LakeRoot, as_root
from streams.lake.table import ID_SOURCE_COLUMNS, ids_to_binary, sort_for_file
from vitalproof.manifest import BatchManifest
from vitalproof.schema import Quality, SampleBatch, Transport

T0 = 1_732_200_000_000_000  # 2024-11-21T14:40:00Z
US = 1_000_000


def _batch(device: str, patient: str, t0: int = T0, n: int = 6, hr0: float = 61.25) -> SampleBatch:
    b = SampleBatch(
        device_id=device,
        patient_id=patient,
        gateway_id="gw-test-7",
        transport=Transport.BLE,
        receive_time_us=t0 + n * US,
        tz_offset_min=-300,
    )
    for i in range(n):
        b.add("heart_rate", "/min", t0 + i * US, i, hr0 + i)
        spo2, q = (math.nan, int(Quality.INVALID)) if i == 3 else (96.5 + i / 8, 0)
        b.add("spo2", "%", t0 + i * US, i, spo2, q)
    b.fill_reading_ids()
    return b


@pytest.fixture
def kms(tmp_path: Path) -> LocalKeystore:
    return LocalKeystore(tmp_path / "keys")


def _dir(kms: LocalKeystore, patient: str) -> str:
    """The patient's folder: named by their pseudonym, never their id."""
    return f"patient={kms.pseudonym(patient)}"


@pytest.fixture
def batches() -> list[SampleBatch]:
    return [
        _batch("dev-alpha-1", "patient-alpha"),
        _batch("dev-beta-2", "patient-beta", hr0=88.75),
        _batch("dev-alpha-3", "patient-alpha", t0=T0 + 60 * US, hr0=71.125),
    ]


def _expected(batches: list[SampleBatch], patient: str) -> dict[str, tuple[object, ...]]:
    return {
        r.reading_id: (
            r.device_id,
            r.metric,
            r.value,
            r.unit,
            r.device_time_us,
            r.seq,
            r.quality,
            b.transport.value if b.transport else None,
            b.gateway_id,
            b.tz_offset_min,
        )
        for b in batches
        if b.patient_id == patient
        for r in b.readings()
    }


def _bytes(root: Path | LakeRoot, rel: str) -> bytes:
    data = as_root(root).read(rel)
    assert data is not None, rel
    return data


def _every_file(root: Path | LakeRoot) -> list[str]:
    """Every object or file below ``root``, hidden ones (a local publish's temp files) too."""
    r = as_root(root)
    sel = pafs.FileSelector(r.base, recursive=True, allow_not_found=True)
    return sorted(i.path for i in r.fs.get_file_info(sel) if i.type == pafs.FileType.File)


def _as_rows(table: pa.Table) -> dict[str, tuple[object, ...]]:
    ids = lake.hex_ids(table["reading_id"]).to_pylist()
    us = pc.cast(table["device_time"], pa.int64()).to_pylist()
    cols = [
        table[c].to_pylist()
        for c in (
            "device_id",
            "metric",
            "value",
            "unit",
            "seq",
            "quality",
            "transport",
            "gateway_id",
            "tz_offset_min",
        )
    ]
    out = {}
    for i, rid in enumerate(ids):
        dev, metric, value, unit, seq, q, tr, gw, tz = (c[i] for c in cols)
        out[rid] = (dev, metric, value, unit, us[i], seq, q, tr, gw, tz)
    return out


def test_write_and_read_back(
    lake_root: Path | LakeRoot, kms: LocalKeystore, batches: list[SampleBatch]
) -> None:
    root = lake_root
    table = lake.build_table(batches, "b-0001")
    assert table.schema.equals(lake.SCHEMA)
    assert table["leaf_index"].to_pylist() == list(range(36))
    written = lake.write_batch(root, "b-0001", table, kms)
    a, b = _dir(kms, "patient-alpha"), _dir(kms, "patient-beta")
    assert sorted(w.path for w in written) == sorted(
        [f"{a}/date=2024-11-21/b-0001.parquet", f"{b}/date=2024-11-21/b-0001.parquet"]
    )
    by_path = {w.path: w for w in written}
    alpha = by_path[f"{a}/date=2024-11-21/b-0001.parquet"]
    assert (alpha.rows, alpha.key_id, alpha.created) == (24, "patient:patient-alpha:v1", True)
    assert alpha.bytes == len(_bytes(root, alpha.path))

    got = lake.read_patient(root, "patient-alpha", kms)
    assert _as_rows(got) == _expected(batches, "patient-alpha")
    assert got["value"].null_count == 2  # NaN (Quality.INVALID) is stored as null
    assert set(got["batch_id"].to_pylist()) == {"b-0001"}
    # sorted by (metric, device_time) within the file
    metrics = got["metric"].to_pylist()
    assert metrics == sorted(metrics)
    assert _as_rows(lake.read_patient(root, "patient-beta", kms)) == _expected(
        batches, "patient-beta"
    )
    assert lake.read_patient(root, "nobody", kms).num_rows == 0


def test_time_range_and_metric_filters(
    lake_root: Path | LakeRoot, kms: LocalKeystore, batches: list[SampleBatch]
) -> None:
    root = lake_root
    lake.write_batch(root, "b-1", lake.build_table(batches, "b-1"), kms)
    start = dt.datetime(2024, 11, 21, 14, 41, tzinfo=dt.UTC)  # the third batch only
    got = lake.read_patient(root, "patient-alpha", kms, start=start, metrics=["heart_rate"])
    assert got["value"].to_pylist() == [71.125 + i for i in range(6)]
    assert lake.read_patient(root, "patient-alpha", kms, end=T0 + 2 * US).num_rows == 4
    assert lake.read_patient(root, "patient-alpha", kms, start=T0 + 86_400 * US).num_rows == 0


def test_batch_across_midnight_is_split_per_date(
    lake_root: Path | LakeRoot, kms: LocalKeystore
) -> None:
    tmp_path = lake_root
    midnight = 1_732_233_600_000_000  # 2024-11-22T00:00:00Z
    table = lake.build_table([_batch("dev-1", "p-1", t0=midnight - 3 * US)], "b-night")
    with pytest.raises(lake.LakeSpansDates):
        lake.write_patient_file(tmp_path, "b-night", "p-1", table, kms)
    written = lake.write_patient_files(tmp_path, "b-night", "p-1", table, kms)
    assert [(w.path, w.rows) for w in written] == [
        (f"{_dir(kms, 'p-1')}/date=2024-11-21/b-night.parquet", 6),
        (f"{_dir(kms, 'p-1')}/date=2024-11-22/b-night.parquet", 6),
    ]
    assert len(lake.list_patient_files(tmp_path, "p-1", kms=kms, start=midnight)) == 1
    assert lake.read_patient(tmp_path, "p-1", kms, start=midnight).num_rows == 6
    assert lake.read_patient(tmp_path, "p-1", kms).num_rows == 12


def test_no_plaintext_in_files(
    lake_root: Path | LakeRoot, kms: LocalKeystore, batches: list[SampleBatch]
) -> None:
    """Nothing identifying or clinical appears in the bytes of a file, nor an id in its path.

    The path names the patient by pseudonym (``patient=<h>``, Hive partition: listing,
    pruning and erasure are per patient), never by id.
    """
    root = lake_root
    written = lake.write_batch(root, "b-secret", lake.build_table(batches, "b-secret"), kms)
    blob = b"".join(_bytes(root, w.path) for w in written)
    names = "".join(w.path for w in written)
    assert not [b.patient_id for b in batches if str(b.patient_id) in names]
    assert not [b.device_id for b in batches if b.device_id in names]
    needles: list[bytes] = []
    for b in batches:
        assert b.patient_id is not None
        needles += [b.device_id.encode(), b.patient_id.encode(), b"gw-test-7"]
        for rid in b.reading_id:
            needles += [rid.encode(), bytes.fromhex(rid)]
        needles += [struct.pack("<d", v) for v in b.value[:3]]
    needles += [b"heart_rate", b"spo2", b"b-secret", b"reading_id", b"patient:"]
    leaked = [n for n in needles if n in blob]
    assert not leaked
    assert blob.count(b"PARE") == 2 * len(written)  # encrypted-footer Parquet magic


def test_reading_without_the_key_fails_clearly(
    tmp_path: Path, kms: LocalKeystore, batches: list[SampleBatch]
) -> None:
    root = tmp_path / "lake"
    lake.write_batch(root, "b-1", lake.build_table(batches, "b-1"), kms)
    stranger = LocalKeystore(tmp_path / "other-keys")
    # Another keystore's pseudonyms name other folders: it finds nothing of the patient...
    assert lake.read_patient(root, "patient-alpha", stranger).num_rows == 0
    # ...and a file it is handed does not decrypt, naming the file and the key
    rel = f"{_dir(kms, 'patient-alpha')}/date=2024-11-21/b-1.parquet"
    with pytest.raises(lake.LakeKeyUnavailable) as err:
        lake.read_reading_ids(root, rel, stranger, "patient-alpha")
    assert rel in str(err.value)
    assert err.value.key == "patient:patient-alpha:v1"
    assert "unknown key" in err.value.diagnostics()
    # and pyarrow without any decryption properties cannot read it either
    with pytest.raises(OSError):
        pq.read_table(err.value.path)


def test_erasure_makes_one_patient_unreadable(
    lake_root: Path | LakeRoot, kms: LocalKeystore, batches: list[SampleBatch]
) -> None:
    root = lake_root
    lake.write_batch(root, "b-1", lake.build_table(batches, "b-1"), kms)
    kms.erase("patient-alpha")
    with pytest.raises(lake.LakeKeyUnavailable) as err:
        lake.read_patient(root, "patient-alpha", kms)
    assert "erased" in err.value.diagnostics()
    assert lake.read_patient(root, "patient-beta", kms).num_rows == 12
    stats = lake.lake_stats(root, kms)
    assert (stats["readings"], stats["unreadable_files"], stats["patients"]) == (12, 1, 2)


def test_listings_map_pseudonyms_back_and_forget_an_erased_id(
    lake_root: Path | LakeRoot, kms: LocalKeystore, batches: list[SampleBatch]
) -> None:
    """Folders hold pseudonyms; the keystore maps them back to ids (its encrypted record in
    each patient's key file), and once a patient is erased nothing names them any more."""
    root = lake_root
    lake.write_batch(root, "b-1", lake.build_table(batches, "b-1"), kms)
    h_alpha = kms.pseudonym("patient-alpha")
    assert h_alpha == kms.pseudonym("patient-alpha") != kms.pseudonym("patient-beta")
    assert h_alpha in kms.key_ref(kms.current_key_id("patient-alpha"))  # one scheme
    assert kms.patient_of(h_alpha) == "patient-alpha"
    assert kms.patient_of("0" * 32) is None and kms.patient_of("../x") is None
    rows = lake.patient_summaries(root, kms)
    assert [(r["patient_id"], r["readings"]) for r in rows] == [
        ("patient-alpha", 24),
        ("patient-beta", 12),
    ]
    assert b"patient-alpha" not in (kms.dir / f"{h_alpha}.json").read_bytes()

    kms.erase("patient-alpha")
    assert kms.patient_of(h_alpha) is None and kms.pseudonym_erased(h_alpha)
    rows = lake.patient_summaries(root, kms)
    assert [(r["patient_id"], r["readings"], r["unreadable_files"]) for r in rows] == [
        ("patient-beta", 12, 0),
        (None, 0, 1),
    ]
    assert rows[1]["pseudonym"] == h_alpha
    assert "patient-alpha" not in repr(rows)


def test_a_key_file_without_the_id_record_gets_it_on_the_next_write(tmp_path: Path) -> None:
    """Keystores written before the id records: the sealer's next key lookup adds it."""
    import json

    ks = LocalKeystore(tmp_path / "keys")
    ks.current_key_id("p-old")
    h = ks.pseudonym("p-old")
    path = ks.dir / f"{h}.json"
    doc = json.loads(path.read_bytes())
    del doc["patient"]
    path.write_text(json.dumps(doc))
    again = LocalKeystore(tmp_path / "keys")
    assert again.patient_of(h) is None
    assert again.current_key_id("p-old") == "patient:p-old:v1"
    assert again.patient_of(h) == "p-old"


def test_a_lake_of_the_old_layout_is_refused_in_one_line(
    tmp_path: Path, kms: LocalKeystore, batches: list[SampleBatch]
) -> None:
    """``patient_id=<id>/`` folders (plaintext ids) are not read: one error says what to do."""
    root = tmp_path / "lake"
    lake.write_batch(root, "b-1", lake.build_table(batches, "b-1"), kms)
    old = root / "patient_id=patient-alpha" / "date=2024-11-21"
    old.mkdir(parents=True)
    (old / "b-0.parquet").write_bytes(b"PAR1")
    for call in (
        lambda: lake.read_patient(root, "patient-alpha", kms),
        lambda: lake.lake_stats(root, kms),
        lambda: lake.compact_lake(root, kms),
    ):
        with pytest.raises(lake.LakeError, match="old layout") as err:
            call()
        assert "\n" not in str(err.value) and "patient_id=<id>/" in str(err.value)
    with pytest.raises(ValueError, match=r"schema 1 manifest \(plaintext patient ids"):
        BatchManifest.model_validate({"schema_version": 1, "batch_id": "b-0"})


def test_rotation_old_files_stay_readable(lake_root: Path | LakeRoot, kms: LocalKeystore) -> None:
    tmp_path = lake_root
    lake.write_batch(tmp_path, "b-1", lake.build_table([_batch("d", "p-1")], "b-1"), kms)
    kms.rotate("p-1")
    later = _batch("d", "p-1", t0=T0 + 600 * US)
    (w,) = lake.write_batch(tmp_path, "b-2", lake.build_table([later], "b-2"), kms)
    assert w.key_id == "patient:p-1:v2"
    assert lake.read_patient(tmp_path, "p-1", kms).num_rows == 24


def test_idempotent_write_keeps_the_first_file(
    lake_root: Path | LakeRoot, kms: LocalKeystore, batches: list[SampleBatch]
) -> None:
    tmp_path = lake_root
    table = lake.table_from_batches(batches[:1], batch_id="b-1", first_leaf=5)
    first = lake.write_patient_file(tmp_path, "b-1", "patient-alpha", table, kms)
    data = _bytes(tmp_path, first.path)
    kms.rotate("patient-alpha")  # even with a new current key, the replay keeps the sealed file
    again = lake.write_patient_file(tmp_path, "b-1", "patient-alpha", table, kms)
    assert not again.created
    assert (again.path, again.sha256, again.bytes, again.key_id) == (
        first.path,
        first.sha256,
        first.bytes,
        "patient:patient-alpha:v1",
    )
    assert _bytes(tmp_path, first.path) == data
    # a fresh encryption of the same rows differs (random keys and IVs): why we keep the file
    assert lake.encode_parquet(table, kms=kms, key_id=first.key_id) != data
    assert _every_file(tmp_path) == [as_root(tmp_path).path(first.path)]  # no temp file left
    got = lake.read_patient(tmp_path, "patient-alpha", kms)
    assert sorted(got["leaf_index"].to_pylist()) == list(range(5, 17))


def test_duckdb_queries_a_decrypted_batch(
    tmp_path: Path, kms: LocalKeystore, batches: list[SampleBatch]
) -> None:
    """DuckDB cannot open these files itself: its Parquet encryption wants a raw footer key,
    not a KMS that unwraps per-patient data keys. So pyarrow decrypts and DuckDB queries the
    Arrow table (zero copy)."""
    lake.write_batch(tmp_path, "b-1", lake.build_table(batches, "b-1"), kms)
    con = duckdb.connect()
    con.register("readings", lake.read_patient(tmp_path, "patient-alpha", kms))
    ((count, avg, ids),) = con.sql(
        "select count(*), avg(value), count(distinct lower(hex(reading_id))) "
        "from readings where metric = 'heart_rate'"
    ).fetchall()
    expected = [
        v for b in batches[::2] for m, v in zip(b.metric, b.value, strict=True) if m == "heart_rate"
    ]
    assert count == len(expected) == ids
    assert avg == pytest.approx(sum(expected) / len(expected))


def test_stats_count_duplicates(
    lake_root: Path | LakeRoot, kms: LocalKeystore, batches: list[SampleBatch]
) -> None:
    tmp_path = lake_root
    lake.write_batch(tmp_path, "b-1", lake.build_table(batches, "b-1"), kms)
    # the same readings sealed again under another batch id: duplicates, visible in stats
    lake.write_batch(tmp_path, "b-2", lake.build_table(batches[:1], "b-2"), kms)
    stats = lake.lake_stats(tmp_path, kms)
    assert stats["readings"] == 48
    assert stats["distinct_reading_ids"] == 36
    assert stats["duplicates"] == 12
    assert (stats["batches"], stats["patients"], stats["files"]) == (2, 2, 3)
    root = as_root(tmp_path)
    rels = [f.path.removeprefix(root.base + "/") for f in root.files()]
    assert len(rels) == 3
    assert stats["bytes_on_disk"] == sum(len(_bytes(root, rel)) for rel in rels)


def test_unsafe_names_rejected(tmp_path: Path, kms: LocalKeystore) -> None:
    table = lake.build_table([_batch("d", "p-1")], "b-1")
    for bad in ("../x", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(lake.LakeError):
            lake.write_patient_file(tmp_path, "b-1", bad, table, kms)
        with pytest.raises(lake.LakeError):
            lake.write_patient_file(tmp_path, bad, "p-1", table, kms)
    with pytest.raises(lake.LakeError):  # rows of p-1 under another patient's name
        lake.write_patient_file(tmp_path, "b-1", "p-2", table, kms)


def test_bad_reading_ids_rejected() -> None:
    b = _batch("d", "p-1", n=1)
    b.reading_id = ["not-hex-" + "0" * 24, b.reading_id[1]]
    with pytest.raises(lake.LakeError):
        lake.build_table([b], "b-1")


def test_hex_ids_round_trip(batches: list[SampleBatch]) -> None:
    ids = [rid for b in batches for rid in b.reading_id]
    arr = ids_to_binary(ids)
    assert lake.hex_ids(arr).to_pylist() == ids
    assert lake.hex_ids(arr.slice(3, 5)).to_pylist() == ids[3:8]
    assert lake.hex_ids(pa.chunked_array([arr[:2], arr[2:]])).to_pylist() == ids


def test_uri_root(tmp_path: Path, kms: LocalKeystore, batches: list[SampleBatch]) -> None:
    uri = f"file://{tmp_path}/lake"
    written = lake.write_batch(uri, "b-1", lake.build_table(batches, "b-1"), kms)
    assert all((tmp_path / "lake" / w.path).is_file() for w in written)
    assert lake.read_patient(uri, "patient-beta", kms).num_rows == 12


def _decrypted_file_schema(data: bytes, kms: LocalKeystore) -> pa.Schema:
    factory, _ = _crypto(kms)
    props = factory.file_decryption_properties(_KMS_CONFIG, pe.DecryptionConfiguration())
    return pq.ParquetFile(pa.BufferReader(data), decryption_properties=props).schema_arrow


def test_reading_ids_are_derived_not_stored(
    lake_root: Path | LakeRoot, kms: LocalKeystore, batches: list[SampleBatch]
) -> None:
    root = lake_root
    written = lake.write_batch(root, "b-2", lake.build_table(batches, "b-2"), kms)
    for w in written:
        stored = _decrypted_file_schema(_bytes(root, w.path), kms).names
        assert "reading_id" not in stored
        assert set(ID_SOURCE_COLUMNS) <= set(stored)
    alpha = next(w for w in written if _dir(kms, "patient-alpha") in w.path)
    want = [r for b in batches if b.patient_id == "patient-alpha" for r in b.reading_id]
    got = lake.read_reading_ids(root, alpha.path, kms, "patient-alpha")
    assert sorted(got) == sorted(want)
    only = lake.read_patient(root, "patient-alpha", kms)
    assert only.schema.equals(lake.SCHEMA)


def test_format_1_files_with_stored_ids_still_read(
    tmp_path: Path, kms: LocalKeystore, batches: list[SampleBatch]
) -> None:
    """A file written before ids were derived keeps its stored ids (even ones that no longer
    match the derivation: stored bytes win, nothing is silently rewritten)."""
    table = sort_for_file(lake.build_table(batches[:1], "b-old"))
    bogus = pa.array([bytes([i]) * 16 for i in range(table.num_rows)], pa.binary(16))
    table = table.set_column(0, lake.SCHEMA.field("reading_id"), bogus)
    table = table.drop_columns(["clock_offset_us"])  # format 1 predates it
    key_id = kms.current_key_id("patient-alpha")
    factory, _ = _crypto(kms)
    config = pe.EncryptionConfiguration(
        footer_key=kms.key_ref(key_id), uniform_encryption=True, double_wrapping=False
    )
    props = factory.file_encryption_properties(_KMS_CONFIG, config)
    path = tmp_path / "lake" / file_path(kms.pseudonym("patient-alpha"), "2024-11-21", "b-old")
    path.parent.mkdir(parents=True)
    pq.write_table(table, path, encryption_properties=props)
    got = lake.read_patient(tmp_path / "lake", "patient-alpha", kms)
    assert got.schema.equals(lake.SCHEMA)
    assert got["reading_id"].to_pylist() == bogus.to_pylist()
    assert got["value"].to_pylist() == table["value"].to_pylist()
    assert got["clock_offset_us"].null_count == table.num_rows


def test_the_front_names_every_public_lake_name_once() -> None:
    """``streams.lake``'s lazy front and its ``__all__`` agree, and every name resolves."""
    assert sorted(lake._FRONT) == sorted(lake.__all__)
    for name in lake.__all__:
        module = importlib.import_module(f"streams.lake.{lake._FRONT[name]}")
        assert getattr(lake, name) is getattr(module, name), name
    with pytest.raises(AttributeError):
        _ = lake.no_such_name  # type: ignore[attr-defined]


def test_the_worker_does_not_load_pyarrow_for_the_batches_folder() -> None:
    """streams.app needs BATCHES_DIR from streams.lake.layout, not pyarrow's ~60 MB."""
    code = (
        "import sys, streams.app, streams.lake.layout\n"
        "assert 'pyarrow' not in sys.modules, sorted(m for m in sys.modules if 'arrow' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
