"""The one gate every disclosure of health data passes: role, scope, consent per reading,
and an audit record whatever the outcome ("Consent before every disclosure")."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from clinic.audit import AuditAction, Outcome
from clinic.auth import Principal, Role
from clinic.device_events import DeviceEvent
from clinic.service.context import ServiceContext
from clinic.service.refusal import Refusal
from vitalproof.units import Metric

ALL_METRICS: tuple[str, ...] = tuple(m.value for m in Metric)


@dataclass(frozen=True)
class Allowed:
    """Which of the asked metrics may be disclosed now, and under which grant's purpose."""

    metrics: frozenset[str]
    purpose: str | None


def allowed_metrics(
    ctx: ServiceContext, who: Principal, patient_id: str, metrics: Iterable[str], now_us: int
) -> tuple[Allowed, str]:
    """The consent decision per metric (a reading is disclosed iff its metric's decision
    allows it at the time of disclosure), and the reason of the first refusal."""
    if who.role is Role.PATIENT:
        if who.patient_id != patient_id:
            return Allowed(frozenset(), None), (
                f"a patient token for {who.patient_id} may not read patient {patient_id}"
            )
        return Allowed(frozenset(metrics), None), ""
    if who.role is not Role.CLINICIAN:
        return Allowed(frozenset(), None), (
            f"the {who.role.value} role sees pipeline health and audit records, not health data"
        )
    allowed: set[str] = set()
    purpose: str | None = None
    reason = ""
    for metric in metrics:
        d = ctx.consent.decide(
            grantee=who.subject, patient_id=patient_id, metric=metric, at_us=now_us
        )
        if d.allowed:
            allowed.add(metric)
            grant = ctx.consent.get(d.grant_id) if purpose is None and d.grant_id else None
            if grant is not None:
                purpose = grant.purpose
        elif not reason:
            reason = d.reason
    return Allowed(frozenset(allowed), purpose), reason


def history(
    ctx: ServiceContext,
    who: Principal,
    *,
    patient_id: str,
    start_us: int | None,
    end_us: int | None,
    metrics: list[str] | None,
    what: str,
) -> pa.Table:
    """A patient's sealed readings this principal may see now; refused (403, audited) when
    consent allows none of the asked metrics."""
    now = ctx.now_us()
    asked = metrics if metrics is not None else list(ALL_METRICS)
    allowed, reason = allowed_metrics(ctx, who, patient_id, asked, now)
    if not allowed.metrics:
        refuse(ctx, who, patient_id, AuditAction.READ, what, reason)
    table = ctx.read_patient(patient_id, start_us, end_us, sorted(allowed.metrics))
    # Per reading, again, on what was read: nothing outside the allowed set leaves.
    keep = pc.is_in(
        pc.cast(table["metric"], pa.string()), value_set=pa.array(sorted(allowed.metrics))
    )
    table = table.filter(keep)
    disclosed(ctx, who, patient_id, AuditAction.READ, what, allowed.purpose, table.num_rows)
    return table


def device_events(
    ctx: ServiceContext,
    who: Principal,
    *,
    patient_id: str,
    events: Sequence[DeviceEvent],
    metrics: list[str],
    what: str,
) -> list[DeviceEvent]:
    """A patient's device events (gaps, resets, clock jumps) for a chart of ``metrics``:
    disclosed when consent allows at least one of those metrics now (an event concerns every
    reading of its device), refused (403, audited) otherwise; audited when any is sent."""
    allowed, reason = allowed_metrics(ctx, who, patient_id, metrics, ctx.now_us())
    if not allowed.metrics:
        refuse(ctx, who, patient_id, AuditAction.READ, what, reason)
    if events:
        disclosed(ctx, who, patient_id, AuditAction.READ, what, allowed.purpose, len(events))
    return list(events)


def disclosed(
    ctx: ServiceContext,
    who: Principal,
    patient_id: str,
    action: AuditAction,
    what: str,
    purpose: str | None,
    count: int,
) -> None:
    """The audit record of a disclosure that was allowed (``count`` readings)."""
    reason = "consented" if who.role is Role.CLINICIAN else "own data"
    _audit(ctx, who, patient_id, action, what, purpose, Outcome.ALLOWED, reason, count)


def refuse(
    ctx: ServiceContext,
    who: Principal,
    patient_id: str | None,
    action: AuditAction,
    what: str,
    reason: str,
) -> None:
    """Audit the refusal, then raise it (the 403 says why and shows no data)."""
    _audit(ctx, who, patient_id, action, what, None, Outcome.REFUSED, reason, 0)
    raise Refusal(reason)


def _audit(
    ctx: ServiceContext,
    who: Principal,
    patient_id: str | None,
    action: AuditAction,
    what: str,
    purpose: str | None,
    outcome: Outcome,
    reason: str,
    count: int,
) -> None:
    ctx.audit.append(
        actor=who.subject,
        role=who.role.value,
        patient_id=patient_id,
        action=action,
        what=what,
        purpose=purpose,
        outcome=outcome,
        reason=reason,
        count=count,
    )
