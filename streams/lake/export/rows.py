"""What every export starts from: the lake table checked, times in ISO 8601, flags named.

Standard formats (FHIR, Open mHealth) describe clinical facts, so they carry each reading id
once (the first row wins) and are built per reading, which is their nature: :func:`_rows` is
that per-reading view, :func:`_split_bp` pairs blood-pressure readings. Readings without a
mapping are never dropped silently: every builder returns a :class:`Skipped` counter (reason
-> readings) that the CLI prints to stderr.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from streams.lake.table import SCHEMA, hex_ids
from vitalproof.schema import Quality
from vitalproof.units import Metric

__all__ = ["Row", "Skipped", "quality_names"]

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # Arrow prints %S with the microseconds of the unit
_CHUNK_ROWS = 64 * 1024  # bounds memory of the string columns built per chunk
_FLAGS = [f for f in Quality if f.value]  # single flags, in bit order

#: One reading as the per-reading (FHIR, Open mHealth) builders see it.
Row = dict[str, Any]


class Skipped(Counter[str]):
    """Readings left out of a standard export: reason -> count. Never silent."""

    def describe(self) -> str:
        """One line for stderr, e.g. ``3 readings: no FHIR mapping for rr_interval (3)``."""
        n = self.total()
        parts = ", ".join(f"{reason} ({k})" for reason, k in sorted(self.items()))
        return f"{n} reading{'s' if n != 1 else ''}: {parts}"


def quality_names(mask: int) -> list[str]:
    """Names of the :class:`Quality` flags set in ``mask``, in bit order (``[]`` when clean)."""
    return [f.name for f in _FLAGS if mask & f.value and f.name is not None]


def _iso(ts: pa.Array) -> pa.Array:
    """timestamp[us, UTC] -> ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` strings, in one compute call."""
    return pc.strftime(ts, format=_TIME_FORMAT)


def _check_schema(table: pa.Table) -> None:
    missing = [f.name for f in SCHEMA if f.name not in table.column_names]
    if missing:
        raise ValueError(f"not a lake table: missing columns {missing}")


def _rows(table: pa.Table) -> Iterator[Row]:
    """Each distinct reading once (first row wins), as a dict; times as ISO strings."""
    _check_schema(table)
    seen: set[str] = set()
    for rb in table.to_batches(max_chunksize=_CHUNK_ROWS):
        cols = {
            "reading_id": hex_ids(rb["reading_id"]).to_pylist(),
            "device_time": _iso(rb["device_time"]).to_pylist(),
            "receive_time": _iso(rb["receive_time"]).to_pylist(),
            "device_time_us": pc.cast(rb["device_time"], pa.int64()).to_pylist(),
        }
        for name in ("patient_id", "device_id", "metric", "value", "unit", "seq", "quality"):
            cols[name] = rb[name].to_pylist()
        for i in range(rb.num_rows):
            rid = cols["reading_id"][i]
            if rid in seen:
                continue
            seen.add(rid)
            yield {k: v[i] for k, v in cols.items()}


def _has_value(row: Row) -> bool:
    v = row["value"]
    return v is not None and v == v and v not in (float("inf"), float("-inf"))


_BP_METRICS = (Metric.SYSTOLIC_BP.value, Metric.DIASTOLIC_BP.value)
_MAP_METRIC = Metric.MEAN_ARTERIAL_PRESSURE.value


@dataclass
class _BpGroup:
    """Blood-pressure readings of one device at one device time, paired in seq order."""

    systolic: Row | None
    diastolic: Row | None
    mean: Row | None

    @property
    def first(self) -> Row:
        for r in (self.systolic, self.diastolic, self.mean):
            if r is not None:
                return r
        raise AssertionError("empty blood-pressure group")

    @property
    def members(self) -> list[Row]:
        return [r for r in (self.systolic, self.diastolic, self.mean) if r is not None]


def _split_bp(rows: Sequence[Row]) -> tuple[list[Row], list[_BpGroup]]:
    """(other readings, blood-pressure groups by (device, device time)).

    A device reports one measurement as simultaneous systolic, diastolic and (often) mean
    pressure with one device time; several at one time are paired in seq order.
    """
    other: list[Row] = []
    by_key: dict[tuple[str, int], dict[str, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["metric"] in _BP_METRICS or r["metric"] == _MAP_METRIC:
            by_key[(r["device_id"], r["device_time_us"])][r["metric"]].append(r)
        else:
            other.append(r)
    groups: list[_BpGroup] = []
    for parts in by_key.values():
        s, d, m = (
            sorted(parts.get(k, []), key=lambda r: r["seq"]) for k in (*_BP_METRICS, _MAP_METRIC)
        )
        for i in range(max(len(s), len(d), len(m))):
            groups.append(
                _BpGroup(
                    s[i] if i < len(s) else None,
                    d[i] if i < len(d) else None,
                    m[i] if i < len(m) else None,
                )
            )
    return other, groups
