"""Live vitals: subscriptions (``/fhir/Subscription``), their missed events (``$events``),
and delivery over Server-Sent Events and WebSocket.

A subscription is created once and outlives its connections (five idle minutes), so a client
that reconnects resumes where it was: SSE clients send ``Last-Event-ID`` (EventSource does it
by itself), WebSocket clients ``?since=N``. Besides readings, a subscription carries its patients'
device events (sequence gaps, resets, clock jumps: compact with an ``event`` field, or as
FHIR DetectedIssue). Every event is re-checked against consent when it
is sent, not only when it was fanned out; a subscription whose consent ended is closed with
the reason (SSE: a ``closed`` event; WebSocket: close code 4403).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from clinic.auth import AuthError, Principal
from clinic.fanout import Gone, Replayer
from clinic.live import HOLD, Behind, Event, Hub, Subscription, SubscriptionError
from clinic.service.deps import FHIR_JSON, Ctx, Who
from clinic.service.fhir_routes import searchset
from clinic.service.refusal import outcome
from clinic.service.subscription_fhir import (
    CONTENTS,
    TOPIC_ID,
    InvalidSubscription,
    parse,
    status_resource,
    subscription_resource,
    subscription_topic,
)
from streams.lake.export.fhir import reading_observation

router = APIRouter()
HEARTBEAT_S = 10.0
#: Events a stream sends per notification when it replays from Kafka.
REPLAY_PAGE = 1_000
#: The code system of device events (the worker's kinds: gap, reset, clock_jump).
DEVICE_EVENT_SYSTEM = "urn:vitalproof:device-event"


def hub_of(request: Request | WebSocket) -> Hub:
    hub: Hub = request.app.state.hub
    return hub


def _notification(
    sub: Subscription, kind: str, events: list[Event], fmt: str = "compact"
) -> dict[str, Any]:
    """A FHIR R5 subscription-notification Bundle: SubscriptionStatus, then the readings,
    compact (``n`` is the event number), as FHIR Observations (``fhir``, R5's
    full-resource), or none (``id-only``: the focus references only; ``empty``: not even
    those)."""
    status = status_resource(sub, kind)
    if events:
        status["notificationEvent"] = [
            {"eventNumber": str(e.number)}
            | ({} if fmt == "empty" else {"focus": {"reference": _focus(e)}})
            for e in events
        ]
    return {
        "resourceType": "Bundle",
        "type": "subscription-notification",
        "timestamp": _iso(int(time.time() * 1e6)),
        "entry": [{"resource": status}, *_entries(events, fmt)],
    }


def _focus(e: Event) -> str:
    if e.is_reading:
        return f"Observation/{e.body['reading_id']}"
    return f"DetectedIssue/{_issue_id(e.body)}"


def _issue_id(body: dict[str, Any]) -> str:
    return hashlib.sha256(body["key"].encode()).hexdigest()[:32]


def device_issue(body: dict[str, Any]) -> dict[str, Any]:
    """A device event (gap, reset, clock jump) as a FHIR R4 DetectedIssue about the patient,
    with the device as its evidence."""
    return {
        "resourceType": "DetectedIssue",
        "id": _issue_id(body),
        "status": "final",
        "code": {
            "coding": [{"system": DEVICE_EVENT_SYSTEM, "code": body["event"]}],
            "text": body["label"],
        },
        "patient": {"reference": f"Patient/{body['patient']}"},
        "identifiedDateTime": _iso(body["t_us"]),
        "evidence": [{"detail": [{"reference": f"Device/{body['device']}"}]}],
        "detail": body["label"],
    }


def _entries(events: list[Event], fmt: str) -> list[dict[str, Any]]:
    if fmt in ("empty", "id-only"):
        return []
    if fmt != "fhir":
        return [{"resource": e.body | {"n": e.number}} for e in events]
    out = []
    for e in events:
        if not e.is_reading:
            issue = device_issue(e.body)
            out.append({"fullUrl": f"DetectedIssue/{issue['id']}", "resource": issue})
            continue
        obs = reading_observation(_row(e.body))
        if obs is not None:
            out.append({"fullUrl": f"Observation/{obs['id']}", "resource": obs})
    return out


def _row(body: dict[str, Any]) -> dict[str, Any]:
    """A compact reading in the shape the lake's FHIR mapping reads."""
    value = body["value"]
    return body | {
        "value": float("nan") if value is None else value,
        "device_time": _iso(body["t_us"]),
        "receive_time": _iso(body.get("received_us") or body["t_us"]),
        "patient_id": body["patient"],
        "device_id": body["device"],
    }


def _iso(us: int) -> str:
    t = dt.datetime.fromtimestamp(us / 1e6, dt.UTC)
    return t.isoformat(timespec="microseconds").replace("+00:00", "Z")


#: R5 ``content`` -> the shape of a notification's entries.
_SHAPES = {"full-resource": "fhir", "id-only": "id-only", "empty": "empty", "compact": "compact"}


def _format(params: Any, sub: Subscription | None = None) -> str:
    """``format`` (compact, fhir) or R5's ``content`` (empty, id-only, full-resource) of the
    request, else what the subscription was made with."""
    if "format" in params:
        fmt = str(params["format"])
        if fmt not in ("compact", "fhir"):
            raise SubscriptionError(f"format={fmt}: compact or fhir")
        return fmt
    if "content" in params:
        content = str(params["content"])
        if content not in CONTENTS:
            raise SubscriptionError(f"content={content}: {', '.join(CONTENTS)}")
        return _SHAPES[content]
    return _SHAPES[sub.delivery.content] if sub is not None else "compact"


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/fhir"


def _fhir(body: dict[str, Any], status: int = 200, **headers: str) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON, headers=headers or None)


@router.post("/fhir/Subscription")
async def create_subscription(request: Request, ctx: Ctx, who: Who) -> JSONResponse:
    """Body: an R5 ``Subscription`` (:mod:`clinic.service.subscription_fhir`), answered with
    the resource as created; or the compact form the dashboard uses,
    ``{"patients": ["P", ...] | null, "metrics": ["heart_rate", ...] | null}``."""
    try:
        body = await request.json()
    except ValueError:
        return _unprocessable("body: not JSON")
    if not isinstance(body, dict):
        return _unprocessable("body: a JSON object with patients and metrics")
    hub = hub_of(request)
    if "resourceType" in body:
        if body["resourceType"] != "Subscription":
            return _unprocessable(f"resourceType: {body['resourceType']!r} is not Subscription")
        try:
            req = parse(body, _base(request))
            sub = hub.subscribe(who, req.patients, req.metrics, req.delivery)
        except InvalidSubscription as e:
            return _unprocessable(str(e))
        except SubscriptionError as e:
            return _fhir(outcome("forbidden", str(e)), 403)
        resource = subscription_resource(sub, _base(request))
        return _fhir(resource, 201, Location=f"{_base(request)}/Subscription/{sub.id}")
    patients, metrics = body.get("patients"), body.get("metrics")
    for name, value in (("patients", patients), ("metrics", metrics)):
        if value is not None and (
            not isinstance(value, list) or not all(isinstance(v, str) for v in value)
        ):
            return _unprocessable(f"{name}: a list of strings, or null for all")
    try:
        sub = hub.subscribe(who, patients, metrics)
    except SubscriptionError as e:
        return _fhir(outcome("forbidden", str(e)), 403)
    return _fhir(
        {
            "resourceType": "Subscription",
            "id": sub.id,
            "status": "active",
            "patients": None if sub.patients is None else sorted(sub.patients),
            "metrics": None if sub.metrics is None else sorted(sub.metrics),
            "sse": f"/stream/sse/{sub.id}",
            "websocket": f"/stream/ws/{sub.id}",
        },
        201,
    )


@router.get("/fhir/Subscription")
async def list_subscriptions(request: Request, who: Who) -> JSONResponse:
    """The caller's own subscriptions, as R5 resources."""
    hub = hub_of(request)
    mine = [s for s in hub.subscriptions.values() if s.principal.subject == who.subject]
    return _fhir(searchset([subscription_resource(s, _base(request)) for s in mine]))


@router.get("/fhir/Subscription/{sub_id}")
async def read_subscription(request: Request, sub_id: str, who: Who) -> JSONResponse:
    try:
        sub = hub_of(request).get(sub_id, who)
    except SubscriptionError as e:
        return _fhir(outcome("not-found", str(e)), 404)
    return _fhir(subscription_resource(sub, _base(request)))


@router.delete("/fhir/Subscription/{sub_id}")
async def delete_subscription(request: Request, sub_id: str, who: Who) -> JSONResponse:
    """Ends the subscription: its connections get the reason and it cannot be resumed."""
    hub = hub_of(request)
    try:
        sub = hub.get(sub_id, who)
    except SubscriptionError as e:
        return _fhir(outcome("not-found", str(e)), 404)
    hub.drop(sub, "deleted by its subscriber")
    return _fhir(outcome("deleted", f"subscription {sub_id} deleted", "information"))


@router.get("/fhir/Subscription/{sub_id}/$status")
async def subscription_status(request: Request, sub_id: str, who: Who) -> JSONResponse:
    """R5 ``$status``: a searchset Bundle of the subscription's SubscriptionStatus
    (``eventsSinceSubscriptionStart``: the number of its newest event)."""
    try:
        sub = hub_of(request).get(sub_id, who)
    except SubscriptionError as e:
        return _fhir(outcome("not-found", str(e)), 404)
    return _fhir(searchset([status_resource(sub, "query-status")]))


@router.get("/fhir/SubscriptionTopic")
async def topics(request: Request) -> JSONResponse:
    """The topics a Subscription may name (no token needed: no health data)."""
    return _fhir(searchset([subscription_topic(_base(request))]))


@router.get("/fhir/SubscriptionTopic/{topic_id}")
async def topic(request: Request, topic_id: str) -> JSONResponse:
    if topic_id != TOPIC_ID:
        return _fhir(outcome("not-found", f"no SubscriptionTopic {topic_id} (try {TOPIC_ID})"), 404)
    return _fhir(subscription_topic(_base(request)))


def _unprocessable(reason: str) -> JSONResponse:
    return JSONResponse(outcome("invalid", reason), status_code=422, media_type=FHIR_JSON)


def replayer_of(request: Request | WebSocket) -> Replayer:
    replayer: Replayer = request.app.state.replayer
    return replayer


async def events_after(
    replayer: Replayer, sub: Subscription, since: int, until: int, limit: int = HOLD
) -> list[Event]:
    """Events ``since+1 .. until``, at most ``limit``: the held ones, and before them what
    is no longer held, read back from Kafka or, past its retention, from the lake
    (:class:`clinic.fanout.Replayer`; raises :class:`Gone` naming what neither has)."""
    try:
        return [e for e in sub.since(since) if e.number <= until][:limit]
    except Behind as behind:
        end = min(behind.last, until)
        out = await replayer.replay(sub, since, end, limit)
    if len(out) >= limit or end >= until or not out or out[-1].number < end:
        return out  # full, or up to a gone segment (asked for again, it is the 410)
    try:
        rest = [e for e in sub.since(end) if e.number <= until]
    except Behind:  # what is held moved on meanwhile: the client asks again from here
        return out
    return out + rest[: limit - len(out)]


@router.get("/fhir/Subscription/{sub_id}/$events")
async def events(request: Request, sub_id: str, who: Who) -> JSONResponse:
    """The events ``eventsSinceNumber+1 .. eventsUntilNumber`` (at most 10,000: ask again
    from the last one for more), from what is held or else from Kafka or the lake; 410
    naming them if they are gone from both."""
    hub = hub_of(request)
    try:
        sub = hub.get(sub_id, who)
        since = int(request.query_params.get("eventsSinceNumber", "0"))
        until = int(request.query_params.get("eventsUntilNumber", str(sub.number)))
        held = await events_after(replayer_of(request), sub, since, until)
    except ValueError:
        return _unprocessable("eventsSinceNumber/eventsUntilNumber: integers")
    except Gone as e:
        return JSONResponse(outcome("not-found", str(e)), status_code=410, media_type=FHIR_JSON)
    except SubscriptionError as e:
        return JSONResponse(outcome("not-found", str(e)), status_code=404, media_type=FHIR_JSON)
    try:
        fmt = _format(request.query_params, sub)
    except SubscriptionError as e:
        return _unprocessable(str(e))
    allowed = _still_allowed(hub, sub, held)
    return JSONResponse(_notification(sub, "query-event", allowed, fmt), media_type=FHIR_JSON)


def _still_allowed(hub: Hub, sub: Subscription, events: list[Event]) -> list[Event]:
    now_us = int(hub.clock() * 1e6)
    return [e for e in events if hub.may_send(sub, e, now_us)]


async def _follow(
    hub: Hub, replayer: Replayer, sub: Subscription, since: int, heartbeat_s: float
) -> AsyncIterator[tuple[str, list[Event]]]:
    """(kind, events) from event ``since`` on: those no longer held first (from Kafka or the
    lake, a page at a time), then held ones, then live; a heartbeat when idle; ends once the
    subscription is closed (raises :class:`Gone` if what it missed is gone from both)."""
    cursor = since
    if sub.delivery.topic is not None:  # an R5 subscription: each connection's handshake
        yield "handshake", []
    page = sub.delivery.max_count or HOLD
    while True:
        sub.wake.clear()
        try:
            batch = sub.since(cursor)
        except Behind as behind:  # a reconnect from long ago, or a reader that fell behind
            batch = await replayer.replay(sub, cursor, behind.last, min(REPLAY_PAGE, page))
        if batch:
            batch = batch[:page]  # maxCount: events per notification
            cursor = batch[-1].number
            allowed = _still_allowed(hub, sub, batch)
            if allowed:
                yield "event-notification", allowed
            continue
        if sub.closed is not None:
            return
        try:
            await asyncio.wait_for(sub.wake.wait(), heartbeat_s)
        except TimeoutError:
            yield "heartbeat", []


@router.get("/stream/sse/{sub_id}")
async def sse(request: Request, sub_id: str, who: Who) -> Any:
    hub = hub_of(request)
    try:
        sub = hub.get(sub_id, who)
        since = int(request.headers.get("last-event-id") or request.query_params.get("since", "0"))
    except (SubscriptionError, ValueError) as e:
        return JSONResponse(outcome("not-found", str(e)), status_code=404, media_type=FHIR_JSON)
    try:
        fmt = _format(request.query_params, sub)
    except SubscriptionError as e:
        return _unprocessable(str(e))
    heartbeat = _heartbeat(request.query_params, sub)
    replayer = replayer_of(request)

    async def stream() -> AsyncIterator[ServerSentEvent]:
        sub.connections += 1
        try:
            async for kind, batch in _follow(hub, replayer, sub, since, heartbeat):
                yield ServerSentEvent(
                    data=json.dumps(_notification(sub, kind, batch, fmt)),
                    event=kind,
                    id=str(batch[-1].number) if batch else None,
                )
            yield ServerSentEvent(data=json.dumps({"reason": sub.closed}), event="closed")
        except SubscriptionError as e:
            yield ServerSentEvent(data=json.dumps({"reason": str(e)}), event="closed")
        finally:
            sub.connections -= 1
            sub.idle_since = hub.clock()

    return EventSourceResponse(stream(), ping=None)


@router.websocket("/stream/ws/{sub_id}")
async def websocket(ws: WebSocket, sub_id: str) -> None:
    ctx = ws.app.state.context
    hub = hub_of(ws)
    try:
        who: Principal = ctx.validator.validate(_ws_token(ws))
        sub = hub.get(sub_id, who)
        since = int(ws.query_params.get("since", "0"))
        fmt = _format(ws.query_params, sub)
    except AuthError as e:
        await ws.close(code=4401, reason=str(e)[:120])
        return
    except (SubscriptionError, ValueError) as e:
        await ws.close(code=4404, reason=str(e)[:120])
        return
    heartbeat = _heartbeat(ws.query_params, sub)
    await ws.accept()
    sub.connections += 1
    try:
        async for kind, batch in _follow(hub, replayer_of(ws), sub, since, heartbeat):
            await ws.send_text(json.dumps(_notification(sub, kind, batch, fmt)))
        await ws.close(code=4403, reason=(sub.closed or "closed")[:120])
    except SubscriptionError as e:
        await ws.close(code=4408, reason=str(e)[:120])
    except WebSocketDisconnect:
        pass
    finally:
        sub.connections -= 1
        sub.idle_since = hub.clock()


def _heartbeat(params: Any, sub: Subscription) -> float:
    """Seconds between heartbeats: the request's ``heartbeat``, else the subscription's
    ``heartbeatPeriod``, else 10 s."""
    value = params.get("heartbeat")
    if value is not None:
        return float(value)
    return sub.delivery.heartbeat_s or HEARTBEAT_S


def _ws_token(ws: WebSocket) -> str | None:
    header = ws.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token:
        return token.strip()
    return ws.query_params.get("access_token")


@router.get("/status")
async def status(request: Request, ctx: Ctx) -> JSONResponse:
    """Service health without health data: the fan-out's state and counts."""
    return JSONResponse(hub_of(request).status())
