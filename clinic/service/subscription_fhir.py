"""FHIR R5 topic-based subscriptions: the one SubscriptionTopic the service publishes (new vital
signs of a patient), the Subscription resources clients create against it, and the
SubscriptionStatus that heads every notification.

A client POSTs an R5 ``Subscription`` (validated with ``fhir.resources``, whose default models
are R5) naming the topic by its canonical URL, narrowing it with ``filterBy`` (``patient`` and
``code``, comma for OR as in a search; filters of different parameters AND), and choosing how
it is told: ``channelType`` ``websocket`` (HL7's code) or ``sse`` (this service's code:
Server-Sent Events, with ``Last-Event-ID``), ``content`` ``empty`` / ``id-only`` (the default:
the least that is disclosed) / ``full-resource``, ``heartbeatPeriod`` and ``maxCount``
(events per notification). What the service does not do is refused with the field named
(``rest-hook`` and ``email`` channels, ``end``, another content type), never ignored.

Pure: no request, no hub. :func:`parse` gives a :class:`Request` for
:meth:`clinic.live.Hub.subscribe`; :func:`subscription_resource` renders any subscription back
as an R5 resource, including those made with the compact JSON body the dashboard uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pydantic

from clinic.fhir_consent import _say, _where
from clinic.live import Delivery, Subscription
from clinic.service.search import METRICS_BY_LOINC
from streams.lake.export.fhir import FHIR_BP, FHIR_MAP, LOINC
from vitalproof.errors import VitalproofError

#: The canonical URL of the topic (a URN: it names the topic wherever the service runs; the
#: topic is also accepted by its address on this service, ``<base>/SubscriptionTopic/<id>``).
TOPIC_ID = "vital-signs"
TOPIC_URL = f"urn:vitalproof:SubscriptionTopic:{TOPIC_ID}"
CHANNEL_SYSTEM = "http://terminology.hl7.org/CodeSystem/subscription-channel-type"
#: This service's channel code for Server-Sent Events (not in HL7's code system).
SSE_SYSTEM = "urn:vitalproof:subscription-channel-type"
CONTENTS = ("empty", "id-only", "full-resource")
FHIR_JSON = "application/fhir+json"
MAX_HEARTBEAT_S = 3_600
MAX_COUNT = 10_000
_OBSERVATION = ("Observation", "http://hl7.org/fhir/StructureDefinition/Observation")


class InvalidSubscription(VitalproofError):
    """An R5 Subscription the service cannot serve; ``field`` is its FHIRPath-like place."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"Subscription.{field}: {why}" if field else f"Subscription: {why}")
        self.field = field


@dataclass(frozen=True)
class Request:
    """What a valid R5 Subscription asks for: patients and metrics (``None``: all that
    consent allows), and how to deliver."""

    patients: list[str] | None
    metrics: list[str] | None
    delivery: Delivery


def topic_url_ok(topic: str, base: str) -> bool:
    return topic in (TOPIC_URL, f"{base}/SubscriptionTopic/{TOPIC_ID}")


def parse(doc: Any, base: str) -> Request:
    """An R5 Subscription -> what to subscribe to; raises :class:`InvalidSubscription` naming
    the first field that is wrong (structure first, by ``fhir.resources``, then meaning)."""
    from fhir.resources.subscription import Subscription as Model

    if not isinstance(doc, Mapping):
        raise InvalidSubscription("", "the body is not a JSON object")
    try:
        Model.model_validate(dict(doc))
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        raise InvalidSubscription(_where(tuple(first["loc"])), _say(first)) from None
    topic = str(doc["topic"])
    if not topic_url_ok(topic, base):
        raise InvalidSubscription(
            "topic", f"{topic!r} is not a topic of this service (use {TOPIC_URL})"
        )
    if doc.get("status") not in ("requested", "active"):
        raise InvalidSubscription("status", f"{doc.get('status')!r}: create it as requested")
    if "end" in doc:
        raise InvalidSubscription("end", "not supported: DELETE the subscription to end it")
    content_type = doc.get("contentType", FHIR_JSON)
    if content_type != FHIR_JSON:
        raise InvalidSubscription("contentType", f"{content_type!r}: only {FHIR_JSON}")
    content = str(doc.get("content", "id-only"))
    if content not in CONTENTS:
        raise InvalidSubscription("content", f"{content!r}: {', '.join(CONTENTS)}")
    channel = _channel(doc["channelType"])
    heartbeat = doc.get("heartbeatPeriod")
    if heartbeat is not None and not 1 <= int(heartbeat) <= MAX_HEARTBEAT_S:
        raise InvalidSubscription("heartbeatPeriod", f"{heartbeat}: 1 to {MAX_HEARTBEAT_S} s")
    max_count = doc.get("maxCount")
    if max_count is not None and int(max_count) > MAX_COUNT:
        raise InvalidSubscription("maxCount", f"{max_count}: at most {MAX_COUNT}")
    patients, metrics = _filters(doc.get("filterBy") or [])
    return Request(
        patients,
        metrics,
        Delivery(
            content=content,
            channel=channel,
            heartbeat_s=None if heartbeat is None else float(heartbeat),
            max_count=None if max_count is None else int(max_count),
            topic=topic,
        ),
    )


def _channel(coding: Mapping[str, Any]) -> str:
    system, code = coding.get("system"), coding.get("code")
    if code == "websocket" and system in (None, CHANNEL_SYSTEM):
        return "websocket"
    if code == "sse" and system in (None, SSE_SYSTEM):
        return "sse"
    raise InvalidSubscription(
        "channelType",
        f"{system or ''}|{code}: offered are websocket ({CHANNEL_SYSTEM}) and sse ({SSE_SYSTEM})",
    )


def _filters(filters: list[Mapping[str, Any]]) -> tuple[list[str] | None, list[str] | None]:
    patients: list[str] | None = None
    metrics: list[str] | None = None
    for i, f in enumerate(filters):
        at = f"filterBy[{i}]"
        if f.get("resourceType", "Observation") not in _OBSERVATION:
            raise InvalidSubscription(f"{at}.resourceType", "the topic is about Observation")
        if f.get("comparator", "eq") != "eq":
            raise InvalidSubscription(f"{at}.comparator", f"{f['comparator']!r}: only eq")
        if "modifier" in f:
            raise InvalidSubscription(f"{at}.modifier", "no modifier is supported")
        name, values = f["filterParameter"], [v.strip() for v in str(f["value"]).split(",")]
        if name == "patient":
            if patients is not None:
                raise InvalidSubscription(at, "patient given twice (comma-separate patients)")
            patients = [_patient(v, f"{at}.value") for v in values]
        elif name == "code":
            if metrics is not None:
                raise InvalidSubscription(at, "code given twice (comma-separate codes)")
            metrics = sorted({m for v in values for m in _metrics(v, f"{at}.value")})
        else:
            raise InvalidSubscription(
                f"{at}.filterParameter", f"{name!r}: the topic filters by patient and code"
            )
    return patients, metrics


def _patient(value: str, at: str) -> str:
    kind, _, ident = value.rpartition("/")
    if kind not in ("", "Patient") or not ident:
        raise InvalidSubscription(at, f"{value!r} is not Patient/<id>")
    return ident


def _metrics(token: str, at: str) -> list[str]:
    system, _, code = token.rpartition("|")
    if system and system != LOINC:
        raise InvalidSubscription(at, f"{token!r}: only LOINC ({LOINC}) codes")
    found = METRICS_BY_LOINC.get(code)
    if found is None:
        raise InvalidSubscription(at, f"{token!r} is not a vital sign this service streams")
    return found


def _loinc(metric: str) -> str:
    return (FHIR_MAP | FHIR_BP)[metric].codings[0][0]


def _filter(name: str, value: str) -> dict[str, str]:
    return {"resourceType": "Observation", "filterParameter": name, "value": value}


def subscription_resource(sub: Subscription, base: str) -> dict[str, Any]:
    """Any subscription as an R5 Subscription resource (``endpoint``: where to connect)."""
    d = sub.delivery
    filters = []
    if sub.patients is not None:
        value = ",".join(f"Patient/{p}" for p in sorted(sub.patients))
        filters.append(
            {"resourceType": "Observation", "filterParameter": "patient", "value": value}
        )
    if sub.metrics is not None:
        codes = ",".join(sorted({f"{LOINC}|{_loinc(m)}" for m in sub.metrics}))
        filters.append(_filter("code", codes))
    channel = d.channel or "sse"
    ws = base.replace("http", "ws", 1).removesuffix("/fhir") + f"/stream/ws/{sub.id}"
    sse = base.removesuffix("/fhir") + f"/stream/sse/{sub.id}"
    out: dict[str, Any] = {
        "resourceType": "Subscription",
        "id": sub.id,
        "status": "active" if sub.closed is None else "off",
        "topic": d.topic or TOPIC_URL,
        "reason": "new vital signs of consenting patients",
        "channelType": (
            {"system": CHANNEL_SYSTEM, "code": "websocket"}
            if channel == "websocket"
            else {"system": SSE_SYSTEM, "code": "sse"}
        ),
        "endpoint": ws if channel == "websocket" else sse,
        "content": d.content if d.content in CONTENTS else "full-resource",
        "contentType": FHIR_JSON,
    }
    if filters:
        out["filterBy"] = filters
    if d.heartbeat_s is not None:
        out["heartbeatPeriod"] = int(d.heartbeat_s)
    if d.max_count is not None:
        out["maxCount"] = d.max_count
    return out


def status_resource(sub: Subscription, kind: str) -> dict[str, Any]:
    """The SubscriptionStatus of a notification or ``$status`` (``kind``: handshake,
    heartbeat, event-notification, query-status, query-event)."""
    return {
        "resourceType": "SubscriptionStatus",
        "status": "active" if sub.closed is None else "off",
        "type": kind,
        "eventsSinceSubscriptionStart": str(sub.number),
        "subscription": {"reference": f"Subscription/{sub.id}"},
        "topic": sub.delivery.topic or TOPIC_URL,
    }


def subscription_topic(base: str) -> dict[str, Any]:
    """The one topic: a new Observation (a vital sign) of a patient, filtered by patient
    and code; each notification's focus is the Observation (or a DetectedIssue for a
    device's sequence gap, reset or clock jump)."""
    return {
        "resourceType": "SubscriptionTopic",
        "id": TOPIC_ID,
        "url": TOPIC_URL,
        "identifier": [
            {"system": "urn:ietf:rfc:3986", "value": f"{base}/SubscriptionTopic/{TOPIC_ID}"}
        ],
        "title": "New vital signs",
        "status": "active",
        "description": (
            "A vital sign (an Observation of category vital-signs) was received from a"
            " patient's device; sent only to subscribers whose consent covers it."
        ),
        "resourceTrigger": [
            {
                "description": "a new vital-sign Observation",
                "resource": _OBSERVATION[1],
                "supportedInteraction": ["create"],
            }
        ],
        "canFilterBy": [
            {
                "description": "the patient (Patient/<id>; comma for several)",
                "resource": "Observation",
                "filterParameter": "patient",
                "comparator": ["eq"],
            },
            {
                "description": "LOINC codes of the vital signs (comma for several)",
                "resource": "Observation",
                "filterParameter": "code",
                "comparator": ["eq"],
            },
        ],
        "notificationShape": [{"resource": "Observation"}],
    }
