"""Live subscriptions: who watches which patients' vitals, consent per reading, numbered events.

Each subscription numbers its notifications 1, 2, 3, ... (FHIR R5's ``eventNumber``) and holds
the last :data:`HOLD` of them, so a client that lost its connection asks for what it missed
(``Last-Event-ID`` on SSE, ``$events?eventsSinceNumber=`` on the FHIR base) and gets exactly
those, then the live ones: no gap, no duplicate. The held events are the only buffer: a
connection is a cursor over them, so a subscriber that does not read costs at most
:data:`HOLD` events, and no other subscriber is slowed. Events older than those held are
not lost: each subscription notes, per delivery, which records of which partition its
events came from (:class:`Segment`, a few per poll), so :class:`clinic.fanout.Replayer`
reads them back from Kafka by offset and numbers them again; what Kafka no longer has is
named (event numbers, partition, offsets, time), never skipped.

Consent is checked per reading, at delivery: a cached decision per (grantee, patient, metric)
that :meth:`Hub.consent_changed` drops whenever the consent store changes (and every
:data:`RECHECK_S` so expiry takes effect), and subscriptions left with nothing to see are
closed with the reason. Deliveries are audited per subscription and patient, once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from clinic.audit import AuditAction, AuditEntry, AuditLog, Outcome
from clinic.auth import Principal, Role
from clinic.consent_store import ConsentStore
from clinic.device_events import DeviceEvent
from vitalproof.errors import VitalproofError
from vitalproof.schema import SampleBatch, flag_names
from vitalproof.units import Metric

#: Events a subscription holds for replay (and a slow reader may fall behind by).
HOLD = 10_000
#: Seconds between consent re-checks when nothing changed (expiry of a grant).
RECHECK_S = 0.5
#: Every metric, for a subscription that names none.
ALL_METRICS: tuple[str, ...] = tuple(m.value for m in Metric)
#: How long a subscription nobody is connected to stays resumable.
IDLE_EXPIRY_S = 300.0
#: Where a subscription's events came from, kept for replay from Kafka (per subscription).
MAX_SEGMENTS = 100_000
#: Device events (gaps, resets, clock jumps) kept per patient for charts opened later.
RECENT_DEVICE_EVENTS = 500


class SubscriptionError(VitalproofError):
    """A subscription request that cannot be served (the message says why)."""


class Behind(SubscriptionError):
    """The events asked for are no longer held: ``first..last`` must come from Kafka."""

    def __init__(self, message: str, first: int, last: int) -> None:
        super().__init__(message)
        self.first, self.last = first, last


@dataclass(frozen=True, slots=True)
class Source:
    """Where one delivery's records came from: a run of offsets of one partition."""

    topic: str
    partition: int
    first_offset: int
    last_offset: int
    timestamp_ms: int  # the first record's (for naming the time of events that are gone)


@dataclass(frozen=True, slots=True)
class Segment:
    """Events ``first..last`` of a subscription were the readings (or device events) of
    ``pairs`` (patient, metric; metric "" for a device event) in ``source``'s records, in
    record and reading order: enough to number them again from Kafka."""

    first: int
    last: int
    source: Source
    pairs: frozenset[tuple[str, str]]


@dataclass
class Event:
    """One notification: a reading (or a device event: ``metric`` is then empty), its number
    in its subscription, and its compact form."""

    number: int
    patient_id: str
    metric: str
    body: dict[str, Any]

    @property
    def is_reading(self) -> bool:
        return bool(self.metric)


@dataclass(frozen=True)
class Delivery:
    """How a subscription's notifications are shaped and paced (FHIR R5 Subscription's
    ``content``, ``channelType``, ``heartbeatPeriod``, ``maxCount``, ``topic``); the
    compact JSON form for charts by default."""

    content: str = "compact"  # compact | empty | id-only | full-resource
    channel: str | None = None  # websocket | sse; None: either
    heartbeat_s: float | None = None
    max_count: int | None = None
    topic: str | None = None  # the R5 topic's canonical URL (None: a compact subscription)


@dataclass
class Subscription:
    id: str
    principal: Principal
    patients: frozenset[str] | None  # None: every patient who consented to the principal
    metrics: frozenset[str] | None  # None: every vital sign
    created: float
    held: deque[Event] = field(default_factory=lambda: deque(maxlen=HOLD))
    # where every event came from, for replay past what is held (a few per poll, not one
    # per event)
    segments: deque[Segment] = field(default_factory=lambda: deque(maxlen=MAX_SEGMENTS))
    number: int = 0
    closed: str | None = None  # why it ended, once it has
    connections: int = 0
    idle_since: float = 0.0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    delivery: Delivery = field(default_factory=Delivery)

    def wants(self, patient_id: str, metric: str) -> bool:
        return self.wants_patient(patient_id) and (self.metrics is None or metric in self.metrics)

    def wants_patient(self, patient_id: str) -> bool:
        return self.patients is None or patient_id in self.patients

    def since(self, number: int) -> list[Event]:
        """Held events after ``number``; raises if some after it are no longer held."""
        if self.held and number < self.held[0].number - 1:
            first = self.held[0].number
            raise Behind(
                f"events {number + 1}..{first - 1} of subscription {self.id} are no longer"
                " held; search Observation history for that time",
                number + 1,
                first - 1,
            )
        if not self.held:
            return []
        # Held numbers are contiguous (each event is the next number), so the k newest are
        # the answer: taken from the right, not by a pass over all 10,000 held on every wake.
        k = self.held[-1].number - number
        if k <= 0:
            return []
        if k >= len(self.held):
            return list(self.held)
        out = list(itertools.islice(reversed(self.held), k))
        out.reverse()
        return out

    def close(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason
        self.wake.set()


@dataclass
class _Targets:
    """Where a patient's readings go, per metric, and how many asked but may not see them."""

    to: dict[str, list[Subscription]] = field(default_factory=dict)
    denied: dict[str, int] = field(default_factory=dict)


class Hub:
    """Every live subscription of the service, and the fan-out of readings to them."""

    def __init__(
        self, consent: ConsentStore, audit: AuditLog, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.consent = consent
        self.audit = audit
        self.clock = clock
        self.subscriptions: dict[str, Subscription] = {}
        self._consent_seen = consent.changes()
        self._index = consent.index()
        self._expiries = self._expiry_times()
        self._checked_us = int(clock() * 1e6)
        # patient -> metric -> the subscriptions a reading of it goes to (consent checked);
        # dropped when consent, time (an expiry) or the subscriptions change.
        self._targets: dict[str, _Targets] = {}
        # (subscription, patient, what) -> how many were delivered since the last flush
        self._unaudited: dict[tuple[str, str, str], int] = {}
        # patient -> metric -> the newest reading seen since the service started (compact),
        # for the clinicians' patient list; disclosed only through the consent gate.
        self.latest: dict[str, dict[str, dict[str, Any]]] = {}
        # patient -> the newest device events (gaps, resets, clock jumps) since the service
        # started, for charts opened after them; disclosed only through the consent gate.
        self.device_events: dict[str, deque[DeviceEvent]] = {}
        self.device_events_seen = 0
        self.delivered = 0
        self.refused = 0
        self.fanout_ready = False  # the Kafka reader has its partitions (clinic.fanout)

    def status(self) -> dict[str, Any]:
        """The fan-out's state and counts (no health data): ``/status`` and pipeline health."""
        return {
            "fanout": "ready" if self.fanout_ready else "waiting",
            "subscriptions": len(self.subscriptions),
            "connections": sum(s.connections for s in self.subscriptions.values()),
            "readings_delivered": self.delivered,
            "deliveries_refused": self.refused,
        }

    # -- subscriptions --------------------------------------------------------------------

    def subscribe(
        self,
        principal: Principal,
        patients: Iterable[str] | None,
        metrics: Iterable[str] | None,
        delivery: Delivery | None = None,
    ) -> Subscription:
        if principal.role is Role.OPERATOR:
            raise SubscriptionError("the operator role sees pipeline health, not live vitals")
        if not principal.may("Observation", "s"):
            raise SubscriptionError("the token's scopes do not allow reading Observation")
        wanted = None if patients is None else frozenset(patients)
        if principal.role is Role.PATIENT:
            own = frozenset({principal.patient_id or ""})
            if wanted is not None and wanted != own:
                raise SubscriptionError(
                    f"a patient token for {principal.patient_id} may watch only that patient"
                )
            wanted = own
        if wanted is not None and not wanted:
            raise SubscriptionError("patients: name at least one, or leave it out for all")
        chosen = None if metrics is None else frozenset(metrics)
        if chosen is not None:
            known = {m.value for m in Metric}
            unknown = sorted(chosen - known)
            if unknown:
                raise SubscriptionError(f"metrics: unknown {', '.join(unknown)}")
        if wanted is not None and principal.role is Role.CLINICIAN:
            self.consent_changed()
            now_us = int(self.clock() * 1e6)
            metrics_asked = chosen or frozenset(ALL_METRICS)
            if not any(
                self.allowed(principal, p, m, now_us) for p in wanted for m in metrics_asked
            ):
                reason = self._index.decide(
                    grantee=principal.subject,
                    patient_id=sorted(wanted)[0],
                    metric=sorted(metrics_asked)[0],
                    at_us=now_us,
                ).reason
                self.audit.append(
                    actor=principal.subject,
                    role=principal.role.value,
                    patient_id=sorted(wanted)[0] if len(wanted) == 1 else None,
                    action=AuditAction.SUBSCRIBE,
                    what=f"subscription: patients {_names(wanted)}, metrics {_names(chosen)}",
                    purpose=None,
                    outcome=Outcome.REFUSED,
                    reason=reason,
                )
                raise SubscriptionError(f"no consent for what was asked: {reason}")
        sub = Subscription(
            id=secrets.token_hex(8),
            principal=principal,
            patients=wanted,
            metrics=chosen,
            created=self.clock(),
            idle_since=self.clock(),
            delivery=delivery or Delivery(),
        )
        self.subscriptions[sub.id] = sub
        self._targets.clear()
        self.audit.append(
            actor=principal.subject,
            role=principal.role.value,
            patient_id=next(iter(wanted)) if wanted and len(wanted) == 1 else None,
            action=AuditAction.SUBSCRIBE,
            what=f"subscription {sub.id}: patients {_names(wanted)}, metrics {_names(chosen)}",
            purpose=None,
            outcome=Outcome.ALLOWED,
            reason="subscribed; each reading is checked against consent on delivery",
        )
        return sub

    def get(self, sub_id: str, principal: Principal) -> Subscription:
        sub = self.subscriptions.get(sub_id)
        if sub is None or sub.principal.subject != principal.subject:
            raise SubscriptionError(f"no subscription {sub_id} of {principal.subject}")
        return sub

    def drop(self, sub: Subscription, reason: str) -> None:
        sub.close(reason)
        self.subscriptions.pop(sub.id, None)
        self._targets.clear()

    # -- consent --------------------------------------------------------------------------

    def allowed(self, principal: Principal, patient_id: str, metric: str, now_us: int) -> bool:
        """The per-reading consent check (an in-memory index of the store's grants)."""
        if principal.role is Role.PATIENT:
            return principal.patient_id == patient_id
        return self._index.allowed(
            grantee=principal.subject, patient_id=patient_id, metric=metric, at_us=now_us
        )

    def _expiry_times(self) -> list[int]:
        return sorted(g.end_us for g in self.consent.grants() if g.end_us is not None)

    def consent_changed(self) -> bool:
        """Rebuild the consent index if the store changed (any process), drop the delivery
        targets if it did or a grant expired since the last check, and close subscriptions
        that named patients none of whom allows any of its metrics now. True if anything
        changed."""
        now_us = int(self.clock() * 1e6)
        seen = self.consent.changes()
        changed = seen != self._consent_seen
        if changed:
            self._consent_seen = seen
            self._index = self.consent.index()
            self._expiries = self._expiry_times()
        expired = any(self._checked_us < t <= now_us for t in self._expiries)
        self._checked_us = now_us
        if not (changed or expired):
            return False
        self._targets.clear()
        for sub in list(self.subscriptions.values()):
            if sub.patients is None or sub.principal.role is Role.PATIENT:
                continue
            metrics = sub.metrics or frozenset(m.value for m in Metric)
            if not any(
                self.allowed(sub.principal, p, m, now_us) for p in sub.patients for m in metrics
            ):
                decision = self._index.decide(
                    grantee=sub.principal.subject,
                    patient_id=next(iter(sub.patients)),
                    metric=next(iter(metrics)),
                    at_us=now_us,
                )
                self._audit_refusal(sub, decision.reason)
                self.drop(sub, f"consent ended: {decision.reason}")
        return True

    async def watch_consent(self, stop: asyncio.Event) -> None:
        """Re-check consent on every change of the store, and every RECHECK_S anyway."""
        while not stop.is_set():
            self.consent_changed()
            self.flush_audit()
            self._expire_idle()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RECHECK_S)
        self.flush_audit()

    # -- delivery -------------------------------------------------------------------------

    def deliver(self, batches: Sequence[SampleBatch], source: Source | None = None) -> int:
        """Fan readings out to every subscription that wants them and may see them.

        Consent is decided per (subscription, patient, metric) for the moment of delivery,
        which is each reading's decision: the answer cannot differ between two readings of
        one call. The decisions are kept until consent, time or the subscriptions change.
        With ``source`` (the records the batches were decoded from, in order), each
        subscription that got events notes them as a :class:`Segment`, for replay."""
        for batch in batches:
            self._remember_latest(batch)
        if not self.subscriptions:
            return 0
        if self.consent.changes() != self._consent_seen:  # one query per poll, not per reading
            self.consent_changed()
        n = 0
        before: dict[str, int] = {}  # a subscription's number before its first event here
        pairs: dict[str, set[tuple[str, str]]] = {}
        noted: set[str] = set()  # patients whose targets are in pairs (fixed within a call)
        for batch in batches:
            patient = batch.patient_id or ""
            targets = self._targets.get(patient)
            if targets is None:
                targets = self._targets[patient] = self._targets_of(patient)
            if targets.denied:
                self.refused += sum(targets.denied.get(m, 0) for m in batch.metric)
            if not targets.to:
                continue
            if source is not None and patient not in noted:  # once per patient and call
                noted.add(patient)
                for metric, to in targets.to.items():
                    for sub in to:
                        seen = pairs.get(sub.id)
                        if seen is None:  # before any event of this call reached it
                            seen = pairs[sub.id] = set()
                            before[sub.id] = sub.number
                        seen.add((patient, metric))
            if not batch.reading_id:
                batch.fill_reading_ids()
            audited: dict[str, int] = {}
            for i, metric in enumerate(batch.metric):
                subs = targets.to.get(metric)
                if not subs:
                    continue
                body = compact(batch, i)
                for sub in subs:
                    sub.number += 1
                    sub.held.append(Event(sub.number, patient, metric, body))
                    audited[sub.id] = audited.get(sub.id, 0) + 1
                n += len(subs)
            for sub_id, count in audited.items():
                key = (sub_id, patient, "live readings")
                self._unaudited[key] = self._unaudited.get(key, 0) + count
                self.subscriptions[sub_id].wake.set()
        if source is not None:
            self._note_segments(before, pairs, source)
        self.delivered += n
        return n

    def _note_segments(
        self, before: dict[str, int], pairs: dict[str, set[tuple[str, str]]], source: Source
    ) -> None:
        for sub_id, seen in pairs.items():
            sub = self.subscriptions[sub_id]
            first = before.get(sub_id, 0) + 1
            if sub.number >= first:
                sub.segments.append(Segment(first, sub.number, source, frozenset(seen)))

    def deliver_device_events(
        self, events: Sequence[DeviceEvent], sources: Sequence[Source | None] = ()
    ) -> int:
        """Fan device events out like readings: to every subscription that wants the
        patient and may see at least one of the metrics it asked for (the event names no
        metric: it concerns every reading of the device). Audited per subscription and
        patient with the readings' records, as device events."""
        n = 0
        now_us = int(self.clock() * 1e6)
        if self.subscriptions and self.consent.changes() != self._consent_seen:
            self.consent_changed()
        for k, ev in enumerate(events):
            source = sources[k] if k < len(sources) else None
            self.device_events_seen += 1
            recent = self.device_events.setdefault(
                ev.patient_id, deque(maxlen=RECENT_DEVICE_EVENTS)
            )
            if any(e.key == ev.key for e in recent):
                continue  # a replay of the topic: already delivered
            recent.append(ev)
            body = ev.compact()
            for sub in self.subscriptions.values():
                if not sub.wants_patient(ev.patient_id):
                    continue
                if not self.may_see_patient(sub, ev.patient_id, now_us):
                    self.refused += 1
                    continue
                sub.number += 1
                sub.held.append(Event(sub.number, ev.patient_id, "", body))
                if source is not None:  # one record, one event
                    pair = frozenset({(ev.patient_id, "")})
                    sub.segments.append(Segment(sub.number, sub.number, source, pair))
                key = (sub.id, ev.patient_id, "device events")
                self._unaudited[key] = self._unaudited.get(key, 0) + 1
                sub.wake.set()
                n += 1
        self.delivered += n
        return n

    def may_see_patient(self, sub: Subscription, patient_id: str, now_us: int) -> bool:
        """Whether any metric the subscription asked for of this patient is allowed now
        (the consent check of a device event)."""
        return any(
            self.allowed(sub.principal, patient_id, m, now_us) for m in sub.metrics or ALL_METRICS
        )

    def may_send(self, sub: Subscription, event: Event, now_us: int) -> bool:
        """The check at sending time, for a reading or a device event."""
        if event.is_reading:
            return self.allowed(sub.principal, event.patient_id, event.metric, now_us)
        return self.may_see_patient(sub, event.patient_id, now_us)

    def recent_device_events(
        self, patient_id: str, start_us: int | None, end_us: int | None
    ) -> list[DeviceEvent]:
        """What is held of a patient's device events in [start, end) (device time)."""
        return [
            e
            for e in self.device_events.get(patient_id, ())
            if (start_us is None or e.device_time_us >= start_us)
            and (end_us is None or e.device_time_us < end_us)
        ]

    def _remember_latest(self, batch: SampleBatch) -> None:
        """The newest reading per metric of the batch's patient (from the batch's end: one
        look per metric, not per reading)."""
        latest = self.latest.setdefault(batch.patient_id or "", {})
        metrics, times = batch.metric, batch.device_time_us
        left = set(metrics)
        for i in range(len(metrics) - 1, -1, -1):
            metric = metrics[i]
            if metric not in left:
                continue
            left.discard(metric)
            seen = latest.get(metric)
            if seen is None or seen["t_us"] <= times[i]:
                latest[metric] = compact(batch, i)
            if not left:
                break

    def forget(self, patient_id: str) -> None:
        """Drop what is held of an erased patient (the newest readings; subscriptions end
        with their consent)."""
        self.latest.pop(patient_id, None)
        self.device_events.pop(patient_id, None)

    def _targets_of(self, patient: str) -> _Targets:
        now_us = int(self.clock() * 1e6)
        out = _Targets()
        for sub in self.subscriptions.values():
            if sub.patients is not None and patient not in sub.patients:
                continue
            for metric in sub.metrics or ALL_METRICS:
                if self.allowed(sub.principal, patient, metric, now_us):
                    out.to.setdefault(metric, []).append(sub)
                else:
                    out.denied[metric] = out.denied.get(metric, 0) + 1
        return out

    def flush_audit(self) -> None:
        """One audit record per subscription and patient for what was delivered since, all
        in one transaction (one fsync: this runs on the event loop, beside the streams)."""
        if not self._unaudited:
            return
        pending, self._unaudited = self._unaudited, {}
        entries = []
        for (sub_id, patient, what), count in pending.items():
            sub = self.subscriptions.get(sub_id)
            who = sub.principal if sub else None
            entries.append(
                AuditEntry(
                    actor=who.subject if who else "unknown",
                    role=who.role.value if who else "system",
                    patient_id=patient,
                    action=AuditAction.STREAM,
                    what=f"subscription {sub_id}: {what}",
                    purpose=None,
                    outcome=Outcome.ALLOWED,
                    reason="consented" if who and who.role is Role.CLINICIAN else "own data",
                    count=count,
                )
            )
        self.audit.append_many(entries)

    def _audit_refusal(self, sub: Subscription, reason: str) -> None:
        self.audit.append(
            actor=sub.principal.subject,
            role=sub.principal.role.value,
            patient_id=next(iter(sub.patients)) if sub.patients else None,
            action=AuditAction.STREAM,
            what=f"subscription {sub.id}",
            purpose=None,
            outcome=Outcome.REFUSED,
            reason=reason,
        )

    def _expire_idle(self) -> None:
        now = self.clock()
        for sub in list(self.subscriptions.values()):
            if sub.connections == 0 and now - sub.idle_since > IDLE_EXPIRY_S:
                self.drop(sub, "no connection for 5 minutes")


def compact(batch: SampleBatch, i: int) -> dict[str, Any]:
    """The chart-friendly form of one reading (what the dashboard draws); shared by every
    subscription it goes to, each of which gives it its own number (``n``) when sent."""
    value = batch.value[i]
    quality = batch.quality[i]
    return {
        "patient": batch.patient_id,
        "device": batch.device_id,
        "metric": batch.metric[i],
        "unit": batch.unit[i],
        "t_us": batch.device_time_us[i],
        "received_us": batch.receive_time_us,
        "seq": batch.seq[i],
        "value": None if math.isnan(value) else value,
        "quality": quality,
        "flags": list(flag_names(quality)),
        "reading_id": batch.reading_id[i] if batch.reading_id else None,
    }


def _names(values: frozenset[str] | None) -> str:
    return "all" if values is None else ",".join(sorted(values))
