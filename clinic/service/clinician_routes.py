"""What the clinician's pages ask beyond FHIR: their patients with the newest values, one
patient's sharing status, and chart-ready history.

Each goes through the same gate as a FHIR search (:mod:`clinic.service.disclosure`): consent
per metric at the moment of the request and one audit record per patient whatever the outcome.
The list's newest values come from the live fan-out (what arrived since the service started);
history comes from the sealed lake, thinned to at most ``points`` per metric for a chart,
with the device events (gaps, resets, clock jumps) the fan-out has seen since the service
started: the lake keeps readings, not events, so older ones are not in a history answer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from clinic.audit import AuditAction
from clinic.auth import Principal, Role
from clinic.consent import ALL_VITALS, Grant
from clinic.service import disclosure
from clinic.service.context import ServiceContext
from clinic.service.deps import Ctx, Who
from clinic.service.search import BadSearch
from clinic.service.stream_routes import hub_of
from vitalproof.schema import flag_names
from vitalproof.units import Metric

router = APIRouter(prefix="/api")

#: The most points per metric a history answer carries (a chart is ~1,500 pixels wide).
MAX_POINTS = 4000


def _clinician(ctx: ServiceContext, who: Principal, what: str, patient_id: str | None) -> None:
    if who.role is not Role.CLINICIAN:
        disclosure.refuse(
            ctx, who, patient_id, AuditAction.READ, what,
            f"this page is for clinicians; a {who.role.value} token cannot use it",
        )  # fmt: skip


def _active(ctx: ServiceContext, who: Principal) -> dict[str, list[Grant]]:
    """The clinician's grants in force now, per patient."""
    out: dict[str, list[Grant]] = {}
    for g in ctx.consent.grants(grantee=who.subject, active_at_us=ctx.now_us()):
        out.setdefault(g.patient_id, []).append(g)
    return out


def _sharing(grants: list[Grant]) -> dict[str, Any]:
    ends = [g.end_us for g in grants]
    return {
        "purpose": sorted({g.purpose for g in grants}),
        "break_glass": any(g.purpose == "BTG" for g in grants),
        "until_us": None if None in ends else max(e for e in ends if e is not None),
        "metrics": (
            "all"
            if any(ALL_VITALS in g.metrics for g in grants)
            else sorted({m for g in grants for m in g.metrics})
        ),
    }


@router.get("/patients")
async def patients(request: Request, ctx: Ctx, who: Who) -> JSONResponse:
    """The patients sharing with this clinician now, each with the newest value of every
    metric they share (one audit record per patient with values)."""
    _clinician(ctx, who, "patient list", None)
    hub = hub_of(request)
    now = ctx.now_us()
    out = []
    for patient_id, grants in sorted(_active(ctx, who).items()):
        held = hub.latest.get(patient_id, {})
        allowed, _ = disclosure.allowed_metrics(ctx, who, patient_id, held, now)
        latest = {m: _public(body) for m, body in held.items() if m in allowed.metrics}
        if latest:
            disclosure.disclosed(
                ctx, who, patient_id, AuditAction.READ, "patient list: newest values",
                allowed.purpose, len(latest),
            )  # fmt: skip
        out.append({"patient": patient_id, **_sharing(grants), "latest": latest})
    return JSONResponse({"now_us": now, "patients": out})


def _public(body: dict[str, Any]) -> dict[str, Any]:
    return {k: body[k] for k in ("t_us", "received_us", "value", "unit", "flags", "device")}


@router.get("/patients/{patient_id}/sharing")
async def sharing(patient_id: str, ctx: Ctx, who: Who) -> JSONResponse:
    """Whether the patient shares with this clinician now, and what; no health data. The
    page offers break-glass when they do not."""
    _clinician(ctx, who, f"sharing status of {patient_id}", patient_id)
    grants = _active(ctx, who).get(patient_id, [])
    if grants:
        return JSONResponse({"patient": patient_id, "shared": True, **_sharing(grants)})
    decision = ctx.consent.decide(
        grantee=who.subject, patient_id=patient_id, metric=Metric.HEART_RATE, at_us=ctx.now_us()
    )
    return JSONResponse({"patient": patient_id, "shared": False, "reason": decision.reason})


def _int(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise BadSearch(f"{name}: microseconds since the epoch, not {value!r}") from None


@router.get("/patients/{patient_id}/history")
async def history(patient_id: str, request: Request, ctx: Ctx, who: Who) -> JSONResponse:
    """Sealed readings of ``metric`` (comma for several) between ``start`` and ``end``
    (microseconds), as columns per metric; thinned to ``points`` per metric (min and max
    per time bucket, every flagged reading kept) when there are more."""
    q = request.query_params
    names = [m for m in (q.get("metric") or "").split(",") if m]
    known = {m.value for m in Metric}
    if not names or set(names) - known:
        raise BadSearch(f"metric: one or more of {', '.join(sorted(known))}")
    start_us, end_us = _int(q.get("start"), "start"), _int(q.get("end"), "end")
    points = _int(q.get("points"), "points") or MAX_POINTS
    if not 10 <= points <= MAX_POINTS:
        raise BadSearch(f"points: 10 to {MAX_POINTS}")
    table = disclosure.history(
        ctx,
        who,
        patient_id=patient_id,
        start_us=start_us,
        end_us=end_us,
        metrics=names,
        what=f"chart history {','.join(names)} {start_us}..{end_us}",
    )
    metric = pc.cast(table["metric"], pa.string())
    series = {name: _columns(thin(table.filter(pc.equal(metric, name)), points)) for name in names}
    marks = disclosure.device_events(
        ctx,
        who,
        patient_id=patient_id,
        events=hub_of(request).recent_device_events(patient_id, start_us, end_us),
        metrics=names,
        what=f"chart history: device events (gaps, resets, clock jumps) {start_us}..{end_us}",
    )
    return JSONResponse(
        {
            "patient": patient_id,
            "start": start_us,
            "end": end_us,
            "series": series,
            "device_events": [e.compact() for e in marks],
        }
    )


def _times(rows: pa.Table) -> np.ndarray[Any, Any]:
    return rows["device_time"].cast(pa.int64()).to_numpy()


def thin(rows: pa.Table, points: int) -> pa.Table:
    """At most about ``points`` rows in time order: of each of ``points // 3`` equal time
    buckets the lowest and the highest value and one invalid reading if there is one (so a
    gap stays a gap), plus every flagged reading (a flag is never thinned away). Fewer rows
    come back whole."""
    rows = rows.sort_by("device_time")
    if rows.num_rows <= points:
        return rows
    t = _times(rows)
    v = rows["value"].fill_null(np.nan).to_numpy()
    invalid = np.isnan(v)
    bucket = (t - t[0]) * (points // 3) // (int(t[-1] - t[0]) + 1)
    keep = rows["quality"].to_numpy() != 0
    for key, first in (
        (np.where(invalid, np.inf, v), True),
        (np.where(invalid, -np.inf, v), False),
    ):
        order = np.lexsort((key, bucket))  # by bucket, then value
        edge = bucket[order][1:] != bucket[order][:-1]
        keep[order[np.r_[True, edge] if first else np.r_[edge, True]]] = True
    gaps = np.flatnonzero(invalid)
    keep[gaps[np.unique(bucket[gaps], return_index=True)[1]]] = True
    return rows.filter(pa.array(keep))


def _columns(rows: pa.Table) -> dict[str, Any]:
    return {
        "unit": str(rows["unit"][0]) if rows.num_rows else None,
        "t_us": _times(rows).tolist(),
        "value": rows["value"].to_pylist(),  # null: an invalid reading, drawn as a gap
        "flags": [list(flag_names(code)) for code in rows["quality"].to_pylist()],
        "seq": rows["seq"].to_pylist(),
        "device": [str(d) for d in rows["device_id"].to_pylist()],
    }
