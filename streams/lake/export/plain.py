"""The tabular exports: CSV, JSON lines and plain Parquet, one output row per lake row.

Tabular formats keep every lake row, including a reading sealed in two batches (each row
names its batch and leaf, which is what a proof needs). They are built column-wise with Arrow
compute: no Python object per sample. Dictionary-encoded string columns are JSON-escaped once
per *distinct* value and then gathered by index.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from streams.lake.export.rows import _CHUNK_ROWS, _check_schema, _iso, quality_names
from streams.lake.table import SCHEMA, hex_ids

__all__ = ["EXPORT_COLUMNS", "plain_table", "write_csv", "write_jsonl", "write_parquet"]

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
