"""FHIR search parameters of the service: dates with prefixes, tokens, and why a request is
refused (400 with the parameter named)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from streams.lake.export.fhir import FHIR_BP, FHIR_BP_PANEL, FHIR_MAP, LOINC
from vitalproof.errors import VitalproofError


class BadSearch(VitalproofError):
    """A search parameter that does not parse; the message names it (400)."""


_PREFIXES = ("ge", "gt", "le", "lt", "eq")


def _instant(text: str, name: str) -> tuple[int, int]:
    """The instant a FHIR date/dateTime names, and the end of its precision (exclusive), in
    microseconds: ``2026-12-07`` is the whole day."""
    try:
        if len(text) == 10:
            day = dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)
            start = day
            end = day + dt.timedelta(days=1)
        else:
            t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
            if t.tzinfo is None:
                raise BadSearch(f"{name}={text}: a dateTime needs a time zone (e.g. Z)")
            start = end = t
            end = t + dt.timedelta(microseconds=1)
    except ValueError:
        raise BadSearch(f"{name}={text}: not a FHIR date or dateTime") from None
    return _us(start), _us(end)


def _us(t: dt.datetime) -> int:
    return int(t.timestamp() * 1_000_000)


def date_range(values: Sequence[str], name: str = "date") -> tuple[int | None, int | None]:
    """``date`` parameters (each with an optional ge/gt/le/lt/eq prefix) as [start, end) in
    microseconds; several values narrow each other (FHIR's AND)."""
    lo: int | None = None
    hi: int | None = None
    for value in values:
        prefix = value[:2] if value[:2] in _PREFIXES else "eq"
        text = value[2:] if value[:2] in _PREFIXES else value
        start, end = _instant(text, name)
        if prefix in ("ge", "eq"):
            lo = start if lo is None else max(lo, start)
        if prefix == "gt":
            lo = end if lo is None else max(lo, end)
        if prefix in ("lt",):
            hi = start if hi is None else min(hi, start)
        if prefix in ("le", "eq"):
            hi = end if hi is None else min(hi, end)
    if lo is not None and hi is not None and lo >= hi:
        raise BadSearch(f"{name}: the range is empty")
    return lo, hi


def _by_loinc() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for metric, code in (FHIR_MAP | FHIR_BP).items():
        out.setdefault(code.codings[0][0], []).append(metric)
    out[FHIR_BP_PANEL[0][0]] = sorted(FHIR_BP)
    return out


METRICS_BY_LOINC = _by_loinc()


def metrics_for_codes(values: Sequence[str]) -> list[str] | None:
    """``code`` tokens (``http://loinc.org|8867-4`` or ``8867-4``, comma for OR) as metrics."""
    if not values:
        return None
    out: set[str] = set()
    for value in values:
        for token in value.split(","):
            system, _, code = token.rpartition("|")
            if system and system != LOINC:
                raise BadSearch(f"code={token}: only LOINC ({LOINC}) codes are searchable")
            metrics = METRICS_BY_LOINC.get(code)
            if metrics is None:
                raise BadSearch(f"code={token}: not a vital sign this service holds")
            out.update(metrics)
    return sorted(out)
