"""The compact batched binary encoding of a device :class:`~vitalproof.schema.SampleBatch`.

Why a second encoding: a 50 Hz triaxial accelerometer produces 150 samples a second, and in
JSON every one of them repeats a 16-digit timestamp, a sequence number and a decimal value
(about 35 bytes a sample). Regular sensors are regular: one start time and one period
describe all timestamps, one start and one step all sequence numbers, and the value is a
raw IEEE float. This format says exactly that, and decodes with ``array`` and ``struct`` in
C instead of a Python loop per sample.

The decoder returns the same :class:`SampleBatch` that :meth:`SampleBatch.from_json` gives
for the same samples (metric names, units, times, sequence numbers, float values, quality,
series order), so normalization cannot tell the two apart. The layout is specified in
``docs/wire-formats.md``; in short (little-endian, varints are LEB128, "zz" = zigzag)::

    header  "VP" (2 bytes), version u8 (=1), flags u8
            [device id: u8 length + UTF-8]   if flags & HAS_DEVICE
            [tz offset: i16 minutes]         if flags & HAS_TZ
            series count: varint (>= 1)
    series  metric code u8, series flags u8, unit code u8 [+ u8 length + UTF-8 if 255],
            count N: varint (>= 1), t0: i64 µs,
            times: zz period            | N-1 zz deltas     (S_TIME_DELTAS)
            seq:   zz seq0, zz step     | zz seq0, N-1 zz deltas (S_SEQ_DELTAS)
            values: N x f32             | N x f64           (S_FLOAT64)
            [quality: N x u8]                               (S_QUALITY)

Only device fields travel in this format: patient, gateway, transport, receive time and
reading ids are the pipeline's to add, so :func:`encode` refuses a batch that carries them.
"""

from __future__ import annotations

import math
import struct
import sys
from array import array
from itertools import accumulate, pairwise, repeat

from vitalproof.errors import WireFormatError
from vitalproof.schema import Quality, SampleBatch
from vitalproof.units import CANONICAL_UNIT, Metric

#: MQTT v5 content type / Kafka header naming this encoding.
CONTENT_TYPE_BINARY = "application/vnd.vitalproof.samples+bin;v=1"

MAGIC = b"VP"
VERSION = 1

# Header flags.
HAS_DEVICE = 0x01
HAS_TZ = 0x02
_HEADER_FLAGS = HAS_DEVICE | HAS_TZ

# Series flags.
S_FLOAT64 = 0x01  # values are float64 (else float32)
S_TIME_DELTAS = 0x02  # N-1 zigzag time deltas (else one zigzag period)
S_SEQ_DELTAS = 0x04  # N-1 zigzag seq deltas (else one zigzag step)
S_QUALITY = 0x08  # N quality bytes follow the values (else all 0)
_SERIES_FLAGS = S_FLOAT64 | S_TIME_DELTAS | S_SEQ_DELTAS | S_QUALITY

#: Metric codes on the wire. STABLE: append new metrics at the end, never reorder or reuse.
METRIC_CODES: dict[Metric, int] = {
    Metric.HEART_RATE: 1,
    Metric.RR_INTERVAL: 2,
    Metric.SPO2: 3,
    Metric.PULSE_RATE: 4,
    Metric.PULSE_AMPLITUDE_INDEX: 5,
    Metric.BODY_TEMPERATURE: 6,
    Metric.SKIN_TEMPERATURE: 7,
    Metric.SYSTOLIC_BP: 8,
    Metric.DIASTOLIC_BP: 9,
    Metric.MEAN_ARTERIAL_PRESSURE: 10,
    Metric.BODY_WEIGHT: 11,
    Metric.BODY_HEIGHT: 12,
    Metric.BMI: 13,
    Metric.BLOOD_GLUCOSE: 14,
    Metric.STEP_COUNT: 15,
    Metric.RESPIRATORY_RATE: 16,
    Metric.ENERGY_EXPENDED: 17,
    Metric.ACCEL_X: 18,
    Metric.ACCEL_Y: 19,
    Metric.ACCEL_Z: 20,
    Metric.PPG: 21,
    Metric.BATTERY_LEVEL: 22,
}
_METRIC_BY_CODE: dict[int, str] = {c: m.value for m, c in METRIC_CODES.items()}
_CODE_BY_METRIC: dict[str, int] = {m.value: c for m, c in METRIC_CODES.items()}

#: Unit codes. 0 = the metric's canonical unit, 255 = a UTF-8 string follows. STABLE.
UNIT_CANONICAL = 0
UNIT_INLINE = 255
UNIT_CODES: dict[str, int] = {
    "[degF]": 1,
    "kPa": 2,
    "[lb_av]": 3,
    "g": 4,
    "[in_i]": 5,
    "cm": 6,
    "mmol/L": 7,
    "[g]": 8,
    "s": 9,
    "kcal": 10,
    "{beats}/min": 11,
}
_UNIT_BY_CODE: dict[int, str] = {c: u for u, c in UNIT_CODES.items()}
_CANONICAL: dict[str, str] = {m.value: u for m, u in CANONICAL_UNIT.items()}

_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
_MAX_VARINT_BYTES = 10  # 64 bits in LEB128
_HEAD = struct.Struct("<2sBB")
_I16 = struct.Struct("<h")
_I64 = struct.Struct("<q")
_BIG_ENDIAN = sys.byteorder == "big"
# Zigzag decode of a one-byte varint (0..127): the common small delta, decoded in C via map.
_ZZ1: tuple[int, ...] = tuple((b >> 1) ^ -(b & 1) for b in range(128))
_INVALID = int(Quality.INVALID)

assert set(METRIC_CODES) == set(Metric), "every Metric needs a wire code"
assert len(set(METRIC_CODES.values())) == len(METRIC_CODES)


# -- encoding ------------------------------------------------------------------------------


def _zz(n: int) -> int:
    if not _I64_MIN <= n <= _I64_MAX:
        raise ValueError(f"{n} does not fit in 64 bits")
    return (n << 1) ^ (n >> 63)


def _put_varint(out: bytearray, n: int) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _deltas(xs: list[int]) -> list[int]:
    return [b - a for a, b in pairwise(xs)]


def encode(batch: SampleBatch, *, float32: bool | None = None, with_device: bool = True) -> bytes:
    """Encode a device payload; samples are grouped into series like the JSON encoder does.

    ``float32``: ``None`` (default) stores a series as float32 only where that is lossless,
    so decoding gives back exactly the values JSON would; ``True`` forces float32 (lossy,
    what a raw sensor reading really carries), ``False`` forces float64. ``with_device``
    False leaves the device id out: the MQTT topic names the device.

    Raises :class:`ValueError` for what the format cannot carry: an empty batch, pipeline
    fields (patient, gateway, transport, receive time, reading ids), an infinite value,
    integers beyond 64 bits, quality flags beyond a byte.
    """
    if not len(batch):
        raise ValueError("an empty batch has no series to encode")
    if (
        batch.patient_id is not None
        or batch.gateway_id is not None
        or batch.transport is not None
        or batch.receive_time_us is not None
        or batch.reading_id
    ):
        raise ValueError("the binary encoding carries device payloads only (no pipeline fields)")
    groups: dict[tuple[str, str], list[int]] = {}
    for i, key in enumerate(zip(batch.metric, batch.unit, strict=True)):
        g = groups.get(key)
        if g is None:
            groups[key] = [i]
        else:
            g.append(i)

    flags = 0
    out = bytearray(MAGIC)
    out += b"\x00\x00"
    if with_device:
        dev = batch.device_id.encode()
        if not 0 < len(dev) < 256:
            raise ValueError("device id must be 1..255 UTF-8 bytes")
        flags |= HAS_DEVICE
        out.append(len(dev))
        out += dev
    if batch.tz_offset_min is not None:
        if not -32768 <= batch.tz_offset_min <= 32767:
            raise ValueError(f"tz offset {batch.tz_offset_min} does not fit in 16 bits")
        flags |= HAS_TZ
        out += _I16.pack(batch.tz_offset_min)
    out[2], out[3] = VERSION, flags
    _put_varint(out, len(groups))

    times, seqs, values, quality = batch.device_time_us, batch.seq, batch.value, batch.quality
    whole = len(groups) == 1
    for (metric, unit), idx in groups.items():
        code = _CODE_BY_METRIC.get(metric)
        if code is None:
            raise ValueError(f"unknown metric {metric!r}")
        if whole:
            t, s, v = list(times), list(seqs), list(values)
            q = list(quality) if quality else [0] * len(v)
        else:
            t = [times[i] for i in idx]
            s = [seqs[i] for i in idx]
            v = [values[i] for i in idx]
            q = [quality[i] for i in idx] if quality else [0] * len(v)
        _encode_series(out, code, metric, unit, t, s, v, q, float32)
    return bytes(out)


def _encode_series(
    out: bytearray,
    code: int,
    metric: str,
    unit: str,
    t: list[int],
    s: list[int],
    v: list[float],
    q: list[int],
    float32: bool | None,
) -> None:
    n = len(v)
    sflags = 0
    head = len(out)
    out += bytes((code, 0))
    if unit == _CANONICAL[metric]:
        out.append(UNIT_CANONICAL)
    elif unit in UNIT_CODES:
        out.append(UNIT_CODES[unit])
    else:
        raw = unit.encode()
        if len(raw) > 255:
            raise ValueError(f"unit {unit!r} longer than 255 bytes")
        out.append(UNIT_INLINE)
        out.append(len(raw))
        out += raw
    _put_varint(out, n)
    if not _I64_MIN <= t[0] <= _I64_MAX:
        raise ValueError(f"time {t[0]} does not fit in 64 bits")
    out += _I64.pack(t[0])

    dt = _deltas(t)
    if not dt or dt.count(dt[0]) == len(dt):
        _put_varint(out, _zz(dt[0] if dt else 0))
    else:
        sflags |= S_TIME_DELTAS
        for d in dt:
            _put_varint(out, _zz(d))

    _put_varint(out, _zz(s[0]))
    ds = _deltas(s)
    if not ds or ds.count(ds[0]) == len(ds):
        _put_varint(out, _zz(ds[0] if ds else 0))
    else:
        sflags |= S_SEQ_DELTAS
        for d in ds:
            _put_varint(out, _zz(d))

    vals = [float(x) for x in v]
    if not all(map(math.isfinite, vals)) and any(map(math.isinf, vals)):
        raise ValueError("infinite values cannot be encoded (JSON cannot carry them either)")
    packed: array[float] | None = None
    if float32 is not False:
        f32 = array("f", vals)
        if float32 or _same_floats(f32.tolist(), vals):
            packed = f32
    if packed is None:
        packed = array("d", vals)
        sflags |= S_FLOAT64
    if _BIG_ENDIAN:
        packed.byteswap()
    out += packed.tobytes()

    if any(q):
        sflags |= S_QUALITY
        try:
            out += bytes(q)
        except ValueError:
            raise ValueError("quality flags must fit in one byte (0..255)") from None
    out[head + 1] = sflags


def _same_floats(a: list[float], b: list[float]) -> bool:
    """Equal lists, NaN equal to NaN (float32 keeps NaN, and NaN is NaN on the wire)."""
    if a == b:
        return True
    return all(x == y or (x != x and y != y) for x, y in zip(a, b, strict=True))


# -- decoding ------------------------------------------------------------------------------


class _Reader:
    """A cursor over the payload; every failure names the byte offset where it happened."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def fail(self, message: str, at: int | None = None) -> WireFormatError:
        return WireFormatError(message, offset=self.pos if at is None else at)

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            raise self.fail(f"truncated: {what} needs {n} bytes, {len(self.buf) - self.pos} left")
        chunk = self.buf[self.pos : end]
        self.pos = end
        return chunk

    def u8(self, what: str) -> int:
        if self.pos >= len(self.buf):
            raise self.fail(f"truncated: {what} missing")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def varint(self, what: str) -> int:
        buf, pos, n, shift = self.buf, self.pos, 0, 0
        start = pos
        while True:
            if pos >= len(buf):
                raise self.fail(f"truncated: {what} (varint) incomplete", at=pos)
            b = buf[pos]
            pos += 1
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
            if pos - start >= _MAX_VARINT_BYTES:
                raise self.fail(f"{what}: varint longer than 10 bytes", at=start)
        if n >> 64:
            raise self.fail(f"{what}: varint exceeds 64 bits", at=start)
        self.pos = pos
        return n

    def zz(self, what: str) -> int:
        n = self.varint(what)
        return (n >> 1) ^ -(n & 1)

    def zz_run(self, count: int, what: str) -> list[int]:
        """``count`` zigzag varints; one-byte ones (the usual case) decoded in C."""
        buf, pos = self.buf, self.pos
        chunk = buf[pos : pos + count]
        if len(chunk) == count and (not count or max(chunk) < 0x80):
            self.pos = pos + count
            return list(map(_ZZ1.__getitem__, chunk))
        return [self.zz(what) for _ in range(count)]


def decode_payload(payload: bytes, device_id: str) -> SampleBatch:
    """:func:`decode` with the signature :data:`vitalproof.wire.codecs.DECODERS` expects."""
    return decode(payload, device_id=device_id)


def decode(data: bytes, *, device_id: str | None = None) -> SampleBatch:
    """Decode and validate a binary payload; :class:`WireFormatError` says what and where.

    ``device_id`` (from the MQTT topic, which the broker's ACL vouches for) wins over the id
    inside the payload, and a payload naming another device is rejected, as in JSON.
    """
    r = _Reader(bytes(data))
    magic, version, flags = _HEAD.unpack(r.take(4, "header"))
    if magic != MAGIC:
        raise r.fail("not a vitalproof binary payload (bad magic)", at=0)
    if version != VERSION:
        raise r.fail(f"unsupported binary version {version} (expected {VERSION})", at=2)
    if flags & ~_HEADER_FLAGS:
        raise r.fail(f"unknown header flags {flags:#04x}", at=3)
    claimed: str | None = None
    if flags & HAS_DEVICE:
        at = r.pos
        n = r.u8("device id length")
        if n == 0:
            raise r.fail("empty device id", at=at)
        try:
            claimed = r.take(n, "device id").decode()
        except UnicodeDecodeError as e:
            raise r.fail("device id is not UTF-8", at=at + 1 + e.start) from None
    if device_id is not None and claimed is not None and claimed != device_id:
        raise r.fail(f"payload names device {claimed!r} but came from {device_id!r}", at=4)
    dev = device_id or claimed
    if not dev:
        raise r.fail("device_id missing (neither in the payload nor from the topic)", at=3)
    batch = SampleBatch(device_id=dev)
    if flags & HAS_TZ:
        batch.tz_offset_min = _I16.unpack(r.take(2, "tz offset"))[0]
    at = r.pos
    n_series = r.varint("series count")
    if n_series == 0:
        raise r.fail("series missing or empty", at=at)
    for k in range(n_series):
        _decode_series(r, batch, k)
    if r.pos != len(r.buf):
        raise r.fail(f"{len(r.buf) - r.pos} trailing bytes after the last series")
    return batch


def _decode_series(r: _Reader, batch: SampleBatch, k: int) -> None:
    at = r.pos
    code = r.u8(f"series[{k}] metric")
    metric = _METRIC_BY_CODE.get(code)
    if metric is None:
        raise r.fail(f"series[{k}]: unknown metric code {code}", at=at)
    sflags = r.u8(f"series[{k}] flags")
    if sflags & ~_SERIES_FLAGS:
        raise r.fail(f"series[{k}]: unknown series flags {sflags:#04x}", at=at + 1)
    at = r.pos
    ucode = r.u8(f"series[{k}] unit")
    if ucode == UNIT_CANONICAL:
        unit = _CANONICAL[metric]
    elif ucode == UNIT_INLINE:
        n = r.u8(f"series[{k}] unit length")
        try:
            unit = r.take(n, f"series[{k}] unit").decode()
        except UnicodeDecodeError as e:
            raise r.fail(f"series[{k}]: unit is not UTF-8", at=at + 2 + e.start) from None
    else:
        known = _UNIT_BY_CODE.get(ucode)
        if known is None:
            raise r.fail(f"series[{k}]: unknown unit code {ucode}", at=at)
        unit = known
    at = r.pos
    count = r.varint(f"series[{k}] count")
    if count == 0:
        raise r.fail(f"series[{k}]: empty series", at=at)
    # Every sample needs at least its value bytes: refuse counts the payload cannot hold
    # before allocating anything for them.
    width = 8 if sflags & S_FLOAT64 else 4
    if count * width > len(r.buf) - r.pos:
        raise r.fail(f"truncated: series[{k}] claims {count} samples", at=at)
    at = r.pos
    t0 = _I64.unpack(r.take(8, f"series[{k}] start time"))[0]
    if sflags & S_TIME_DELTAS:
        times = list(accumulate(r.zz_run(count - 1, f"series[{k}] time delta"), initial=t0))
    else:
        period = r.zz(f"series[{k}] period")
        times = list(range(t0, t0 + period * count, period)) if period else [t0] * count
    # A fixed period is monotonic: its ends are its extremes.
    lo, hi = (min(times), max(times)) if sflags & S_TIME_DELTAS else sorted((t0, times[-1]))
    if not _I64_MIN <= lo <= hi <= _I64_MAX:
        raise r.fail(f"series[{k}]: times leave the 64-bit range", at=at)
    at = r.pos
    seq0 = r.zz(f"series[{k}] seq start")
    if sflags & S_SEQ_DELTAS:
        seqs = list(accumulate(r.zz_run(count - 1, f"series[{k}] seq delta"), initial=seq0))
    else:
        step = r.zz(f"series[{k}] seq step")
        seqs = list(range(seq0, seq0 + step * count, step)) if step else [seq0] * count
    if not _I64_MIN <= min(seqs) <= max(seqs) <= _I64_MAX:
        raise r.fail(f"series[{k}]: sequence numbers leave the 64-bit range", at=at)
    vals = array("d" if sflags & S_FLOAT64 else "f")
    vals.frombytes(r.take(count * width, f"series[{k}] values"))
    if _BIG_ENDIAN:
        vals.byteswap()
    values = vals.tolist()
    quality = list(r.take(count, f"series[{k}] quality")) if sflags & S_QUALITY else [0] * count
    if not all(map(math.isfinite, values)):
        # NaN and +/-INF are the IEEE special values: no number, flagged, as JSON's null.
        for i, x in enumerate(values):
            if not math.isfinite(x):
                values[i] = math.nan
                quality[i] |= _INVALID
    batch.metric += repeat(metric, count)
    batch.unit += repeat(unit, count)
    batch.device_time_us += times
    batch.seq += seqs
    batch.value += values
    batch.quality += quality
