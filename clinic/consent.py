"""Consent: who may see which of a patient's vitals, for what, and when. Pure rules, no I/O.

A :class:`Grant` is one version of a patient's permission to one grantee (a practitioner or
an organisation, named the way FHIR references them: ``Practitioner/<id>``), for some metrics
(or :data:`ALL_VITALS`), for one purpose (an HL7 v3 PurposeOfUse code from the ActReason code
system), over a period whose end is the expiry. Revoking writes a new version whose status is
inactive; nothing is ever edited (:mod:`clinic.consent_store` keeps every version).

Consent is checked **per reading**, at the time of the disclosure: a live stream asks
:meth:`ConsentIndex.allowed` for every reading it is about to send, so a revocation or an
expiry takes effect on the next reading, not at the next connection. That check runs in the
fan-out at 100,000 readings/s, so :meth:`Grant.covers` is a handful of comparisons and
:class:`ConsentIndex` finds a pair's grants with one dict lookup; the words explaining a
refusal (:func:`decide`) are only built when a refusal happens.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from vitalproof.errors import VitalproofError
from vitalproof.registry import ID_RULE, is_valid_id
from vitalproof.units import Metric

__all__ = [
    "ALL_VITALS",
    "METRICS",
    "PURPOSES",
    "ConsentConflict",
    "ConsentError",
    "ConsentIndex",
    "ConsentStatus",
    "Decision",
    "Grant",
    "InvalidConsent",
    "UnknownGrant",
    "decide",
    "iso_from_us",
    "new_grant_id",
    "parse_grantee",
]

#: In :attr:`Grant.metrics`, alone: every metric the pipeline carries, now and later.
ALL_VITALS = "*"
#: The metric names a grant may name (:class:`vitalproof.units.Metric`).
METRICS: frozenset[str] = frozenset(m.value for m in Metric)

#: The HL7 v3 PurposeOfUse codes (a value set of the ActReason code system) a grant may
#: carry. Strict on purpose: a typo ("TRAET") must not become a purpose nobody filters on.
PURPOSES: dict[str, str] = {
    "TREAT": "treatment",
    "ETREAT": "emergency treatment",
    "BTG": "break the glass",
    "ERTREAT": "emergency room treatment",
    "CAREMGT": "care management",
    "CLINTRCH": "clinical trial research",
    "POPHLTH": "population health",
    "HRESCH": "healthcare research",
    "CLINTRL": "clinical trial",
    "BIORCH": "biomedical research",
    "HOPERAT": "healthcare operations",
    "HPAYMT": "healthcare payment",
    "HMARKT": "healthcare marketing",
    "PATRQT": "patient requested",
    "FAMRQT": "family requested",
    "PWATRNY": "power of attorney",
    "SUPNWK": "support network",
    "PUBHLTH": "public health",
    "HQUALIMP": "healthcare quality improvement",
    "HSYSADMIN": "healthcare system administration",
    "PATSFTY": "patient safety",
    "HTEST": "test health data",
}

#: FHIR's id rule: a grantee reference is a FHIR reference.
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_GRANTEE_KINDS = ("Practitioner", "Organization")


class ConsentError(VitalproofError):
    """A grant or a consent document is invalid, unknown, or a change is not allowed."""


class InvalidConsent(ConsentError):
    """Malformed input: a grant's field or a FHIR Consent document's field (``field``).

    The message starts with the field (``provision.period.start: not a dateTime``) so one
    line tells the sender what to fix; the API answers 422 with ``field``.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.reason = message


class UnknownGrant(ConsentError):
    """No grant has this id."""


class ConsentConflict(ConsentError):
    """A change that contradicts the grant's state (revoking a revoked grant)."""


class ConsentStatus(StrEnum):
    ACTIVE = "active"
    INACTIVE = "inactive"


def iso_from_us(us: int) -> str:
    """Microseconds since the epoch -> ISO 8601 UTC (``Z``), to the second when whole."""
    t = dt.datetime.fromtimestamp(us // 1_000_000, dt.UTC).replace(microsecond=us % 1_000_000)
    return t.isoformat(timespec="microseconds" if t.microsecond else "seconds").replace(
        "+00:00", "Z"
    )


def new_grant_id() -> str:
    """``g-`` and 16 hex digits: valid as a registry id and as a FHIR id."""
    return f"g-{secrets.token_hex(8)}"


def parse_grantee(text: str, *, field: str = "grantee") -> str:
    """``Practitioner/<id>`` or ``Organization/<id>`` (a FHIR literal reference), checked."""
    kind, _, ident = text.partition("/")
    if kind not in _GRANTEE_KINDS or not _FHIR_ID.fullmatch(ident):
        raise InvalidConsent(
            f"{text!r} is not Practitioner/<id> or Organization/<id> (a FHIR id: 1-64 "
            "letters, digits, '-', '.')",
            field=field,
        )
    return text


def _check_id(kind: str, value: str) -> None:
    if not isinstance(value, str) or not is_valid_id(value):
        raise InvalidConsent(f"{value!r} is not a valid id: use {ID_RULE}", field=kind)


@dataclass(frozen=True, slots=True)
class Grant:
    """One version of a patient's permission to one grantee (see the module docstring).

    ``metrics`` holds :class:`~vitalproof.units.Metric` values, or just :data:`ALL_VITALS`.
    The period is ``[start_us, end_us)`` in microseconds since the epoch; ``end_us`` None
    means no expiry. ``recorded_us``/``recorded_by``: when and by whom this version was
    written (for a revocation: when it was revoked).
    """

    grant_id: str
    version: int
    patient_id: str
    grantee: str
    metrics: frozenset[str]
    purpose: str
    start_us: int
    end_us: int | None
    status: ConsentStatus
    recorded_us: int
    recorded_by: str

    def __post_init__(self) -> None:
        _check_id("grant_id", self.grant_id)
        _check_id("patient_id", self.patient_id)
        parse_grantee(self.grantee)
        if not isinstance(self.version, int) or self.version < 1:
            raise InvalidConsent(f"{self.version!r} is not a version (1, 2, ...)", field="version")
        if not isinstance(self.metrics, frozenset) or not self.metrics:
            raise InvalidConsent("name at least one metric, or all vitals", field="metrics")
        if ALL_VITALS in self.metrics and len(self.metrics) > 1:
            raise InvalidConsent("all vitals ('*') cannot be combined with names", field="metrics")
        unknown = sorted(self.metrics - METRICS - {ALL_VITALS})
        if unknown:
            raise InvalidConsent(
                f"unknown metric {', '.join(map(repr, unknown))} (known: "
                f"{', '.join(sorted(METRICS))})",
                field="metrics",
            )
        if self.purpose not in PURPOSES:
            raise InvalidConsent(
                f"unknown purpose {self.purpose!r}: use an HL7 v3 PurposeOfUse code such as "
                "TREAT, ETREAT, HRESCH, BTG",
                field="purpose",
            )
        if self.end_us is not None and self.end_us <= self.start_us:
            raise InvalidConsent(
                f"the grant would end ({iso_from_us(self.end_us)}) before it starts "
                f"({iso_from_us(self.start_us)})",
                field="end",
            )
        if not isinstance(self.status, ConsentStatus):
            raise InvalidConsent(f"{self.status!r} is not active or inactive", field="status")
        if not self.recorded_by:
            raise InvalidConsent("who recorded the change is missing", field="recorded_by")

    @property
    def all_vitals(self) -> bool:
        return ALL_VITALS in self.metrics

    def covers(self, *, grantee: str, patient_id: str, metric: str, at_us: int) -> bool:
        """Whether disclosing ``patient_id``'s ``metric`` reading to ``grantee`` at ``at_us``
        is allowed by this grant. Hot path: comparisons only, no validation."""
        return (
            self.status is ConsentStatus.ACTIVE
            and self.patient_id == patient_id
            and self.grantee == grantee
            and self.start_us <= at_us
            and (self.end_us is None or at_us < self.end_us)
            and (metric in self.metrics or ALL_VITALS in self.metrics)
        )

    def describe_metrics(self) -> str:
        return "all vitals" if self.all_vitals else ", ".join(sorted(self.metrics))

    def to_dict(self) -> dict[str, Any]:
        """The grant as plain JSON (times both as microseconds and as ISO 8601 UTC)."""
        return {
            "grant_id": self.grant_id,
            "version": self.version,
            "patient_id": self.patient_id,
            "grantee": self.grantee,
            "metrics": sorted(self.metrics),
            "purpose": self.purpose,
            "start": iso_from_us(self.start_us),
            "end": None if self.end_us is None else iso_from_us(self.end_us),
            "start_us": self.start_us,
            "end_us": self.end_us,
            "status": self.status.value,
            "recorded": iso_from_us(self.recorded_us),
            "recorded_us": self.recorded_us,
            "recorded_by": self.recorded_by,
        }


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one disclosure: allowed or not, why (in words), and by which grant."""

    allowed: bool
    reason: str
    grant_id: str | None

    def __bool__(self) -> bool:
        return self.allowed


def decide(
    grants: Iterable[Grant], *, grantee: str, patient_id: str, metric: str, at_us: int
) -> Decision:
    """Allowed if one of ``grants`` (the latest versions) covers the disclosure; else the
    refusal says why, about the grant that came closest."""
    if metric not in METRICS:
        return Decision(False, f"unknown metric {metric!r}", None)
    pair = [g for g in grants if g.patient_id == patient_id and g.grantee == grantee]
    for g in pair:
        if g.covers(grantee=grantee, patient_id=patient_id, metric=metric, at_us=at_us):
            until = "" if g.end_us is None else f" until {iso_from_us(g.end_us)}"
            return Decision(
                True,
                f"grant {g.grant_id} ({g.purpose}) lets {grantee} see {metric} of patient "
                f"{patient_id}{until}",
                g.grant_id,
            )
    return _refusal(pair, grantee=grantee, patient_id=patient_id, metric=metric, at_us=at_us)


def _refusal(
    pair: list[Grant], *, grantee: str, patient_id: str, metric: str, at_us: int
) -> Decision:
    if not pair:
        return Decision(False, f"no grant from patient {patient_id} to {grantee}", None)
    for_metric = [g for g in pair if metric in g.metrics or g.all_vitals]
    if not for_metric:
        g = max(pair, key=lambda g: g.recorded_us)
        return Decision(
            False,
            f"grant {g.grant_id} does not cover metric {metric} (it covers {g.describe_metrics()})",
            g.grant_id,
        )

    # Closest first: active but not started yet, then expired, then revoked; latest wins.
    def rank(g: Grant) -> tuple[int, int]:
        if g.status is not ConsentStatus.ACTIVE:
            return (0, g.recorded_us)
        return (2 if at_us < g.start_us else 1, g.end_us or 0)

    g = max(for_metric, key=rank)
    if g.status is not ConsentStatus.ACTIVE:
        why = f"was revoked at {iso_from_us(g.recorded_us)} by {g.recorded_by}"
    elif at_us < g.start_us:
        why = f"starts at {iso_from_us(g.start_us)}"
    else:
        assert g.end_us is not None
        why = f"expired at {iso_from_us(g.end_us)}"
    return Decision(False, f"grant {g.grant_id} {why}", g.grant_id)


class ConsentIndex:
    """The latest versions of many grants, by (patient, grantee): the fan-out's lookup.

    Built once from a list (rebuild it when :meth:`ConsentStore.changes` moves); inactive
    grants stay in so that a refusal can say "revoked" rather than "no grant".
    """

    __slots__ = ("_by_grantee", "_pairs")

    def __init__(self, grants: Iterable[Grant] = ()) -> None:
        pairs: dict[tuple[str, str], list[Grant]] = {}
        by_grantee: dict[str, list[Grant]] = {}
        for g in grants:
            pairs.setdefault((g.patient_id, g.grantee), []).append(g)
            by_grantee.setdefault(g.grantee, []).append(g)
        self._pairs = {k: tuple(v) for k, v in pairs.items()}
        self._by_grantee = {k: tuple(v) for k, v in by_grantee.items()}

    def __len__(self) -> int:
        return sum(len(v) for v in self._pairs.values())

    def grants(self, *, patient_id: str, grantee: str) -> tuple[Grant, ...]:
        return self._pairs.get((patient_id, grantee), ())

    def allowed(self, *, grantee: str, patient_id: str, metric: str, at_us: int) -> bool:
        """The per-reading check, without building a reason."""
        if metric not in METRICS:
            return False
        for g in self._pairs.get((patient_id, grantee), ()):
            if g.covers(grantee=grantee, patient_id=patient_id, metric=metric, at_us=at_us):
                return True
        return False

    def decide(self, *, grantee: str, patient_id: str, metric: str, at_us: int) -> Decision:
        return decide(
            self._pairs.get((patient_id, grantee), ()),
            grantee=grantee,
            patient_id=patient_id,
            metric=metric,
            at_us=at_us,
        )

    def patients(self, grantee: str, *, at_us: int) -> set[str]:
        """Every patient with a grant to ``grantee`` in force at ``at_us`` (for "all patients
        who consented to me"); the metrics still need :meth:`allowed` per reading."""
        return {
            g.patient_id
            for g in self._by_grantee.get(grantee, ())
            if g.status is ConsentStatus.ACTIVE
            and g.start_us <= at_us
            and (g.end_us is None or at_us < g.end_us)
        }
