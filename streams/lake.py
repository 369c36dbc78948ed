"""The lake: sealed batches as encrypted Parquet, one file per (batch, patient, UTC date).

Layout (Hive style)::

    <root>/patient_id=<patient>/date=<YYYY-MM-DD>/<batch_id>.parquet

Why patient first, then date: erasure, consent and access are all per patient (invariant 5
and 6), and every read is "this patient, this time range". With the patient at the top, a
reader lists one folder and prunes by date folder before decrypting anything; erasing a
patient is one key deletion (and, if wanted, one folder deletion) that touches nobody else's
files. The date is the UTC date of ``device_time``, the time a clinician asks about.

One (batch, patient) normally gives one file. Rows of one file must all belong to its date
folder, or Hive-aware readers (DuckDB, pyarrow datasets) would attach the wrong ``date`` to
them, so when a batch straddles midnight UTC or carries a device's backlog the patient's rows
are split per date: :func:`write_patient_files` returns one :class:`WrittenFile` per date.

Rows: one per sample, sorted by (metric, device_time) in a file, columns in :data:`SCHEMA`;
zstd, 128k-row groups, dictionary encoding for low-cardinality columns and the (quantized)
values, DELTA_BINARY_PACKED for times, seq and leaf index.
``reading_id`` is *not* stored (lake format 2): it is derived from device, metric, seq and
device time (:func:`vitalproof.schema.reading_id`), and as a random 16-byte digest it was by
far the largest column (16 of ~18 bytes per sample). Readers recompute it and return rows with
:data:`SCHEMA`, where it is a ``fixed_size_binary(16)`` (:func:`hex_ids` spells it in hex);
files of format 1, which stored it, are still read as they are. The Arrow schema is not stored
in the file either (``store_schema=False``, 1.6 KB per file): readers cast to :data:`SCHEMA`.

Encryption: Parquet modular encryption (``pyarrow.parquet.encryption``), encrypted footer,
every column and the footer under the patient's current key (``uniform_encryption=True``, the
same as mapping every column to the footer key). Parquet generates a random data key per
file and asks our :class:`KmsBridge` to wrap it with the patient key (single wrapping: the
local keystore is in process, so the KMS round trips double wrapping saves are free, and
single wrapping means there is no cached intermediate key that could outlive an erasure).
The footer stores :meth:`Kms.key_ref` (an opaque HMAC reference), not the key id, because
the key id contains the patient id and files must not.

DuckDB cannot read these files directly: its Parquet encryption takes a raw footer key, not a
KMS, so it cannot unwrap data keys through our keystore. Decrypt with :func:`read_patient`
(pyarrow) and query the Arrow table with DuckDB.
"""

from __future__ import annotations

import array
import base64
import contextlib
import datetime as dt
import hashlib
import itertools
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe

from streams.keystore import KeystoreError, Kms
from vitalproof.durable import publish_new
from vitalproof.errors import VitalproofError
from vitalproof.hashing import reading_id_digests
from vitalproof.schema import SampleBatch, pack_reading_ids

__all__ = [
    "FILE_SCHEMA",
    "SCHEMA",
    "KmsBridge",
    "LakeError",
    "LakeKeyUnavailable",
    "LakeSpansDates",
    "WrittenFile",
    "build_table",
    "derive_reading_ids",
    "encode_parquet",
    "hex_ids",
    "lake_stats",
    "list_patient_files",
    "read_patient",
    "resolve_fs",
    "table_from_batches",
    "write_batch",
    "write_patient_file",
    "write_patient_files",
]

_UTC = "UTC"
_TS = pa.timestamp("us", tz=_UTC)
_DICT = pa.dictionary(pa.int32(), pa.string())
_US_PER_DAY = 86_400_000_000

SCHEMA = pa.schema(
    [
        pa.field("reading_id", pa.binary(16), nullable=False),
        pa.field("device_id", _DICT, nullable=False),
        pa.field("patient_id", _DICT, nullable=False),
        pa.field("metric", _DICT, nullable=False),
        pa.field("value", pa.float64()),  # null when Quality.INVALID
        pa.field("unit", _DICT, nullable=False),
        pa.field("device_time", _TS, nullable=False),
        pa.field("receive_time", _TS, nullable=False),
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("quality", pa.int32(), nullable=False),
        pa.field("transport", _DICT, nullable=False),
        pa.field("gateway_id", _DICT, nullable=False),
        pa.field("tz_offset_min", pa.int16()),
        # receive clock minus device clock as estimated when the message arrived (null before
        # a device's first usable message, and in files written before the column existed)
        pa.field("clock_offset_us", pa.int64()),
        pa.field("batch_id", _DICT, nullable=False),
        pa.field("leaf_index", pa.int32(), nullable=False),
    ],
    metadata={"vitalproof.lake": "2"},
)
#: Columns as stored: everything but the derivable ``reading_id``.
FILE_SCHEMA = pa.schema(
    [f for f in SCHEMA if f.name != "reading_id"], metadata={"vitalproof.lake": "2"}
)
#: What :func:`vitalproof.schema.reading_id` is computed from.
ID_SOURCE_COLUMNS = ["device_id", "metric", "seq", "device_time"]

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

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")


# -- errors ----------------------------------------------------------------------------------


class LakeError(VitalproofError):
    """A lake file or path is invalid or cannot be read or written."""


class LakeSpansDates(LakeError):
    """One patient's rows of a batch fall on several UTC dates: they need several files."""

    def __init__(self, batch_id: str, patient_id: str, dates: list[str]) -> None:
        super().__init__(
            f"batch {batch_id} spans {', '.join(dates)} for patient {patient_id}: "
            f"a file holds one date; use write_patient_files"
        )
        self.dates = dates


class LakeKeyUnavailable(LakeError):
    """A file cannot be decrypted because its key is erased, unknown or does not unwrap."""

    def __init__(self, path: str, key: str | None, cause: Exception) -> None:
        super().__init__(f"cannot decrypt {path}: {cause}")
        self.path = path
        self.key = key
        self.cause = cause

    def diagnostics(self) -> str:
        inner = cause.diagnostics() if isinstance(cause := self.cause, VitalproofError) else ""
        return f"cannot decrypt {self.path} (key {self.key or 'unknown'}). {inner}".strip()


# -- building tables (pure) ------------------------------------------------------------------


def _repeat(values: pa.Array, counts: Sequence[int]) -> pa.Array:
    """``values[i]`` repeated ``counts[i]`` times, via run-end decoding (no Python loop)."""
    keep = [i for i, c in enumerate(counts) if c]
    if not keep:
        return pa.array([], values.type)
    if len(keep) != len(counts):
        values = values.take(pa.array(keep, pa.int32()))
    ends = pa.array(itertools.accumulate(counts[i] for i in keep), pa.int32())
    return pc.run_end_decode(pa.RunEndEncodedArray.from_arrays(ends, values))


def _per_batch_dict(values: Sequence[str], counts: Sequence[int]) -> pa.DictionaryArray:
    """A dictionary column from one value per SampleBatch: no Python object per sample."""
    uniq: dict[str, int] = {}
    codes = pa.array([uniq.setdefault(v, len(uniq)) for v in values], pa.int32())
    return pa.DictionaryArray.from_arrays(_repeat(codes, counts), pa.array(list(uniq), pa.string()))


def ids_to_binary(ids: Sequence[str]) -> pa.FixedSizeBinaryArray:
    """32-hex reading ids -> fixed_size_binary(16), in one join and one fromhex call."""
    try:
        raw = pack_reading_ids(ids)
    except ValueError as e:
        raise LakeError(str(e)) from None
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(ids), [None, pa.py_buffer(raw)])


def hex_ids(arr: pa.Array | pa.ChunkedArray) -> pa.StringArray:
    """fixed_size_binary(16) reading ids -> their 32-char lowercase hex strings.

    One ``bytes.hex()`` over the whole buffer and a computed offsets buffer: no Python
    string per id.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], pa.binary(16))
    if arr.null_count:
        raise LakeError("reading_id contains nulls")
    n = len(arr)
    buf = arr.buffers()[1]
    raw = b"" if buf is None else buf.to_pybytes()[16 * arr.offset : 16 * (arr.offset + n)]
    offsets = array.array("i", range(0, 32 * n + 1, 32))
    return pa.StringArray.from_buffers(
        n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(raw.hex().encode())
    )


def build_table(
    batches: Sequence[SampleBatch],
    batch_id: str,
    *,
    leaf_index: Sequence[int] | None = None,
    first_leaf: int = 0,
    with_reading_ids: bool = True,
) -> pa.Table:
    """The lake rows of normalized SampleBatches, in concatenation order (unsorted).

    Column lists go straight to ``pa.array``; per-batch fields (device, patient, gateway,
    receive time...) become dictionary indices repeated with numpy, so no Python object is
    created per sample beyond those SampleBatch already holds. ``leaf_index`` is each row's
    leaf position in the batch's Merkle tree; by default ``first_leaf`` + the concatenation
    order, which is what a batcher that appends leaves in the same order gets.
    """
    _check_name(batch_id, "batch id")
    for b in batches:
        if b.patient_id is None or b.transport is None or b.receive_time_us is None:
            raise LakeError(f"batch of device {b.device_id!r} is not normalized")
        if len(b.reading_id) != len(b):
            raise LakeError(f"batch of device {b.device_id!r} has no reading ids")
    counts = [len(b) for b in batches]
    n = sum(counts)

    def chain(attr: str) -> list[Any]:
        return list(itertools.chain.from_iterable(getattr(b, attr) for b in batches))

    values = pa.array(chain("value"), pa.float64(), from_pandas=True)  # NaN -> null
    tz = _repeat(pa.array([b.tz_offset_min for b in batches], pa.int16()), counts)
    rx = _repeat(pa.array([b.receive_time_us for b in batches], pa.int64()), counts)
    clock = _repeat(pa.array([b.clock_offset_us for b in batches], pa.int64()), counts)
    if leaf_index is None:
        ones = pa.repeat(pa.scalar(1, pa.int32()), n)
        leaves = pc.add(pc.cumulative_sum(ones), pa.scalar(first_leaf - 1, pa.int32()))
    else:
        if len(leaf_index) != n:
            raise LakeError(f"leaf_index has {len(leaf_index)} entries for {n} readings")
        leaves = pa.array(leaf_index, pa.int32())
    cols = {
        "device_id": _per_batch_dict([b.device_id for b in batches], counts),
        "patient_id": _per_batch_dict([b.patient_id or "" for b in batches], counts),
        "metric": pa.array(chain("metric"), pa.string()).dictionary_encode(),
        "value": values,
        "unit": pa.array(chain("unit"), pa.string()).dictionary_encode(),
        "device_time": pa.array(chain("device_time_us"), pa.int64()).cast(_TS),
        "receive_time": rx.cast(_TS),
        "seq": pa.array(chain("seq"), pa.int64()),
        "quality": pa.array(chain("quality"), pa.int32()),
        "transport": _per_batch_dict([str(b.transport) for b in batches], counts),
        "gateway_id": _per_batch_dict([b.gateway_id or "" for b in batches], counts),
        "tz_offset_min": tz,
        "clock_offset_us": clock,
        "batch_id": _per_batch_dict([batch_id], [n]),
        "leaf_index": leaves,
    }
    if not with_reading_ids:  # rows as stored: the ids are derived on read
        return pa.Table.from_pydict(cols, schema=FILE_SCHEMA)
    return pa.Table.from_pydict(
        {"reading_id": ids_to_binary(chain("reading_id")), **cols}, schema=SCHEMA
    )


def table_from_batches(
    batches: Sequence[SampleBatch], *, batch_id: str, first_leaf: int = 0
) -> pa.Table:
    """One patient's (or any) rows of a batch whose leaves start at ``first_leaf``, as the
    sealer writes them: without the reading id column, which files do not store (building
    it only for :func:`encode_parquet` to drop it cost a hex decode of every id)."""
    return build_table(batches, batch_id, first_leaf=first_leaf, with_reading_ids=False)


def sort_for_file(table: pa.Table) -> pa.Table:
    """Sort by (metric, device_time): runs of one metric make delta and RLE encodings tiny."""
    key = pa.table({"m": pc.cast(table["metric"], pa.string()), "t": table["device_time"]})
    return table.take(pc.sort_indices(key, [("m", "ascending"), ("t", "ascending")]))


def split_by_date(table: pa.Table) -> dict[str, pa.Table]:
    """Rows per UTC date of device_time (``YYYY-MM-DD`` -> rows), in date order."""
    if table.num_rows == 0:
        return {}
    dates = pc.cast(table["device_time"], pa.date32())
    uniq = pc.unique(dates).sort()
    if len(uniq) == 1:
        return {uniq[0].as_py().isoformat(): table}
    return {d.as_py().isoformat(): table.filter(pc.equal(dates, d)) for d in uniq}


def split_by_patient(table: pa.Table) -> dict[str, pa.Table]:
    """Rows per patient id (in order of first appearance)."""
    col = pc.cast(table["patient_id"], pa.string())
    return {p: table.filter(pc.equal(col, p)) for p in pc.unique(col).to_pylist()}


# -- encryption bridge -----------------------------------------------------------------------


class KmsBridge(pe.KmsClient):
    """Parquet's KmsClient, backed by our :class:`Kms`; remembers the keys it was asked for.

    Errors raised here reach the caller of pyarrow unchanged; ``keys_used`` lets the lake
    name the key in its own error.
    """

    def __init__(self, kms: Kms) -> None:
        super().__init__()
        self.kms = kms
        self.keys_used: list[str] = []

    def wrap_key(self, key_bytes: bytes, master_key_identifier: str) -> bytes:
        self.keys_used.append(master_key_identifier)
        return base64.b64encode(self.kms.wrap(master_key_identifier, key_bytes))

    def unwrap_key(self, wrapped_key: str | bytes, master_key_identifier: str) -> bytes:
        self.keys_used.append(master_key_identifier)
        return self.kms.unwrap(master_key_identifier, base64.b64decode(wrapped_key))


def _crypto(kms: Kms) -> tuple[pe.CryptoFactory, KmsBridge]:
    """A fresh factory per operation: its caches then never outlive an erasure."""
    bridge = KmsBridge(kms)
    return pe.CryptoFactory(lambda _config: bridge), bridge


_KMS_CONFIG = pe.KmsConnectionConfig(kms_instance_id="vitalproof")


def encode_parquet(table: pa.Table, *, kms: Kms | None, key_id: str | None = None) -> bytes:
    """The bytes of one lake file (sorted, zstd, encrypted under ``key_id`` unless kms=None).

    ``kms=None`` writes plaintext; only benchmarks use it. Pure apart from the KMS call, so
    the writer can hash and fsync what it is about to publish.
    """
    props = None
    if kms is not None:
        if key_id is None:
            raise LakeError("encrypting needs a key id")
        factory, _ = _crypto(kms)
        config = pe.EncryptionConfiguration(
            footer_key=kms.key_ref(key_id),
            uniform_encryption=True,
            plaintext_footer=False,
            double_wrapping=False,
            encryption_algorithm="AES_GCM_V1",
        )
        props = factory.file_encryption_properties(_KMS_CONFIG, config)
        factory.remove_cache_entries_for_all_tokens()  # see _read_file
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


# -- paths and filesystems -------------------------------------------------------------------


def _check_name(name: str, what: str) -> None:
    """Names become path segments: no separators, no dot-dot, nothing to escape."""
    if not _NAME_RE.match(name) or ".." in name:
        raise LakeError(f"{what} {name!r} is not a safe path segment ([A-Za-z0-9._@+-], <=128)")


def resolve_fs(root: str | Path, fs: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local folder or a URI such as ``s3://bucket/lake``."""
    if fs is not None:
        return fs, str(root).rstrip("/")
    text = str(root)
    if "://" in text:
        fs, path = pafs.FileSystem.from_uri(text)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(text).resolve())


def patient_dir(patient_id: str) -> str:
    """``patient_id=<p>``, relative to the lake root."""
    _check_name(patient_id, "patient id")
    return f"patient_id={patient_id}"


def file_path(patient_id: str, date: str, batch_id: str) -> str:
    """``patient_id=<p>/date=<d>/<batch>.parquet``, relative to the lake root."""
    _check_name(batch_id, "batch id")
    return f"{patient_dir(patient_id)}/date={date}/{batch_id}.parquet"


@dataclass(frozen=True, slots=True)
class WrittenFile:
    """What the manifest records about one sealed file."""

    path: str  # relative to the lake root, "/"-separated
    sha256: str
    rows: int
    key_id: str  # patient:<p>:v<n>
    bytes: int
    created: bool  # False: the file existed already (a replay) and was kept


# -- writing (I/O) ---------------------------------------------------------------------------


def _existing(fs: pafs.FileSystem, path: str) -> bytes | None:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return bytes(f.read())


def write_patient_file(
    root: str | Path,
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
    return _write_one(fs, base, file_path(patient_id, date, batch_id), patient_id, rows, kms)


def write_patient_files(
    root: str | Path,
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
    return [
        _write_one(fs, base, file_path(patient_id, date, batch_id), patient_id, rows, kms)
        for date, rows in by_date.items()
    ]


def write_batch(
    root: str | Path,
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
        if isinstance(fs, pafs.LocalFileSystem):
            created = publish_new(path, data, mode=0o640)
        else:
            # Object stores publish a PUT atomically on close; no temp-and-rename needed.
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with fs.open_output_stream(path) as f:
                f.write(data)
            created = True
        if created:
            digest = hashlib.sha256(data).hexdigest()
            return WrittenFile(rel, digest, rows.num_rows, key_id, len(data), True)
        existing = _existing(fs, path)
        if existing is None:
            raise LakeError(f"{path} vanished while being published")
    # A replay: same batch id, so the same rows (invariant 2); keep and describe that file.
    return WrittenFile(
        rel,
        hashlib.sha256(existing).hexdigest(),
        rows.num_rows,
        _file_key_id(existing, kms, patient_id),
        len(existing),
        False,
    )


def _file_key_id(data: bytes, kms: Kms, patient_id: str) -> str:
    """The key id a sealed file is encrypted under, found by opening its footer."""
    factory, bridge = _crypto(kms)
    props = factory.file_decryption_properties(_KMS_CONFIG, pe.DecryptionConfiguration())
    with contextlib.suppress(Exception):  # an erased key still names itself before failing
        pq.read_metadata(pa.BufferReader(data), decryption_properties=props)
    if not bridge.keys_used:
        return ""
    return _key_id_from_ref(bridge.keys_used[0], patient_id)


def _key_id_from_ref(ref: str, patient_id: str) -> str:
    version = ref.rsplit(":v", 1)[-1]
    return f"patient:{patient_id}:v{version}" if version.isdigit() else ref


# -- reading (I/O) ---------------------------------------------------------------------------


def _date_of_us(us: int) -> str:
    return (dt.date(1970, 1, 1) + dt.timedelta(days=us // _US_PER_DAY)).isoformat()


def _to_us(t: dt.datetime | int | None) -> int | None:
    if t is None or isinstance(t, int):
        return t
    if t.tzinfo is None:
        raise LakeError("start/end must be timezone-aware datetimes or microseconds since epoch")
    return (t - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)


def _files(fs: pafs.FileSystem, base: str) -> list[pafs.FileInfo]:
    sel = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    return sorted(
        (
            i
            for i in fs.get_file_info(sel)
            if i.type == pafs.FileType.File
            and i.base_name.endswith(".parquet")
            and not i.base_name.startswith(".")
        ),
        key=lambda i: i.path,
    )


BATCHES_DIR = "_batches"


def sealed_batch_ids(root: str | Path, *, fs: pafs.FileSystem | None = None) -> set[str]:
    """Batches whose manifest exists: the sealer's commit point.

    A worker killed after writing a batch's files but before its manifest leaves files that
    belong to no sealed batch; after restart the same records are sealed again under another
    batch id. Readers pass these ids as ``batches=`` so that such orphans stay invisible.
    """
    fs, base = resolve_fs(root, fs)
    sel = pafs.FileSelector(f"{base}/{BATCHES_DIR}", allow_not_found=True)
    return {
        i.base_name.removesuffix(".json")
        for i in fs.get_file_info(sel)
        if i.type == pafs.FileType.File and i.base_name.endswith(".json")
    }


def _in_batches(path: str, batches: Collection[str] | None) -> bool:
    return batches is None or path.rsplit("/", 1)[-1].removesuffix(".parquet") in batches


def list_patient_files(
    root: str | Path,
    patient_id: str,
    *,
    fs: pafs.FileSystem | None = None,
    start: dt.datetime | int | None = None,
    end: dt.datetime | int | None = None,
    batches: Collection[str] | None = None,
) -> list[str]:
    """Files of one patient whose date folder overlaps [start, end), without decrypting.

    ``batches``: only files of these batch ids (see :func:`sealed_batch_ids`); None: all.
    """
    fs, base = resolve_fs(root, fs)
    lo, hi = _to_us(start), _to_us(end)
    first = None if lo is None else _date_of_us(lo)
    last = None if hi is None else _date_of_us(hi - 1)
    out = []
    for info in _files(fs, f"{base}/{patient_dir(patient_id)}"):
        if not _in_batches(info.path, batches):
            continue
        m = re.search(r"/date=(\d{4}-\d{2}-\d{2})/", info.path)
        date = m.group(1) if m else None
        if date is not None and (
            (first is not None and date < first) or (last is not None and date > last)
        ):
            continue
        out.append(info.path)
    return out


def _read_file(
    fs: pafs.FileSystem,
    path: str,
    kms: Kms,
    patient_id: str,
    columns: list[str] | None = None,
) -> pa.Table:
    """Decrypt one file; rows come back with :data:`SCHEMA`'s types (or ``columns`` of it),
    ``reading_id`` recomputed when the file does not store it (lake format 2)."""
    factory, bridge = _crypto(kms)
    props = factory.file_decryption_properties(_KMS_CONFIG, pe.DecryptionConfiguration())
    try:
        with fs.open_input_file(path) as f:
            # use_threads=False, and the factory's caches (which hold our Python KMS client)
            # emptied at once: a KMS client left for C++ to release at interpreter exit
            # occasionally aborted the process ("terminate called without an active
            # exception") after all work was done.
            pf = pq.ParquetFile(f, decryption_properties=props)
            stored = pf.schema_arrow.names
            wanted = SCHEMA.names if columns is None else columns
            derive = "reading_id" in wanted and "reading_id" not in stored
            read = [c for c in wanted if c in stored]
            if derive:
                read += [c for c in ID_SOURCE_COLUMNS if c not in read]
            table = pf.read(columns=read, use_threads=False)
    except KeystoreError as e:
        key = _key_id_from_ref(bridge.keys_used[-1], patient_id) if bridge.keys_used else None
        raise LakeKeyUnavailable(path, key, e) from None
    except (OSError, pa.ArrowException) as e:
        raise LakeError(f"cannot read {path}: {e}") from None
    finally:
        factory.remove_cache_entries_for_all_tokens()
    if derive:
        table = table.append_column(
            pa.field("reading_id", pa.binary(16), nullable=False), derive_reading_ids(table)
        )
    schema = pa.schema([SCHEMA.field(c) for c in wanted], metadata=SCHEMA.metadata)
    return _upgrade(table, schema)


def derive_reading_ids(table: pa.Table) -> pa.FixedSizeBinaryArray:
    """Each row's :func:`vitalproof.schema.reading_id`, as 16-byte digests.

    Reading ids are not stored (they are 16 random bytes per sample); a reader pays one
    BLAKE2b per row instead, the same call that named the reading when it was sealed.
    """
    digests = reading_id_digests(
        pc.cast(table["device_id"], pa.string()).to_pylist(),
        pc.cast(table["metric"], pa.string()).to_pylist(),
        table["seq"].to_pylist(),
        pc.cast(table["device_time"], pa.int64()).to_pylist(),
    )
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(16), table.num_rows, [None, pa.py_buffer(digests)]
    )


def _upgrade(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` as ``schema``; a file written before a nullable column was added reads with
    that column null."""
    for f in schema:
        if f.name not in table.column_names and f.nullable:
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table.select(schema.names).cast(schema)


def read_reading_ids(
    root: str | Path,
    path: str,
    kms: Kms,
    patient_id: str,
    *,
    fs: pafs.FileSystem | None = None,
) -> list[str]:
    """The reading ids (hex) of one file, decrypting only that column."""
    fs, base = resolve_fs(root, fs)
    table = _read_file(fs, f"{base}/{path}", kms, patient_id, columns=["reading_id"])
    return hex_ids(table["reading_id"]).to_pylist()


def read_patient(
    root: str | Path,
    patient_id: str,
    kms: Kms,
    start: dt.datetime | int | None = None,
    end: dt.datetime | int | None = None,
    metrics: Iterable[str] | None = None,
    *,
    fs: pafs.FileSystem | None = None,
    batches: Collection[str] | None = None,
) -> pa.Table:
    """One patient's readings with device_time in [start, end), optionally some metrics.

    Decrypts every file in the date folders the range touches; a file whose key is erased or
    unknown raises :class:`LakeKeyUnavailable` naming that file. Returns rows in file order
    (date, batch, metric, time) with the lake's :data:`SCHEMA`.
    """
    fs, base = resolve_fs(root, fs)
    lo, hi = _to_us(start), _to_us(end)
    wanted = None if metrics is None else pa.array(sorted(set(metrics)), pa.string())
    parts = []
    for path in list_patient_files(base, patient_id, fs=fs, start=lo, end=hi, batches=batches):
        t = _read_file(fs, path, kms, patient_id)
        mask = None
        if lo is not None or hi is not None:
            ts = pc.cast(t["device_time"], pa.int64())
            if lo is not None:
                mask = pc.greater_equal(ts, lo)
            if hi is not None:
                upper = pc.less(ts, hi)
                mask = upper if mask is None else pc.and_(mask, upper)
        if wanted is not None:
            m = pc.is_in(pc.cast(t["metric"], pa.string()), value_set=wanted)
            mask = m if mask is None else pc.and_(mask, m)
        if mask is not None:
            t = t.filter(mask)
        parts.append(t)
    if not parts:
        return SCHEMA.empty_table()
    return pa.concat_tables(parts)


def lake_stats(
    root: str | Path,
    kms: Kms,
    *,
    fs: pafs.FileSystem | None = None,
    batches: Collection[str] | None = None,
) -> dict[str, int]:
    """Counts for operators and tests: readings, distinct ids, duplicates, batches, bytes.

    Files that cannot be decrypted (erased patients) are counted in ``unreadable_files`` and
    ``bytes_on_disk`` but not in the reading counts.
    """
    fs, base = resolve_fs(root, fs)
    infos = [i for i in _files(fs, base) if _in_batches(i.path, batches)]
    readings = unreadable = 0
    ids: list[pa.Array] = []
    batch_ids: set[str] = set()
    patients: set[str] = set()
    for info in infos:
        m = re.search(r"/patient_id=([^/]+)/", info.path)
        patient = m.group(1) if m else "?"
        patients.add(patient)
        batch_ids.add(info.base_name.removesuffix(".parquet"))
        try:
            t = _read_file(fs, info.path, kms, patient, columns=["reading_id"])
        except LakeKeyUnavailable:
            unreadable += 1
            continue
        readings += t.num_rows
        ids.extend(t["reading_id"].chunks)
    distinct = len(pc.unique(pa.concat_arrays(ids))) if ids else 0
    return {
        "readings": readings,
        "distinct_reading_ids": distinct,
        "duplicates": readings - distinct,
        "batches": len(batch_ids),
        "patients": len(patients),
        "files": len(infos),
        "unreadable_files": unreadable,
        "bytes_on_disk": sum(i.size or 0 for i in infos),
    }
