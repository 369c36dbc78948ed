"""Sealing a batch into the lake: encrypted Parquet, one file per (batch, patient, UTC date).

One (batch, patient) normally gives one file. Rows of one file must all belong to its date
folder, or Hive-aware readers (DuckDB, pyarrow datasets) would attach the wrong ``date`` to
them, so when a batch straddles midnight UTC or carries a device's backlog the patient's rows
are split per date: :func:`write_patient_files` returns one :class:`WrittenFile` per date.

Files: rows sorted by (metric, device_time), zstd, 128k-row groups, dictionary encoding for
low-cardinality columns and the (quantized) values, DELTA_BINARY_PACKED for times, seq and
leaf index; encrypted as :mod:`streams.lake.crypto` says, in the patient's folder named by
their pseudonym (:meth:`~streams.lake.keystore.Kms.pseudonym`). Publishing is atomic and never
overwrites: a replay finds the sealed file and describes it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from streams.lake.crypto import _file_key_id, encryption_properties
from streams.lake.errors import LakeError, LakeSpansDates
from streams.lake.keystore import Kms
from streams.lake.layout import _check_name, file_path
from streams.lake.storage import LakeRoot, _existing, resolve_fs
from streams.lake.table import FILE_SCHEMA, sort_for_file, split_by_date, split_by_patient

__all__ = [
    "WrittenFile",
    "encode_parquet",
    "write_batch",
    "write_patient_file",
    "write_patient_files",
]

#: Rows per row group: big enough for efficient column chunks, small enough to skip by time.
ROW_GROUP_ROWS = 128 * 1024
ZSTD_LEVEL = 3

_DICT_COLUMNS = [
    "device_id",
    "patient_id",
    "metric",
    "unit",
    "transport",
    "gateway_id",
    "batch_id",
    # few distinct values per file: dictionary + RLE beats any other encoding
    "receive_time",
    "quality",
    "tz_offset_min",
    "clock_offset_us",  # one value per message: RLE runs
    # vitals are quantized (integer bpm, %, 0.01 Cel): ~0.7 B/sample less than
    # BYTE_STREAM_SPLIT in bench/lake_bench.py; high-entropy signals (PPG, accelerometer)
    # overflow the dictionary page and the writer falls back to PLAIN by itself
    "value",
]
#: Parquet encodings of the non-dictionary columns (chosen with bench/lake_bench.py).
COLUMN_ENCODING = {
    "device_time": "DELTA_BINARY_PACKED",
    "seq": "DELTA_BINARY_PACKED",
    "leaf_index": "DELTA_BINARY_PACKED",
}


@dataclass(frozen=True, slots=True)
class WrittenFile:
    """What the manifest records about one sealed file."""

    path: str  # relative to the lake root, "/"-separated: patient=<pseudonym>/date=<d>/...
    sha256: str
    rows: int
    key_id: str  # patient:<p>:v<n>
    bytes: int
    created: bool  # False: the file existed already (a replay) and was kept


def encode_parquet(
    table: pa.Table, *, kms: Kms | None, key_id: str | None = None, presorted: bool = False
) -> bytes:
    """The bytes of one lake file (sorted, zstd, encrypted under ``key_id`` unless kms=None).

    ``kms=None`` writes plaintext; only benchmarks use it. Pure apart from the KMS call, so
    the writer can hash and fsync what it is about to publish. ``presorted``: the rows are
    already in :func:`~streams.lake.table.sort_for_file` order (compaction sorts a
    patient-day once, then cuts it into files).
    """
    props = None
    if kms is not None:
        if key_id is None:
            raise LakeError("encrypting needs a key id")
        props = encryption_properties(kms, key_id)
    if not presorted:
        table = sort_for_file(table)
    if "reading_id" in table.column_names:
        table = table.drop_columns(["reading_id"])
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(
        sink,
        FILE_SCHEMA,
        compression="zstd",
        compression_level=ZSTD_LEVEL,
        use_dictionary=_DICT_COLUMNS,
        column_encoding=COLUMN_ENCODING,
        sorting_columns=[
            pq.SortingColumn(FILE_SCHEMA.get_field_index("metric")),
            pq.SortingColumn(FILE_SCHEMA.get_field_index("device_time")),
        ],
        store_schema=False,
        encryption_properties=props,
    ) as writer:
        writer.write_table(table.cast(FILE_SCHEMA), row_group_size=ROW_GROUP_ROWS)
    return bytes(sink.getvalue().to_pybytes())


def write_patient_file(
    root: str | Path | LakeRoot,
    batch_id: str,
    patient_id: str,
    table: pa.Table,
    kms: Kms,
    *,
    fs: pafs.FileSystem | None = None,
) -> WrittenFile:
    """Seal one patient's rows of one batch, all of one UTC date, as one encrypted file.

    Idempotent: if the file exists it is kept, not rewritten. Encryption uses random data
    keys and IVs, so a rewrite would produce different bytes (and a different sha256) for
    the same rows; a replay must find the sealed file and report *its* hash. Rows spanning
    several UTC dates raise :class:`LakeSpansDates`; :func:`write_patient_files` splits them.
    """
    by_date = _patient_rows_by_date(batch_id, patient_id, table)
    if len(by_date) > 1:
        raise LakeSpansDates(batch_id, patient_id, list(by_date))
    fs, base = resolve_fs(root, fs)
    ((date, rows),) = by_date.items()
    rel = file_path(kms.pseudonym(patient_id), date, batch_id)
    return _write_one(fs, base, rel, patient_id, rows, kms)


def write_patient_files(
    root: str | Path | LakeRoot,
    batch_id: str,
    patient_id: str,
    table: pa.Table,
    kms: Kms,
    *,
    fs: pafs.FileSystem | None = None,
) -> list[WrittenFile]:
    """Seal one patient's rows of one batch: one file per UTC date of device_time.

    Usually one file; two when the batch straddles midnight UTC, more for a device backlog.
    """
    by_date = _patient_rows_by_date(batch_id, patient_id, table)
    fs, base = resolve_fs(root, fs)
    h = kms.pseudonym(patient_id)
    return [
        _write_one(fs, base, file_path(h, date, batch_id), patient_id, rows, kms)
        for date, rows in by_date.items()
    ]


def write_batch(
    root: str | Path | LakeRoot,
    batch_id: str,
    table: pa.Table,
    kms: Kms,
    *,
    fs: pafs.FileSystem | None = None,
) -> list[WrittenFile]:
    """Every patient's files of one batch."""
    fs, base = resolve_fs(root, fs)
    out: list[WrittenFile] = []
    for patient_id, rows in split_by_patient(table).items():
        out.extend(write_patient_files(base, batch_id, patient_id, rows, kms, fs=fs))
    return out


def _patient_rows_by_date(batch_id: str, patient_id: str, table: pa.Table) -> dict[str, pa.Table]:
    _check_name(patient_id, "patient id")
    _check_name(batch_id, "batch id")
    if table.num_rows == 0:
        raise LakeError(f"no rows for patient {patient_id} in batch {batch_id}")
    present = pc.unique(pc.cast(table["patient_id"], pa.string())).to_pylist()
    if present != [patient_id]:
        raise LakeError(f"table for patient {patient_id} holds rows of {sorted(present)}")
    return split_by_date(table)


def _write_one(
    fs: pafs.FileSystem, base: str, rel: str, patient_id: str, rows: pa.Table, kms: Kms
) -> WrittenFile:
    path = f"{base}/{rel}"
    existing = _existing(fs, path)
    if existing is None:
        key_id = kms.current_key_id(patient_id)
        data = encode_parquet(rows, kms=kms, key_id=key_id)
        # Local: temp file, fsync, link; S3: one PUT, visible only once complete.
        created = LakeRoot(fs, base, base).publish_new(rel, data, mode=0o640)
        if created:
            digest = hashlib.sha256(data).hexdigest()
            return WrittenFile(rel, digest, rows.num_rows, key_id, len(data), True)
        existing = _existing(fs, path)
        if existing is None:
            raise LakeError(f"{path} vanished while being published")
    # A replay: same batch id, so the same rows ("Effectively once"); keep and describe that
    # file.
    return WrittenFile(
        rel,
        hashlib.sha256(existing).hexdigest(),
        rows.num_rows,
        _file_key_id(existing, kms, patient_id),
        len(existing),
        False,
    )
