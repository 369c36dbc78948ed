"""The live fan-out's rules without a broker: readings go only where consent lets them, per
reading; a subscriber that does not read loses only its own events and is told which; a
revocation ends the subscriptions it empties, with the reason; deliveries are audited."""

from __future__ import annotations

import asyncio
from collections import deque
from pathlib import Path

import pytest
from aiokafka.structs import ConsumerRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from clinic import device_events, fanout, live
from clinic.audit import AuditAction, AuditLog
from clinic.auth import Principal, Role, Scope
from clinic.consent import ALL_VITALS
from clinic.consent_store import ConsentStore
from clinic.live import Behind, Event, Hub, Subscription, SubscriptionError
from streams.clock import ClockEvent
from streams.sequence import SequenceTracker
from vitalproof.errors import WireFormatError
from vitalproof.schema import SampleBatch, Transport
from vitalproof.settings import PathSettings, Settings

T0 = 1_800_000_000_000_000
READ = (Scope.parse("user/Observation.rs"),)


def clinician(name: str) -> Principal:
    return Principal(f"Practitioner/{name}", Role.CLINICIAN, READ)


def batch(patient: str, n: int, seq0: int = 0) -> SampleBatch:
    b = SampleBatch(
        device_id=f"dev-{patient}", patient_id=patient, transport=Transport.MQTT, receive_time_us=T0
    )
    for i in range(n):
        b.add("heart_rate", "/min", T0 + i, seq0 + 2 * i, 60.0)
        b.add("spo2", "%", T0 + i, seq0 + 2 * i + 1, 97.0)
    b.fill_reading_ids()
    return b


@pytest.fixture
def hub(tmp_path: Path) -> Hub:
    return Hub(ConsentStore(tmp_path / "c.sqlite3"), AuditLog(tmp_path / "a.sqlite3"))


def test_each_reading_goes_only_where_consent_lets_it(hub: Hub) -> None:
    hub.consent.grant(
        patient_id="p1", grantee="Practitioner/a", metrics=frozenset({"spo2"}),
        purpose="TREAT", actor="Patient/p1",
    )  # fmt: skip
    a = hub.subscribe(clinician("a"), None, None)  # all who consented to a
    b = hub.subscribe(clinician("b"), None, None)  # nobody consented to b
    with pytest.raises(SubscriptionError, match="no consent for what was asked: no grant"):
        hub.subscribe(clinician("b"), ["p1"], ["heart_rate"])
    hub.deliver([batch("p1", 5), batch("p2", 5)])
    assert [(e.patient_id, e.metric) for e in a.held] == [("p1", "spo2")] * 5
    assert [e.number for e in a.held] == [1, 2, 3, 4, 5]
    assert not b.held and hub.refused == 15 + 20  # a: p1's HR, p2's all; b: everything
    hub.flush_audit()
    streamed = [r for r in hub.audit.records() if r.action is AuditAction.STREAM]
    assert [(r.actor, r.patient_id, r.count) for r in streamed] == [("Practitioner/a", "p1", 5)]
    refusals = [r for r in hub.audit.records() if r.outcome.value == "refused"]
    assert [(r.actor, r.action) for r in refusals] == [("Practitioner/b", AuditAction.SUBSCRIBE)]


def test_a_reader_that_falls_behind_is_told_what_it_lost(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live, "HOLD", 100)
    patient = Principal("Patient/p1", Role.PATIENT, (Scope.parse("patient/Observation.rs"),), "p1")
    sub = hub.subscribe(patient, None, None)
    other = hub.subscribe(patient, None, ["spo2"])
    assert sub.held.maxlen == 100
    hub.deliver([batch("p1", 100)])  # 200 events for sub: only the last 100 are held
    assert len(sub.held) == 100 and sub.number == 200
    with pytest.raises(SubscriptionError, match=r"events 1\.\.100 of subscription"):
        sub.since(0)
    assert [e.number for e in sub.since(150)] == list(range(151, 201))
    assert [e.number for e in other.since(0)] == list(range(1, 101))  # not slowed, not cut


def test_revocation_ends_the_subscriptions_it_empties_with_the_reason(hub: Hub) -> None:
    grant = hub.consent.grant(
        patient_id="p1", grantee="Practitioner/a", metrics=frozenset({ALL_VITALS}),
        purpose="TREAT", actor="Patient/p1",
    )  # fmt: skip
    sub = hub.subscribe(clinician("a"), ["p1"], None)
    hub.deliver([batch("p1", 2)])
    assert sub.number == 4
    hub.consent.revoke(grant.grant_id, actor="Patient/p1")
    assert hub.consent_changed() is True
    assert sub.closed is not None and "consent ended" in sub.closed and "revoked" in sub.closed
    assert sub.id not in hub.subscriptions
    hub.deliver([batch("p1", 2, seq0=100)])
    assert sub.number == 4  # nothing after the revocation


def test_bad_subscription_requests_say_why(hub: Hub) -> None:
    with pytest.raises(SubscriptionError, match="metrics: unknown pulse"):
        hub.subscribe(clinician("a"), ["p1"], ["pulse"])
    with pytest.raises(SubscriptionError, match="may watch only"):
        hub.subscribe(
            Principal("Patient/p1", Role.PATIENT, (Scope.parse("patient/Observation.rs"),), "p1"),
            ["p2"],
            None,
        )
    with pytest.raises(SubscriptionError, match="scopes"):
        hub.subscribe(Principal("Practitioner/a", Role.CLINICIAN, ()), None, None)


def test_the_newest_reading_per_metric_is_kept_even_with_no_subscriber_and_erasure_drops_it(
    hub: Hub,
) -> None:
    hub.deliver([batch("p1", 5, seq0=0)])
    old = batch("p1", 3, seq0=100)
    for i in range(len(old.device_time_us)):
        old.device_time_us[i] -= 3_600_000_000  # an hour older: late, not newer
    hub.deliver([old])
    held = hub.latest["p1"]
    assert set(held) == {"heart_rate", "spo2"}
    # The newest of the first batch, not the late one that came after it.
    assert (held["heart_rate"]["seq"], held["spo2"]["seq"]) == (8, 9)
    hub.forget("p1")
    assert "p1" not in hub.latest


def test_device_events_go_where_consent_lets_readings_go_once_each_and_are_audited(
    hub: Hub,
) -> None:
    """The worker's own payloads (its SequenceTracker and ClockEstimator), decoded as the
    fan-out decodes them: a gap and a reset reach the consented subscription, not the other
    clinician's; a replay of the topic is not delivered twice; erasure drops them."""
    hub.consent.grant(
        patient_id="p1", grantee="Practitioner/a", metrics=frozenset({"spo2"}),
        purpose="TREAT", actor="Patient/p1",
    )  # fmt: skip
    a = hub.subscribe(clinician("a"), None, None)
    b = hub.subscribe(clinician("b"), None, None)
    tracker = SequenceTracker()
    tracker.observe(batch("p1", 3))  # seq 0..5
    worker = [e.to_json() for e in tracker.observe(batch("p1", 2, seq0=20))]  # gap 6..19
    late = batch("p1", 1, seq0=0)  # older: reordering, no event
    worker += [e.to_json() for e in tracker.observe(late)]
    jump = ClockEvent("clock_jump", "dev-p1", None, 0, 30_000_000, T0 + 5, T0 + 30_000_005)
    worker.append(jump.to_json())
    decoded = [device_events.decode(v, {"dev-p1": "p1"}.get) for v in worker]
    events = [e for e in decoded if e is not None]
    assert len(events) == len(worker)
    alert = b'{"kind":"break_glass","patient":"p1","actor":"Practitioner/b"}'
    assert device_events.decode(alert, {}.get) is None  # the topic's other kind: not ours
    assert [(e.kind, e.missing) for e in events] == [("gap", 14), ("clock_jump", 0)]
    assert events[0].describe() == "gap: 14 readings missing"
    assert events[1].patient_id == "p1" and events[1].step_us == 30_000_000  # via the registry
    assert hub.deliver_device_events(events) == 2
    assert hub.deliver_device_events(events) == 0  # a replay
    assert [(e.number, e.body["event"], e.is_reading) for e in a.held] == [
        (1, "gap", False),
        (2, "clock_jump", False),
    ]
    assert a.held[0].body["label"] == "gap: 14 readings missing" and not b.held
    assert hub.refused == 2  # b asked for everyone; p1 shares nothing with b
    hub.flush_audit()
    streamed = [r for r in hub.audit.records() if r.action is AuditAction.STREAM]
    assert [(r.patient_id, r.what.split(": ")[1], r.count) for r in streamed] == [
        ("p1", "device events", 2)
    ]
    assert [e.kind for e in hub.recent_device_events("p1", T0, None)] == ["gap", "clock_jump"]
    assert [e.kind for e in hub.recent_device_events("p1", T0 + 1, None)] == ["clock_jump"]
    assert hub.recent_device_events("p1", None, T0) == []
    hub.forget("p1")
    assert hub.recent_device_events("p1", None, None) == []


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"{", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"kind":"nap","device_id":"d"}', "kind 'nap' is not one of"),
        (b'{"kind":"gap"}', "device_id missing"),
        (b'{"kind":"gap","device_id":"d9","device_time_us":1}', "no enrolled patient"),
        (b'{"kind":"gap","device_id":"d","device_time_us":"x"}', "device_time_us must be"),
        (b'{"kind":"gap","device_id":"d","device_time_us":1}', "last_seq must be"),
    ],
)
def test_a_device_event_that_does_not_decode_says_what_is_wrong(payload: bytes, error: str) -> None:
    with pytest.raises(WireFormatError, match=error):
        device_events.decode(payload, {"d": "p"}.get)


def test_device_events_are_noted_for_replay_and_made_again_the_same_from_their_records(
    hub: Hub, tmp_path: Path
) -> None:
    """What the Kafka replay does with the records it read back (without the broker): the
    same numbers and bodies as delivered; records that no longer give as many events as were
    numbered are refused with a reason, never renumbered."""
    hub.consent.grant(
        patient_id="p1", grantee="Practitioner/a", metrics=frozenset({ALL_VITALS}),
        purpose="TREAT", actor="Patient/p1",
    )  # fmt: skip
    sub = hub.subscribe(clinician("a"), None, None)
    settings = Settings(paths=PathSettings(home=tmp_path))
    tracker = SequenceTracker()
    tracker.observe(batch("p1", 1))
    gaps = [tracker.observe(batch("p1", 1, seq0=10 * k))[0] for k in (1, 2)]
    records = [
        ConsumerRecord(settings.kafka.topic_events, 0, 7 + k, T0 // 1000, 0, b"dev-p1",
                       g.to_json(), None, 6, 100, ())
        for k, g in enumerate(gaps)
    ]  # fmt: skip
    decoded = [device_events.decode(r.value, {}.get) for r in records]
    assert (
        hub.deliver_device_events([e for e in decoded if e], [fanout._source([r]) for r in records])
        == 2
    )
    assert [(g.first, g.last, g.source.first_offset) for g in sub.segments] == [
        (1, 1, 7),
        (2, 2, 8),
    ]
    replayer = fanout.Replayer(settings, hub)

    async def made_again(g: live.Segment, r: ConsumerRecord[bytes, bytes]) -> list[Event]:
        readings = await replayer._readings(sub, g, {r.offset: r}, 0)
        return replayer._events(sub, g, 0, readings, 0, 2)

    again = [e for g, r in zip(sub.segments, records, strict=True)
             for e in asyncio.run(made_again(g, r))]  # fmt: skip
    assert [(e.number, e.body) for e in again] == [(e.number, e.body) for e in sub.held]
    with pytest.raises(fanout.Gone, match=r"events 1\.\.1 of subscription .* give back 0 of them"):
        replayer._events(sub, sub.segments[0], 0, [], 0, 2)


@settings(max_examples=50, deadline=None)
@given(held=st.integers(0, 40), total=st.integers(0, 120), asked=st.integers(-1, 130))
def test_since_gives_exactly_the_held_events_after_a_number(
    held: int, total: int, asked: int
) -> None:
    """Taken from the right (held numbers are contiguous), the answer is what a pass over
    everything held would give, or Behind when some asked for are no longer held."""
    who = Principal("Practitioner/x", Role.CLINICIAN, ())
    sub = Subscription("s", who, None, None, 0.0, held=deque(maxlen=max(held, 1)))
    for n in range(1, total + 1):
        sub.number = n
        sub.held.append(Event(n, "p", "heart_rate", {}))
    want = [e.number for e in sub.held if e.number > asked]
    if sub.held and asked < sub.held[0].number - 1:
        with pytest.raises(Behind):
            sub.since(asked)
    else:
        assert [e.number for e in sub.since(asked)] == want
