"""The lake's rows as Arrow: the schema, building tables from SampleBatches, sorting, splitting.

Rows: one per sample, columns in :data:`SCHEMA`. ``reading_id`` is *not* stored (lake
format 2, :data:`FILE_SCHEMA`): it is derived from device, metric, seq and device time
(:func:`vitalproof.schema.reading_id`), and as a random 16-byte digest it was by far the
largest column (16 of ~18 bytes per sample). Readers recompute it
(:func:`derive_reading_ids`) and return rows with :data:`SCHEMA`, where it is a
``fixed_size_binary(16)`` (:func:`hex_ids` spells it in hex); files of format 1, which stored
it, are still read as they are. The Arrow schema is not stored in the file either
(``store_schema=False``, 1.6 KB per file): readers cast to :data:`SCHEMA` (:func:`_upgrade`).

Everything here is pure Arrow: no file, no key.
"""

from __future__ import annotations

import array
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streams.lake.errors import LakeError
from streams.lake.layout import _check_name
from vitalproof.hashing import reading_id_digests
from vitalproof.schema import SampleBatch, pack_reading_ids

__all__ = [
    "FILE_SCHEMA",
    "ID_SOURCE_COLUMNS",
    "SCHEMA",
    "CleanPosition",
    "build_table",
    "derive_reading_ids",
    "hex_ids",
    "ids_to_binary",
    "sort_for_file",
    "split_by_date",
    "split_by_patient",
    "table_from_batches",
]

_UTC = "UTC"
_TS = pa.timestamp("us", tz=_UTC)
_DICT = pa.dictionary(pa.int32(), pa.string())

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
        # where the reading came from: its vitals.clean partition and offset, and its place
        # among the readings of that record (null in files written before the columns
        # existed): what lets the clinician service number events again past Kafka's retention
        pa.field("clean_partition", pa.int32()),
        pa.field("clean_offset", pa.int64()),
        pa.field("clean_index", pa.int32()),
    ],
    metadata={"vitalproof.lake": "2"},
)
#: Columns as stored: everything but the derivable ``reading_id``.
FILE_SCHEMA = pa.schema(
    [f for f in SCHEMA if f.name != "reading_id"], metadata={"vitalproof.lake": "2"}
)
#: What :func:`vitalproof.schema.reading_id` is computed from.
ID_SOURCE_COLUMNS = ["device_id", "metric", "seq", "device_time"]


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


@dataclass(frozen=True, slots=True)
class CleanPosition:
    """Where one SampleBatch's readings came from: a ``vitals.clean`` record (partition,
    offset) and each reading's place among that record's readings (decode order)."""

    partition: int
    offset: int
    index: Sequence[int]


def build_table(
    batches: Sequence[SampleBatch],
    batch_id: str,
    *,
    leaf_index: Sequence[int] | None = None,
    first_leaf: int = 0,
    with_reading_ids: bool = True,
    positions: Sequence[CleanPosition] | None = None,
) -> pa.Table:
    """The lake rows of normalized SampleBatches, in concatenation order (unsorted).

    Column lists go straight to ``pa.array``; per-batch fields (device, patient, gateway,
    receive time...) become dictionary indices repeated with numpy, so no Python object is
    created per sample beyond those SampleBatch already holds. ``leaf_index`` is each row's
    leaf position in the batch's Merkle tree; by default ``first_leaf`` + the concatenation
    order, which is what a batcher that appends leaves in the same order gets.
    ``positions`` (one per batch) fill the ``clean_*`` columns; without them they are null.
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
        **_position_columns(positions, counts),
    }
    if not with_reading_ids:  # rows as stored: the ids are derived on read
        return pa.Table.from_pydict(cols, schema=FILE_SCHEMA)
    return pa.Table.from_pydict(
        {"reading_id": ids_to_binary(chain("reading_id")), **cols}, schema=SCHEMA
    )


def _position_columns(
    positions: Sequence[CleanPosition] | None, counts: Sequence[int]
) -> dict[str, pa.Array]:
    n = sum(counts)
    if positions is None:
        return {
            "clean_partition": pa.nulls(n, pa.int32()),
            "clean_offset": pa.nulls(n, pa.int64()),
            "clean_index": pa.nulls(n, pa.int32()),
        }
    if len(positions) != len(counts) or any(
        len(p.index) != c for p, c in zip(positions, counts, strict=True)
    ):
        raise LakeError("positions need one entry per batch and one index per reading")
    return {
        "clean_partition": _repeat(pa.array([p.partition for p in positions], pa.int32()), counts),
        "clean_offset": _repeat(pa.array([p.offset for p in positions], pa.int64()), counts),
        "clean_index": pa.array(_indices([p.index for p in positions]), pa.int32()),
    }


def _indices(parts: Sequence[Sequence[int]]) -> np.ndarray[Any, np.dtype[np.int32]]:
    """The indices concatenated; ranges (the norm: nothing deduplicated) without a Python
    int per reading."""
    arrays = [
        np.arange(p.start, p.stop, dtype=np.int32)
        if isinstance(p, range)
        else np.asarray(p, dtype=np.int32)
        for p in parts
    ]
    return np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int32)


def table_from_batches(
    batches: Sequence[SampleBatch],
    *,
    batch_id: str,
    first_leaf: int = 0,
    positions: Sequence[CleanPosition] | None = None,
) -> pa.Table:
    """One patient's (or any) rows of a batch whose leaves start at ``first_leaf``, as the
    sealer writes them: without the reading id column, which files do not store (building
    it only for :func:`~streams.lake.write.encode_parquet` to drop it cost a hex decode of
    every id)."""
    return build_table(
        batches, batch_id, first_leaf=first_leaf, with_reading_ids=False, positions=positions
    )


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
