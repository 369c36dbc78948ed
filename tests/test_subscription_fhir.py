"""R5 topic-based subscriptions, parsed and rendered without a service: a valid Subscription
becomes the patients, metrics and delivery it asks for; every wrong field is refused naming
it; what the service renders (Subscription, SubscriptionTopic, SubscriptionStatus, the
notification Bundles) validates as R5 with fhir.resources."""

from __future__ import annotations

from typing import Any

import pytest
from fhir.resources.bundle import Bundle
from fhir.resources.subscription import Subscription as R5Subscription
from fhir.resources.subscriptionstatus import SubscriptionStatus
from fhir.resources.subscriptiontopic import SubscriptionTopic
from hypothesis import given, settings
from hypothesis import strategies as st

from clinic.auth import Principal, Role
from clinic.live import Delivery, Event, Subscription
from clinic.service.stream_routes import _notification
from clinic.service.subscription_fhir import (
    CHANNEL_SYSTEM,
    SSE_SYSTEM,
    TOPIC_URL,
    InvalidSubscription,
    parse,
    status_resource,
    subscription_resource,
    subscription_topic,
)

BASE = "http://127.0.0.1:8000/fhir"
HR, SPO2, SYS = "8867-4", "2708-6", "8480-6"


def doc(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "resourceType": "Subscription",
        "status": "requested",
        "topic": TOPIC_URL,
        "channelType": {"system": CHANNEL_SYSTEM, "code": "websocket"},
        "content": "full-resource",
    }
    return {k: v for k, v in (d | over).items() if v is not None}


def sub_of(req: Any, sid: str = "s1") -> Subscription:
    who = Principal(subject="Practitioner/dr-a", role=Role.CLINICIAN, scopes=())
    patients = None if req.patients is None else frozenset(req.patients)
    metrics = None if req.metrics is None else frozenset(req.metrics)
    return Subscription(sid, who, patients, metrics, 0.0, delivery=req.delivery)


def test_a_full_subscription_gives_its_patients_metrics_and_delivery() -> None:
    req = parse(
        doc(
            filterBy=[
                {"resourceType": "Observation", "filterParameter": "patient",
                 "value": "Patient/pt-1,pt-2"},
                {"filterParameter": "code", "value": f"http://loinc.org|{HR},{SPO2}"},
            ],
            heartbeatPeriod=5,
            maxCount=50,
        ),
        BASE,
    )  # fmt: skip
    assert req.patients == ["pt-1", "pt-2"]
    assert req.metrics == ["heart_rate", "pulse_rate", "spo2"]  # 8867-4 is both
    assert req.delivery == Delivery("full-resource", "websocket", 5.0, 50, TOPIC_URL)


def test_no_filter_is_everything_consent_allows_and_the_default_content_is_id_only() -> None:
    req = parse(doc(content=None, channelType={"system": SSE_SYSTEM, "code": "sse"}), BASE)
    assert (req.patients, req.metrics) == (None, None)
    assert req.delivery.content == "id-only" and req.delivery.channel == "sse"
    assert parse(doc(topic=f"{BASE}/SubscriptionTopic/vital-signs"), BASE).delivery.topic


@pytest.mark.parametrize(
    ("over", "says"),
    [
        ({"status": None}, "Subscription.status: Value for the field 'status' is required"),
        ({"topic": "http://elsewhere/SubscriptionTopic/x"}, "Subscription.topic: 'http://elsewhere"),
        ({"channelType": {"system": CHANNEL_SYSTEM, "code": "rest-hook"}},
         f"Subscription.channelType: {CHANNEL_SYSTEM}|rest-hook: offered"),
        ({"content": "everything"}, "Subscription.content: 'everything': empty, id-only"),
        ({"contentType": "application/xml"}, "Subscription.contentType: 'application/xml': only"),
        ({"heartbeatPeriod": 0}, "Subscription.heartbeatPeriod: 0: 1 to 3600 s"),
        ({"heartbeatPeriod": -1}, "Subscription.heartbeatPeriod: Input should be greater"),
        ({"maxCount": 0}, "Subscription.maxCount"),
        ({"maxCount": 20_000}, "Subscription.maxCount: 20000: at most 10000"),
        ({"end": "2030-01-01T00:00:00Z"}, "Subscription.end: not supported"),
        ({"status": "off"}, "Subscription.status: 'off': create it as requested"),
        ({"bogus": 1}, "Subscription.bogus: unknown field"),
        ({"filterBy": [{"filterParameter": "device", "value": "d-1"}]},
         "Subscription.filterBy[0].filterParameter: 'device': the topic filters by patient"),
        ({"filterBy": [{"filterParameter": "code", "value": "1234-5"}]},
         "Subscription.filterBy[0].value: '1234-5' is not a vital sign"),
        ({"filterBy": [{"filterParameter": "code", "value": "http://snomed.info/sct|1"}]},
         "Subscription.filterBy[0].value: 'http://snomed.info/sct|1': only LOINC"),
        ({"filterBy": [{"filterParameter": "patient", "value": "Device/d-1"}]},
         "Subscription.filterBy[0].value: 'Device/d-1' is not Patient/<id>"),
        ({"filterBy": [{"filterParameter": "patient", "value": "a"},
                       {"filterParameter": "patient", "value": "b"}]},
         "Subscription.filterBy[1]: patient given twice"),
        ({"filterBy": [{"filterParameter": "patient", "value": "a", "comparator": "gt"}]},
         "Subscription.filterBy[0].comparator: 'gt': only eq"),
        ({"filterBy": [{"filterParameter": "patient", "value": "a", "modifier": "not"}]},
         "Subscription.filterBy[0].modifier: no modifier"),
        ({"filterBy": [{"resourceType": "Patient", "filterParameter": "patient", "value": "a"}]},
         "Subscription.filterBy[0].resourceType: the topic is about Observation"),
    ],
)  # fmt: skip
def test_each_wrong_field_is_refused_naming_it(over: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidSubscription) as e:
        parse(doc(**over), BASE)
    assert str(e.value).startswith(says), str(e.value)


def test_a_body_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(InvalidSubscription, match="not a JSON object"):
        parse([1], BASE)


_ids = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
_codes = st.sampled_from([HR, SPO2, SYS, "9279-1", "8310-5"])


@settings(max_examples=60, deadline=None)
@given(
    patients=st.none() | st.lists(_ids, min_size=1, max_size=4, unique=True),
    codes=st.none() | st.lists(_codes, min_size=1, max_size=3, unique=True),
    content=st.sampled_from(["empty", "id-only", "full-resource"]),
    channel=st.sampled_from([(CHANNEL_SYSTEM, "websocket"), (SSE_SYSTEM, "sse")]),
    heartbeat=st.none() | st.integers(1, 3600),
    max_count=st.none() | st.integers(1, 10_000),
)
def test_what_is_rendered_validates_as_r5_and_parses_back_to_the_same(
    patients: list[str] | None,
    codes: list[str] | None,
    content: str,
    channel: tuple[str, str],
    heartbeat: int | None,
    max_count: int | None,
) -> None:
    filters = []
    if patients is not None:
        filters.append({"filterParameter": "patient", "value": ",".join(patients)})
    if codes is not None:
        filters.append({"filterParameter": "code", "value": ",".join(codes)})
    req = parse(
        doc(
            filterBy=filters or None,
            content=content,
            channelType={"system": channel[0], "code": channel[1]},
            heartbeatPeriod=heartbeat,
            maxCount=max_count,
        ),
        BASE,
    )
    rendered = subscription_resource(sub_of(req), BASE)
    R5Subscription.model_validate(rendered)
    again = parse(rendered | {"status": "requested"}, BASE)
    assert again.delivery == req.delivery
    assert again.patients == (None if patients is None else sorted(patients))
    assert again.metrics == req.metrics
    assert rendered["endpoint"].endswith(
        f"/stream/{'ws' if channel[1] == 'websocket' else 'sse'}/s1"
    )


def test_the_topic_status_and_notifications_validate_as_r5() -> None:
    SubscriptionTopic.model_validate(subscription_topic(BASE))
    sub = sub_of(parse(doc(), BASE))
    sub.number = 7
    SubscriptionStatus.model_validate(status_resource(sub, "query-status"))
    body = {
        "patient": "pt-1", "device": "dev-1", "metric": "heart_rate", "unit": "/min",
        "t_us": 1_800_000_000_000_000, "received_us": 1_800_000_000_100_000, "seq": 3,
        "value": 61.0, "quality": 0, "flags": [], "reading_id": "ab" * 16,
    }  # fmt: skip
    events = [Event(6, "pt-1", "heart_rate", body), Event(7, "pt-1", "heart_rate", body)]
    for fmt in ("fhir", "id-only", "empty"):
        bundle = _notification(sub, "event-notification", events, fmt)
        Bundle.model_validate(bundle)
        status = bundle["entry"][0]["resource"]
        assert [e["eventNumber"] for e in status["notificationEvent"]] == ["6", "7"]
        assert status["eventsSinceSubscriptionStart"] == "7"
        focus = [e.get("focus") for e in status["notificationEvent"]]
        assert focus == (
            [None, None] if fmt == "empty" else [{"reference": f"Observation/{'ab' * 16}"}] * 2
        )
        assert len(bundle["entry"]) == (3 if fmt == "fhir" else 1)
    for kind in ("handshake", "heartbeat"):
        Bundle.model_validate(_notification(sub, kind, [], "fhir"))
