"""The canonical data model and the versioned wire schema of the Kafka topics.

A *reading* is one sample of one metric from one device. On the wire, readings travel as a
:class:`SampleBatch`: one device, many samples, stored column-wise so that a 50 Hz
accelerometer sends one message per second instead of fifty. This JSON shape is the device
payload on MQTT (device fields only) and can carry every field normalization fills in;
``vitals.clean`` carries the same fields in binary (:mod:`vitalproof.wire.clean`, whose
header is :meth:`SampleBatch.wire_header`, so a new per-batch field is added in one place).

Wire JSON, schema 1::

    {"schema": 1, "device_id": "dev-1", "patient_id": "p-1", "gateway_id": "gw-1",
     "transport": "mqtt", "rx": 1732200000000000, "tz": 60,
     "series": [{"metric": "heart_rate", "unit": "/min",
                 "t": [1732200000000000], "seq": [17], "v": [72.0],
                 "q": [0], "id": ["5f0c..."]}]}

``t`` and ``rx`` are microseconds since the Unix epoch, UTC; ``tz`` the device's UTC offset
in minutes; ``clock_offset`` (optional, vitals.clean only) the estimated receive clock minus
device clock in microseconds; ``q`` quality flags (:class:`Quality`); ``id`` reading ids
(:func:`vitalproof_verify.leaves.reading_id`).
On a device payload ``patient_id``, ``gateway_id``, ``transport``, ``rx``, ``clock_offset``,
``q`` and ``id`` are absent: the collector and normalization supply them.
"""

from __future__ import annotations

import itertools
import json
import math
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntFlag, StrEnum
from functools import cache
from typing import Any, TypeVar

from vitalproof import hashing
from vitalproof.errors import WireFormatError
from vitalproof.units import Metric
from vitalproof_verify.bundle import Reading

WIRE_SCHEMA_VERSION = 1
#: MQTT v5 content type / Kafka header naming the JSON encoding of a SampleBatch.
CONTENT_TYPE_JSON = "application/vnd.vitalproof.samples+json;v=1"


class Transport(StrEnum):
    MQTT = "mqtt"
    BLE = "ble"


class Quality(IntFlag):
    """Why a reading deserves a second look. Flags, never drops: 0 means clean."""

    NONE = 0
    INVALID = 1  # IEEE-11073 special value (NaN, NRes, +/-INF): the value is not a number
    IMPLAUSIBLE = 2  # outside the metric's plausibility range
    CONVERTED = 4  # reported in another unit and converted to the canonical one
    CLOCK_FUTURE = 8  # device time ahead of receive time beyond tolerance
    CLOCK_PAST = 16  # device time implausibly far in the past
    NO_SENSOR_CONTACT = 32  # the device said its sensor had no skin contact
    ESTIMATED_TIME = 64  # the device sent no time; receive time was used
    BEFORE_ENROLLMENT = 128  # device time before the device was enrolled, beyond tolerance


@cache
def flag_names(quality: int) -> tuple[str, ...]:
    """The names of the flags set in ``quality`` (a reading's flags as people read them)."""
    return tuple(str(q.name) for q in Quality if q and quality & q)


def pack_reading_ids(ids: Sequence[str]) -> bytes:
    """Reading ids (32 hex digits each) as their 16-byte digests, concatenated: one join
    and one ``fromhex`` for the whole list. ``ValueError`` if any id is not 32 hex digits."""
    try:
        packed = bytes.fromhex("".join(ids))  # fromhex skips whitespace: the length check
    except ValueError:
        packed = b""
    if (ids and set(map(len, ids)) != {32}) or len(packed) != 16 * len(ids):
        raise ValueError("reading ids must be 32 hex digits each (see reading_id)")
    return packed


K = TypeVar("K")


def runs_of(keys: Iterable[K], offset: int = 0) -> list[tuple[K, int, int]]:
    """``(key, start, stop)`` of each run of equal consecutive keys, positions from ``offset``.

    Samples arrive series by series, so a batch has a handful of runs however many samples
    it holds: per-run work (units, flags, templates, wire series) replaces per-sample work.
    ``groupby`` walks the keys in C.
    """
    out: list[tuple[K, int, int]] = []
    start = offset
    for key, grp in itertools.groupby(keys):
        stop = start + len(list(grp))
        out.append((key, start, stop))
        start = stop
    return out


@dataclass(slots=True)
class SampleBatch:
    """Many samples of one device, column-wise (one list per field, equal lengths)."""

    device_id: str
    metric: list[str] = field(default_factory=list)
    unit: list[str] = field(default_factory=list)
    device_time_us: list[int] = field(default_factory=list)
    seq: list[int] = field(default_factory=list)
    value: list[float] = field(default_factory=list)  # NaN where Quality.INVALID
    quality: list[int] = field(default_factory=list)
    reading_id: list[str] = field(default_factory=list)
    patient_id: str | None = None
    gateway_id: str | None = None
    transport: Transport | None = None
    receive_time_us: int | None = None
    tz_offset_min: int | None = None
    #: Estimated receive clock minus device clock, µs (streams.clock); an estimate, so
    #: carried beside the readings, never part of a reading id or leaf.
    clock_offset_us: int | None = None

    def __len__(self) -> int:
        return len(self.value)

    def add(
        self,
        metric: str,
        unit: str,
        device_time_us: int,
        seq: int,
        value: float,
        quality: int = 0,
    ) -> None:
        self.metric.append(metric)
        self.unit.append(unit)
        self.device_time_us.append(device_time_us)
        self.seq.append(seq)
        self.value.append(value)
        self.quality.append(quality)

    def keep_only(self, indices: Sequence[int]) -> None:
        """Keep the samples at ``indices`` (in that order), in place."""
        for name in _SAMPLE_COLUMNS:
            col = getattr(self, name)
            if col:
                setattr(self, name, [col[i] for i in indices])

    def fill_reading_ids(self) -> None:
        """Every sample's :func:`reading_id`, the same bytes hashed, built per series.

        Column-wise, by the Rust extension when installed (:mod:`vitalproof.hashing`).
        """
        self.reading_id = hashing.reading_ids(
            self.device_id, self.metric, self.seq, self.device_time_us
        )

    def runs(self) -> list[tuple[str, int, int]]:
        """``(metric, start, stop)`` of each run of consecutive samples of one metric.

        Samples arrive series by series, so a batch has a handful of runs however many
        samples it holds: per-run work replaces per-sample work (units, flags, templates).
        """
        return runs_of(self.metric)

    def series_runs(self) -> list[tuple[tuple[str, str], int, int]]:
        """``((metric, unit), start, stop)`` of each run of one metric in one unit."""
        return runs_of(zip(self.metric, self.unit, strict=True))

    def canonical_parts(self) -> tuple[str, str, list[tuple[str, str, int, int]]]:
        """The fixed parts of every reading's canonical document, spelled as ``json.dumps``
        spells them: device, patient, and ``(metric, unit, start, stop)`` per run of one
        metric in one unit. With these, a document is a template with numbers filled in
        (here and in the native ``canonical_leaves``), not a ``json.dumps`` per reading."""
        if self.patient_id is None:
            raise ValueError("canonical bytes need a normalized batch (patient id)")
        if len(self.reading_id) != len(self):
            raise ValueError("canonical bytes need reading ids")
        dumps = json.dumps
        runs = [
            (dumps(metric), dumps(unit), start, stop)
            for (metric, unit), start, stop in self.series_runs()
        ]
        return dumps(self.device_id), dumps(self.patient_id), runs

    def canonical_bytes_per_sample(self) -> list[bytes]:
        """``canonical_reading_bytes`` (:mod:`vitalproof_verify.leaves`) of every sample,
        byte-identical, built per run.

        ``json.dumps`` per reading costs more than everything else the sealer does per
        sample; the document's fixed parts (:meth:`canonical_parts`) are formatted once per
        run into a template and only the numbers and the reading id are filled in per
        sample. tests/test_fast_paths.py checks the equality.
        """
        device, patient, runs = self.canonical_parts()
        dev, pat = device.replace("%", "%%"), patient.replace("%", "%%")
        ids: Sequence[str] = self.reading_id
        joined = "".join(ids)
        if not (joined.isascii() and joined.isalnum()):  # ids needing JSON escapes: rare
            ids = [json.dumps(r)[1:-1] for r in ids]
        out: list[bytes] = []
        for metric, unit, start, stop in runs:
            fmt = (
                f'{{"device_id":{dev},"device_time_us":%d,"metric":'
                f'{metric.replace("%", "%%")},"patient_id":{pat},"quality":%d,'
                f'"reading_id":"%s","seq":%d,"unit":{unit.replace("%", "%%")},'
                f'"value":%s}}'
            )
            values = _json_floats(self.value[start:stop])
            out.extend(
                [
                    (fmt % row).encode()
                    for row in zip(
                        self.device_time_us[start:stop],
                        self.quality[start:stop],
                        ids[start:stop],
                        self.seq[start:stop],
                        values,
                        strict=True,
                    )
                ]
            )
        return out

    def readings(self) -> Iterator[Reading]:
        """One :class:`~vitalproof_verify.bundle.Reading` per sample (what its leaf commits
        to); only for a normalized batch (ids, patient set)."""
        if self.patient_id is None or len(self.reading_id) != len(self):
            raise ValueError("readings() needs a normalized batch")
        for i in range(len(self)):
            v = self.value[i]
            yield Reading(
                reading_id=self.reading_id[i],
                device_id=self.device_id,
                patient_id=self.patient_id,
                metric=self.metric[i],
                value=None if math.isnan(v) else float(v),
                unit=self.unit[i],
                device_time_us=self.device_time_us[i],
                seq=self.seq[i],
                quality=self.quality[i],
            )

    # -- codec --------------------------------------------------------------------------

    def to_json_dict(self) -> dict[str, Any]:
        """The wire document: one series per (metric, unit), samples in batch order.

        Columns are sliced per run of equal (metric, unit), not appended sample by sample;
        NaN values (Quality.INVALID) become null.
        """
        series: dict[tuple[str, str], dict[str, list[Any]]] = {}
        with_ids = bool(self.reading_id)
        for key, start, stop in self.series_runs():
            s = series.get(key)
            if s is None:
                s = series[key] = {"t": [], "seq": [], "v": [], "q": []}
                if with_ids:
                    s["id"] = []
            s["t"] += self.device_time_us[start:stop]
            s["seq"] += self.seq[start:stop]
            values: list[Any] = self.value[start:stop]
            total = sum(values)
            if total != total:  # a NaN (or +inf and -inf) among them
                values = [None if math.isnan(v) else v for v in values]
            s["v"] += values
            s["q"] += self.quality[start:stop]
            if with_ids:
                s["id"] += self.reading_id[start:stop]
        doc: dict[str, Any] = {"schema": WIRE_SCHEMA_VERSION, **self.wire_header()}
        doc["series"] = [{"metric": m, "unit": u, **cols} for (m, u), cols in series.items()]
        return doc

    def wire_header(self) -> dict[str, Any]:
        """The per-batch fields under their wire names, ``None`` ones left out.

        Both encodings (this JSON and vitalproof.wire.clean's header) use it: a new
        per-batch field is added here once.
        """
        doc: dict[str, Any] = {"device_id": self.device_id}
        for name, val in (
            ("patient_id", self.patient_id),
            ("gateway_id", self.gateway_id),
            ("transport", self.transport.value if self.transport else None),
            ("rx", self.receive_time_us),
            ("tz", self.tz_offset_min),
            ("clock_offset", self.clock_offset_us),
        ):
            if val is not None:
                doc[name] = val
        return doc

    def to_json(self) -> bytes:
        return json.dumps(self.to_json_dict(), separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_json(cls, data: bytes, *, device_id: str | None = None) -> SampleBatch:
        """Decode and validate; raise :class:`WireFormatError` saying what and where.

        ``device_id`` (from the MQTT topic, which the broker's ACL vouches for) wins over
        any id inside the payload; a payload naming another device is rejected.
        """
        try:
            doc = json.loads(data)
        except UnicodeDecodeError as e:
            raise WireFormatError("payload is not UTF-8", offset=e.start) from None
        except json.JSONDecodeError as e:
            raise WireFormatError(f"invalid JSON: {e.msg}", offset=e.pos) from None
        if not isinstance(doc, dict):
            raise WireFormatError("payload is not a JSON object")
        schema = doc.get("schema")
        if schema != WIRE_SCHEMA_VERSION:
            raise WireFormatError(f"unsupported schema {schema!r} (expected 1)")
        claimed = doc.get("device_id")
        if device_id is not None and claimed is not None and claimed != device_id:
            raise WireFormatError(f"payload names device {claimed!r} but came from {device_id!r}")
        dev = device_id or claimed
        if not isinstance(dev, str) or not dev:
            raise WireFormatError("device_id missing")
        b = cls(device_id=dev)
        b.patient_id = _opt_str(doc, "patient_id")
        b.gateway_id = _opt_str(doc, "gateway_id")
        transport = _opt_str(doc, "transport")
        if transport is not None:
            try:
                b.transport = Transport(transport)
            except ValueError:
                raise WireFormatError(f"unknown transport {transport!r}") from None
        b.receive_time_us = _opt_int(doc, "rx")
        b.tz_offset_min = _opt_int(doc, "tz")
        b.clock_offset_us = _opt_int(doc, "clock_offset")
        series = doc.get("series")
        if not isinstance(series, list) or not series:
            raise WireFormatError("series missing or empty")
        any_ids = False
        # No JSON true/false anywhere means no bool can hide among the integers, so the
        # C-level array checks below are enough; otherwise every sample is checked.
        fast = isinstance(data, bytes) and b"true" not in data and b"false" not in data
        for n, s in enumerate(series):
            if not isinstance(s, dict):
                raise WireFormatError(f"series[{n}] is not an object")
            metric, unit = s.get("metric"), s.get("unit")
            if not isinstance(metric, str) or metric not in _METRICS:
                raise WireFormatError(f"series[{n}]: unknown metric {metric!r}")
            if not isinstance(unit, str):
                raise WireFormatError(f"series[{n}]: unit missing")
            t, seq, v = s.get("t"), s.get("seq"), s.get("v")
            if not (isinstance(t, list) and isinstance(seq, list) and isinstance(v, list)):
                raise WireFormatError(f"series[{n}]: t, seq and v must be arrays")
            count = len(v)
            if len(t) != count or len(seq) != count:
                raise WireFormatError(f"series[{n}]: t, seq and v differ in length")
            q = None  # absent from device payloads: all 0, nothing to check
            if "q" in s:
                q = s["q"]
                if not isinstance(q, list) or len(q) != count:
                    raise WireFormatError(f"series[{n}]: q differs in length")
            ids = s.get("id")
            if ids is not None:
                if not isinstance(ids, list) or len(ids) != count:
                    raise WireFormatError(f"series[{n}]: id differs in length")
                any_ids = True
            if not (fast and _append_series(b, metric, unit, t, seq, v, q, ids)):
                qs = [0] * count if q is None else q
                _append_series_checked(b, n, metric, unit, t, seq, v, qs, ids)
        if any_ids and len(b.reading_id) != len(b):
            raise WireFormatError("reading ids given for some series only")
        return b


_METRICS = frozenset(m.value for m in Metric)
_SAMPLE_COLUMNS = ("metric", "unit", "device_time_us", "seq", "value", "quality", "reading_id")


def _append_series(
    b: SampleBatch,
    metric: str,
    unit: str,
    t: list[Any],
    seq: list[Any],
    v: list[Any],
    q: list[Any] | None,
    ids: list[Any] | None,
) -> bool:
    """Append one series with C-level checks; ``False`` (nothing appended) if one fails.

    ``array('q', ...)`` refuses floats, strings and None, ``array('d', ...)`` refuses None
    and strings, each in one C loop instead of a Python test per sample (bools are ruled out
    by the caller). Whatever fails here, including a None value (a device's special value,
    which the careful path flags), goes through :func:`_append_series_checked`. ``q``
    ``None`` (a device payload has none): all 0, with no array to check.
    """
    try:
        array("q", t)
        array("q", seq)
        if q is not None:
            array("q", q)
        values = array("d", v).tolist()
    except (TypeError, OverflowError):
        return False
    count = len(v)
    b.metric.extend([metric] * count)
    b.unit.extend([unit] * count)
    b.device_time_us.extend(t)
    b.seq.extend(seq)
    b.value.extend(values)
    b.quality.extend([0] * count if q is None else q)
    if ids is not None:
        try:
            "".join(ids)  # TypeError unless every id is a string
            b.reading_id.extend(ids)
        except TypeError:
            b.reading_id.extend(map(str, ids))
    return True


def _append_series_checked(
    b: SampleBatch,
    n: int,
    metric: str,
    unit: str,
    t: list[Any],
    seq: list[Any],
    v: list[Any],
    q: list[Any],
    ids: list[Any] | None,
) -> None:
    """Sample by sample: says which sample is wrong, flags None values INVALID."""
    for i in range(len(v)):
        ti, si, vi, qi = t[i], seq[i], v[i], q[i]
        if not _is_int(ti) or not _is_int(si) or not _is_int(qi):
            raise WireFormatError(f"series[{n}][{i}]: t, seq and q must be integers")
        if vi is None:
            fv, qi = math.nan, qi | Quality.INVALID
        elif isinstance(vi, int | float) and not isinstance(vi, bool):
            fv = float(vi)
        else:
            raise WireFormatError(f"series[{n}][{i}]: value {vi!r} is not a number")
        b.add(metric, unit, ti, si, fv, int(qi))
        if ids is not None:
            b.reading_id.append(str(ids[i]))


def _json_floats(values: Sequence[float | None]) -> list[str]:
    """How ``json.dumps(float(v), allow_nan=False)`` spells each value, NaN and None as null.

    ``float.__repr__`` is what the json encoder writes for a finite float; mapping it over
    the list runs in C, and one substring test over the joined result finds the rare NaN or
    infinity ("nan", "inf": finite reprs never contain an "n").
    """
    try:
        out = list(map(float.__repr__, map(float, values)))  # type: ignore[arg-type]
    except TypeError:  # None among the values
        out = ["nan" if v is None else float.__repr__(float(v)) for v in values]
    if "n" in "".join(out):
        fixed: list[str] = []
        for r in out:
            if r == "nan":
                r = "null"
            elif r.endswith("inf"):
                raise ValueError(f"Out of range float values are not JSON compliant: {r}")
            fixed.append(r)
        out = fixed
    return out


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _opt_str(doc: dict[str, Any], key: str) -> str | None:
    val = doc.get(key)
    if val is None:
        return None
    if not isinstance(val, str):
        raise WireFormatError(f"{key} must be a string")
    return val


def _opt_int(doc: dict[str, Any], key: str) -> int | None:
    val = doc.get(key)
    if val is None:
        return None
    if not _is_int(val):
        raise WireFormatError(f"{key} must be an integer")
    return int(val)
