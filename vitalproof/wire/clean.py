"""The encoding of ``vitals.clean``: a normalized :class:`SampleBatch`, columns as raw arrays.

Why not the JSON of :meth:`SampleBatch.to_json`: on ``vitals.clean`` every sample is written
by normalize and read by the sealer, and JSON spends both sides' time on per-sample number
formatting and parsing (and 32 hex characters per reading id). Here every column is one
``array`` dump, encoded and decoded in C; reading ids travel as their 16 digest bytes.

Layout, little-endian::

    "VC" (2 bytes), version u8 (=1), samples N u32, header length H u32
    header   H bytes of JSON: every per-batch field and the runs of equal (metric, unit)
             {"device_id": ..., "patient_id": ..., "gateway_id": ..., "transport": ...,
              "rx": ..., "tz": ..., "runs": [[metric, unit, count], ...], "ids": true}
    t        N x i64   device time, µs UTC
    seq      N x i64
    v        N x f64   (NaN where Quality.INVALID)
    q        N x u32   quality flags
    id       N x 16 bytes (only when "ids" is true)

``"ids"`` is ``true`` (stored, as above), ``"derive"`` (the batch has reading ids, not
stored: :func:`decode` recomputes them, as the lake does, since an id is a function of
device, metric, seq and device time) or ``false`` (a batch without ids). Normalize writes
``"derive"``: 16 random bytes per sample were over a third of every record and the part no
codec can compress, and deriving them costs the reader less than decoding them.

A record may also be a *bundle* of such batches (normalize sends one per patient per take, so
Kafka and Faust pay per bundle, not per device message)::

    "VB" (2 bytes), version u8 (=1), samples u32 (all batches), batches K u32
    K x (length u32, one "VC" batch as above)

A new per-batch field goes into the header (absent means ``None``); a new per-sample column
needs a version bump. The header is JSON on purpose: one small document per message costs
nothing next to the columns and keeps the fields self-describing.
"""

from __future__ import annotations

import json
import struct
import sys
from array import array
from collections.abc import Sequence
from typing import Any

from vitalproof.errors import WireFormatError
from vitalproof.schema import SampleBatch, Transport
from vitalproof.units import Metric

MAGIC = b"VC"
VERSION = 1
_FIXED = struct.Struct("<2sBII")
_COLUMNS = (("device_time_us", "q"), ("seq", "q"), ("value", "d"), ("quality", "I"))
_METRICS = frozenset(m.value for m in Metric)
_BIG_ENDIAN = sys.byteorder == "big"
ID_BYTES = 16


BUNDLE_MAGIC = b"VB"
_LEN = struct.Struct("<I")


def is_clean_binary(data: bytes) -> bool:
    return data[:2] in (MAGIC, BUNDLE_MAGIC)


def sample_count(data: bytes) -> int:
    """Samples in an encoded batch or bundle, from the fixed header alone (no decode)."""
    return int(_FIXED.unpack_from(data)[2]) if len(data) >= _FIXED.size else 0


def encode_bundle(batches: Sequence[SampleBatch]) -> bytes:
    parts = [b""]
    for b in batches:
        one = encode(b)
        parts += [_LEN.pack(len(one)), one]
    parts[0] = _FIXED.pack(BUNDLE_MAGIC, VERSION, sum(map(len, batches)), len(batches))
    return b"".join(parts)


def decode_record(value: bytes) -> list[SampleBatch]:
    """The batches of any vitals.clean record: binary, or JSON from a worker that predates
    the binary records (what every reader of the topic should call)."""
    if is_clean_binary(value):
        return decode_any(value)
    return [SampleBatch.from_json(value)]


def decode_any(data: bytes) -> list[SampleBatch]:
    """The batches of a bundle, or the one batch of a plain record."""
    if data[:2] != BUNDLE_MAGIC:
        return [decode(data)]
    if len(data) < _FIXED.size:
        raise WireFormatError("clean bundle shorter than its fixed header")
    _magic, version, total, count = _FIXED.unpack_from(data)
    if version != VERSION:
        raise WireFormatError(f"unsupported clean bundle version {version} (expected 1)")
    pos = _FIXED.size
    out: list[SampleBatch] = []
    for k in range(count):
        if pos + _LEN.size > len(data):
            raise WireFormatError(f"clean bundle ends before batch {k} of {count}", offset=pos)
        (size,) = _LEN.unpack_from(data, pos)
        pos += _LEN.size
        if pos + size > len(data):
            raise WireFormatError(f"clean bundle: batch {k} runs past the end", offset=pos)
        out.append(decode(data[pos : pos + size]))
        pos += size
    if pos != len(data):
        raise WireFormatError(f"clean bundle: {len(data) - pos} bytes after its batches")
    if sum(map(len, out)) != total:
        raise WireFormatError(
            f"clean bundle: batches hold {sum(map(len, out))} samples, not {total}"
        )
    return out


def encode(batch: SampleBatch, *, store_ids: bool = False) -> bytes:
    """One batch; its reading ids (if any) are derived again on decode unless ``store_ids``."""
    n = len(batch)
    runs = [[metric, unit, stop - start] for (metric, unit), start, stop in batch.series_runs()]
    has_ids = bool(batch.reading_id)
    if has_ids and len(batch.reading_id) != n:
        raise ValueError(f"{len(batch.reading_id)} reading ids for {n} samples")
    with_ids = has_ids and store_ids
    ids: bool | str = True if with_ids else ("derive" if has_ids else False)
    header = {**batch.wire_header(), "runs": runs, "ids": ids}
    head = json.dumps(header, separators=(",", ":")).encode()
    parts = [_FIXED.pack(MAGIC, VERSION, n, len(head)), head]
    for attr, code in _COLUMNS:
        col = array(code, getattr(batch, attr))
        if _BIG_ENDIAN:
            col.byteswap()
        parts.append(col.tobytes())
    if with_ids:
        parts.append(bytes.fromhex("".join(batch.reading_id)))
    return b"".join(parts)


def decode(data: bytes) -> SampleBatch:
    """Decode and check the structure; :class:`WireFormatError` says what is wrong."""
    if len(data) < _FIXED.size:
        raise WireFormatError("clean record shorter than its fixed header")
    magic, version, n, head_len = _FIXED.unpack_from(data)
    if magic != MAGIC:
        raise WireFormatError(f"not a clean record (magic {magic!r})")
    if version != VERSION:
        raise WireFormatError(f"unsupported clean record version {version} (expected 1)")
    pos = _FIXED.size
    try:
        header = json.loads(data[pos : pos + head_len])
    except ValueError as e:
        raise WireFormatError(f"clean record header: {e}", offset=pos) from None
    if not isinstance(header, dict):
        raise WireFormatError("clean record header is not a JSON object", offset=pos)
    pos += head_len
    with_ids = header.get("ids") is True
    expected = pos + n * (8 + 8 + 8 + 4) + (n * ID_BYTES if with_ids else 0)
    if len(data) != expected:
        raise WireFormatError(f"clean record of {n} samples is {len(data)} bytes, not {expected}")
    b = _header_batch(header, n)
    for attr, code in _COLUMNS:
        col = array(code)
        size = col.itemsize * n
        col.frombytes(data[pos : pos + size])
        if _BIG_ENDIAN:
            col.byteswap()
        setattr(b, attr, col.tolist())
        pos += size
    if with_ids:
        hexed = data[pos:].hex()
        step = 2 * ID_BYTES
        b.reading_id = [hexed[i : i + step] for i in range(0, len(hexed), step)]
    elif header.get("ids") == "derive":
        b.fill_reading_ids()
    return b


def _header_batch(header: dict[str, Any], n: int) -> SampleBatch:
    device = header.get("device_id")
    if not isinstance(device, str) or not device:
        raise WireFormatError("clean record: device_id missing")
    b = SampleBatch(device_id=device)
    b.patient_id = _opt(header, "patient_id", str)
    b.gateway_id = _opt(header, "gateway_id", str)
    transport = _opt(header, "transport", str)
    if transport is not None:
        try:
            b.transport = Transport(transport)
        except ValueError:
            raise WireFormatError(f"clean record: unknown transport {transport!r}") from None
    b.receive_time_us = _opt(header, "rx", int)
    b.tz_offset_min = _opt(header, "tz", int)
    b.clock_offset_us = _opt(header, "clock_offset", int)
    runs = header.get("runs")
    if not isinstance(runs, list):
        raise WireFormatError("clean record: runs missing")
    total = 0
    for k, run in enumerate(runs):
        if not (isinstance(run, list) and len(run) == 3):
            raise WireFormatError(f"clean record: runs[{k}] is not [metric, unit, count]")
        metric, unit, count = run
        if metric not in _METRICS:
            raise WireFormatError(f"clean record: runs[{k}]: unknown metric {metric!r}")
        if not isinstance(unit, str) or type(count) is not int or count <= 0:
            raise WireFormatError(f"clean record: runs[{k}]: bad unit or count")
        b.metric += [metric] * count
        b.unit += [unit] * count
        total += count
    if total != n:
        raise WireFormatError(f"clean record: runs cover {total} samples, header says {n}")
    return b


def _opt(header: dict[str, Any], key: str, kind: type) -> Any:
    val = header.get(key)
    if val is None:
        return None
    if type(val) is not kind:
        raise WireFormatError(f"clean record: {key} must be {kind.__name__}")
    return val
