"""Live vitals through the clinician service on the real Kafka: `vitalproof serve` reads
vitals.clean with its own consumer group and fans each reading out to the subscribers whose
consent covers it.

Two clinicians with different grants subscribe (one over SSE, one over WebSocket); each gets
exactly the readings their consent covers, checked reading id by reading id against what was
produced; the SSE one disconnects, more readings arrive, and it resumes with Last-Event-ID and
gets exactly the missed events (contiguous numbers, no duplicate); `$events` returns the held
ones; a revocation closes the WebSocket with the reason."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

from clinic.auth import DevIssuer
from clinic.consent import ALL_VITALS
from clinic.consent_store import ConsentStore
from clinic.service.context import clinic_dir
from streams import lake
from streams.lake.keystore import LocalKeystore
from streams.seal_process import decode_records
from streams.sealer import Sealer
from tests.test_clinic_service import serving
from vitalproof.schema import SampleBatch, Transport
from vitalproof.settings import Settings
from vitalproof.wire import clean

pytestmark = pytest.mark.integration

DR_A, DR_B = "Practitioner/dr-a", "Practitioner/dr-b"
SCOPES = ["user/Observation.rs"]


@dataclass
class Live:
    url: str
    settings: Settings
    issuer: DevIssuer

    def headers(self, sub: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.issuer.issue(sub, 'clinician', SCOPES)}"}

    def subscribe(self, sub: str, body: dict[str, Any]) -> str:
        r = httpx.post(self.url + "/fhir/Subscription", json=body, headers=self.headers(sub))
        assert r.status_code == 201, r.text
        return str(r.json()["id"])


@pytest.fixture
def live(kafka_topics: Settings, tmp_path: Path) -> Iterator[Live]:
    settings = kafka_topics
    issuer = DevIssuer(clinic_dir(settings))
    env = os.environ | settings.child_env(tmp_path / "secrets")
    # Up, and the fan-out has its partitions (it starts at the topic's end).
    with serving(env, tmp_path / "serve.log", _fanout_ready) as url:
        yield Live(url, settings, issuer)


def _fanout_ready(url: str) -> bool:
    return bool(httpx.get(url + "/status", timeout=2).json()["fanout"] == "ready")


def bundle(patient: str, device: str, seq0: int, n: int, t0: int) -> SampleBatch:
    b = SampleBatch(
        device_id=device,
        patient_id=patient,
        gateway_id="gw",
        transport=Transport.MQTT,
        receive_time_us=t0,
    )
    for i in range(n):
        b.add("heart_rate", "/min", t0 + i * 1_000_000, seq0 + 2 * i, float(60 + i % 7))
        b.add("spo2", "%", t0 + i * 1_000_000, seq0 + 2 * i + 1, float(96 + i % 3))
    b.fill_reading_ids()
    return b


async def produce(settings: Settings, batches: list[SampleBatch]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap, acks="all")
    await producer.start()
    try:
        for b in batches:
            await producer.send_and_wait(
                settings.kafka.topic_clean,
                clean.encode_bundle([b]),
                key=(b.patient_id or "").encode(),
            )
    finally:
        await producer.stop()


def expected(batches: list[SampleBatch], patients: set[str], metrics: set[str]) -> set[str]:
    return {
        rid
        for b in batches
        if b.patient_id in patients
        for rid, m in zip(b.reading_id, b.metric, strict=True)
        if m in metrics
    }


async def sse_events(
    client: httpx.AsyncClient, url: str, headers: dict[str, str]
) -> AsyncIterator[tuple[str, str | None, dict[str, Any]]]:
    """(event, id, data) of an SSE stream."""
    async with client.stream("GET", url, headers=headers, timeout=30) as r:
        assert r.status_code == 200, await r.aread()
        event, ident, data = "message", None, ""
        async for line in r.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("id:"):
                ident = line[3:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
            elif not line and data:
                yield event, ident, json.loads(data)
                event, ident, data = "message", None, ""


def readings_of(notification: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in notification["entry"][1:]]


def test_two_clinicians_get_exactly_their_consented_readings_and_resume_without_gaps(
    live: Live,
) -> None:
    t0 = int(time.time() * 1e6)
    with ConsentStore(live.settings.paths.consent_path) as store:
        store.grant(
            patient_id="pt-1", grantee=DR_A, metrics=frozenset({"heart_rate"}),
            purpose="TREAT", actor="Patient/pt-1",
        )  # fmt: skip
        for p in ("pt-1", "pt-2"):
            store.grant(
                patient_id=p, grantee=DR_B, metrics=frozenset({ALL_VITALS}),
                purpose="TREAT", actor=f"Patient/{p}",
            )  # fmt: skip
    # dr-a asks for every patient who consented to them; dr-b names both patients.
    sub_a = live.subscribe(DR_A, {"patients": None, "metrics": None})
    sub_b = live.subscribe(DR_B, {"patients": ["pt-1", "pt-2"], "metrics": None})
    first = [bundle(p, f"dev-{p}", 0, 20, t0) for p in ("pt-1", "pt-2", "pt-3")]
    second = [bundle(p, f"dev-{p}", 1000, 10, t0 + 60_000_000) for p in ("pt-1", "pt-2", "pt-3")]

    async def go() -> dict[str, Any]:
        got: dict[str, Any] = {"a": [], "b": [], "a_numbers": [], "b_close": None}
        want_a1 = expected(first, {"pt-1"}, {"heart_rate"})
        want_b = expected(first + second, {"pt-1", "pt-2"}, {"heart_rate", "spo2"})
        ws_url = live.url.replace("http", "ws") + f"/stream/ws/{sub_b}"
        token_b = live.headers(DR_B)["Authorization"].split()[1]

        async def watch_b() -> None:
            async with websockets.connect(f"{ws_url}?access_token={token_b}") as ws:
                try:
                    async for text in ws:
                        msg = json.loads(text)
                        got["b"].extend(r["reading_id"] for r in readings_of(msg))
                except websockets.ConnectionClosed:
                    pass
                got["b_close"] = (ws.close_code, ws.close_reason, time.monotonic())

        b_task = asyncio.create_task(watch_b())
        async with httpx.AsyncClient() as client:
            sse_url = live.url + f"/stream/sse/{sub_a}?heartbeat=1"
            await asyncio.sleep(0.5)
            await produce(live.settings, first)
            last_id = None
            async for event, ident, data in sse_events(client, sse_url, live.headers(DR_A)):
                if event == "event-notification":
                    last_id = ident
                    for r in readings_of(data):
                        got["a"].append(r["reading_id"])
                        got["a_numbers"].append(r["n"])
                if set(got["a"]) >= want_a1:
                    break  # disconnect: what follows arrives while nobody listens
            await produce(live.settings, second)
            await asyncio.sleep(1.0)
            headers = live.headers(DR_A) | {"Last-Event-ID": str(last_id)}
            want_a = expected(first + second, {"pt-1"}, {"heart_rate"})
            async for event, _ident, data in sse_events(client, sse_url, headers):
                if event == "event-notification":
                    for r in readings_of(data):
                        got["a"].append(r["reading_id"])
                        got["a_numbers"].append(r["n"])
                if set(got["a"]) >= want_a:
                    break
            held = await client.get(
                live.url + f"/fhir/Subscription/{sub_a}/$events",
                params={"eventsSinceNumber": 0},
                headers=live.headers(DR_A),
            )
            got["held"] = [r["reading_id"] for r in readings_of(held.json())]
            as_fhir = await client.get(
                live.url + f"/fhir/Subscription/{sub_a}/$events",
                params={"eventsSinceNumber": 0, "format": "fhir"},
                headers=live.headers(DR_A),
            )
            got["fhir"] = readings_of(as_fhir.json())
        for _ in range(100):
            if set(got["b"]) >= want_b:
                break
            await asyncio.sleep(0.1)
        # Revoke pt-1 and pt-2 for dr-b: the stream is cut, with the reason.
        with ConsentStore(live.settings.paths.consent_path) as store:
            for g in store.grants(grantee=DR_B):
                store.revoke(g.grant_id, actor=f"Patient/{g.patient_id}")
        got["revoked_at"] = time.monotonic()
        await asyncio.wait_for(b_task, 10)
        return got

    got = asyncio.run(go())
    want_a = expected(first + second, {"pt-1"}, {"heart_rate"})
    assert sorted(got["a"]) == sorted(want_a)  # exactly, once each: no gap, no duplicate
    assert got["a_numbers"] == list(range(1, len(want_a) + 1))
    assert sorted(got["held"]) == sorted(want_a)
    from fhir.resources.R4B.observation import Observation

    assert len(got["fhir"]) == len(want_a)
    for obs in got["fhir"]:
        Observation.model_validate(obs)
        assert obs["code"]["coding"][0]["code"] == "8867-4"
    assert {o["identifier"][0]["value"] for o in got["fhir"]} == want_a
    assert sorted(got["b"]) == sorted(
        expected(first + second, {"pt-1", "pt-2"}, {"heart_rate", "spo2"})
    )
    code, reason, closed_at = got["b_close"]
    assert code == 4403 and "consent ended" in reason and "revoked" in reason
    assert closed_at - got["revoked_at"] < 2.0  # the target is 1 s: bench/clinic_bench.py


def test_an_r5_subscription_over_websocket_gets_handshake_paged_full_resources_and_ends(
    live: Live,
) -> None:
    """An R5 Subscription (topic, filterBy patient and LOINC code, websocket, full-resource,
    maxCount 25, heartbeatPeriod 1) through the real service: created as an R5 resource, read
    back, listed; the connection gets a handshake, then notifications of at most 25 events
    that validate as R5 Bundles, numbered 1, 2, 3, ... with Observation foci of exactly the
    consented readings, then heartbeats; ``$status`` counts them; ``$events`` with
    ``content=id-only`` gives the foci without resources; DELETE ends the stream with the
    reason and the subscription is gone."""
    from fhir.resources.bundle import Bundle
    from fhir.resources.subscription import Subscription as R5Subscription

    with ConsentStore(live.settings.paths.consent_path) as store:
        store.grant(
            patient_id="pt-1", grantee=DR_A, metrics=frozenset({ALL_VITALS}),
            purpose="TREAT", actor="Patient/pt-1",
        )  # fmt: skip
    headers = live.headers(DR_A)
    body = {
        "resourceType": "Subscription",
        "status": "requested",
        "topic": "urn:vitalproof:SubscriptionTopic:vital-signs",
        "filterBy": [
            {"resourceType": "Observation", "filterParameter": "patient", "value": "Patient/pt-1"},
            {"filterParameter": "code", "value": "http://loinc.org|8867-4"},
        ],
        "channelType": {
            "system": "http://terminology.hl7.org/CodeSystem/subscription-channel-type",
            "code": "websocket",
        },
        "content": "full-resource",
        "heartbeatPeriod": 1,
        "maxCount": 25,
    }
    topic = httpx.get(live.url + "/fhir/SubscriptionTopic/vital-signs")
    assert topic.status_code == 200 and topic.json()["url"] == body["topic"]
    bad = httpx.post(live.url + "/fhir/Subscription", json=body | {"maxCount": 0}, headers=headers)
    assert bad.status_code == 422
    assert bad.json()["issue"][0]["diagnostics"].startswith("Subscription.maxCount")
    r = httpx.post(live.url + "/fhir/Subscription", json=body, headers=headers)
    assert r.status_code == 201, r.text
    created = r.json()
    R5Subscription.model_validate(created)
    sub = created["id"]
    assert r.headers["location"].endswith(f"/fhir/Subscription/{sub}")
    assert created["status"] == "active" and created["maxCount"] == 25
    assert httpx.get(r.headers["location"], headers=headers).json() == created
    listed = httpx.get(live.url + "/fhir/Subscription", headers=headers).json()
    assert [e["resource"]["id"] for e in listed["entry"]] == [sub]
    t0 = int(time.time() * 1e6)
    batches = [bundle(p, f"dev-{p}", 0, 60, t0) for p in ("pt-1", "pt-2")]
    want = [
        rid
        for rid, m in zip(batches[0].reading_id, batches[0].metric, strict=True)
        if m == "heart_rate"
    ]
    token = headers["Authorization"].split()[1]

    async def go() -> dict[str, Any]:
        got: dict[str, Any] = {"kinds": [], "numbers": [], "foci": [], "bundles": []}
        async with websockets.connect(f"{created['endpoint']}?access_token={token}") as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 5))
            got["kinds"].append(first["entry"][0]["resource"]["type"])
            await produce(live.settings, batches)
            while len(got["numbers"]) < len(want) or "heartbeat" not in got["kinds"][1:]:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                status = msg["entry"][0]["resource"]
                got["kinds"].append(status["type"])
                if status["type"] == "event-notification":
                    got["bundles"].append(msg)
                    events = status["notificationEvent"]
                    got["numbers"].extend(int(e["eventNumber"]) for e in events)
                    got["foci"].extend(e["focus"]["reference"] for e in events)
            async with httpx.AsyncClient(base_url=live.url, headers=headers) as client:
                status_r = await client.get(f"/fhir/Subscription/{sub}/$status")
                got["status"] = status_r.json()
                ids_r = await client.get(
                    f"/fhir/Subscription/{sub}/$events",
                    params={"eventsSinceNumber": 0, "content": "id-only"},
                )
                got["ids_only"] = ids_r.json()
                deleted = await client.delete(f"/fhir/Subscription/{sub}")
            assert deleted.status_code == 200, deleted.text
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
            except websockets.ConnectionClosed:
                pass
            got["close"] = (ws.close_code, ws.close_reason)
        return got

    got = asyncio.run(go())
    assert got["kinds"][0] == "handshake"
    assert got["numbers"] == list(range(1, len(want) + 1))
    assert got["foci"] == [f"Observation/{rid}" for rid in want]
    assert len(got["bundles"]) >= 3  # 60 events, at most 25 a notification
    for msg in got["bundles"]:
        Bundle.model_validate(msg)
        assert len(msg["entry"]) - 1 == len(msg["entry"][0]["resource"]["notificationEvent"])
        assert len(msg["entry"]) - 1 <= 25
        for entry in msg["entry"][1:]:
            assert entry["resource"]["resourceType"] == "Observation"
            assert entry["resource"]["subject"]["reference"] == "Patient/pt-1"
    (status,) = [e["resource"] for e in got["status"]["entry"]]
    assert status["type"] == "query-status"
    assert status["eventsSinceSubscriptionStart"] == str(len(want))
    ids_only = got["ids_only"]
    assert len(ids_only["entry"]) == 1  # the status alone: no resources
    foci = [e["focus"]["reference"] for e in ids_only["entry"][0]["resource"]["notificationEvent"]]
    assert foci == [f"Observation/{rid}" for rid in want]
    assert got["close"] == (4403, "deleted by its subscriber")
    gone = httpx.get(live.url + f"/fhir/Subscription/{sub}", headers=headers)
    assert gone.status_code == 404 and gone.json()["resourceType"] == "OperationOutcome"


def test_events_no_longer_held_come_back_from_kafka_then_the_lake_and_what_neither_has_is_named(
    live: Live,
) -> None:
    """12,000 events for one subscription (pt-1's heart rate: its SpO2 is not shared, and
    pt-2's readings go by too), of which the service holds the last 10,000: a client asking
    from event 0 gets 1..10,000 (the first 2,000 read back from Kafka by offset, numbered as
    they were delivered), then the rest; an SSE reconnect from event 500 gets 501..12,000
    contiguous, each reading once. Then the records are sealed into the lake by the real
    sealer, all but pt-1's first, and Kafka deletes them all (retention): asked again, the
    events come back from the lake, numbered and shaped exactly as delivered, over `$events`
    and over SSE; the events of the record the lake lacks are a 410 naming them, the
    partition, the offsets and the time."""
    with ConsentStore(live.settings.paths.consent_path) as store:
        store.grant(
            patient_id="pt-1", grantee=DR_A, metrics=frozenset({"heart_rate"}),
            purpose="TREAT", actor="Patient/pt-1",
        )  # fmt: skip
    sub = live.subscribe(DR_A, {"patients": None, "metrics": None})
    t0 = int(time.time() * 1e6) - 3_600_000_000
    batches = []
    for k in range(20):
        batches.append(bundle("pt-1", "dev-1", 1200 * k, 600, t0 + k * 600_000_000))
        if k % 4 == 0:
            batches.append(bundle("pt-2", "dev-2", 1200 * k, 600, t0 + k * 600_000_000))
    want = [
        rid
        for b in batches
        if b.patient_id == "pt-1"
        for rid, m in zip(b.reading_id, b.metric, strict=True)
        if m == "heart_rate"
    ]
    assert len(want) == 12_000
    events_url = live.url + f"/fhir/Subscription/{sub}/$events"
    headers = live.headers(DR_A)

    def bodies(params: dict[str, Any]) -> list[dict[str, Any]]:
        r = httpx.get(events_url, params=params, headers=headers, timeout=60)
        assert r.status_code == 200, r.text[:500]
        return readings_of(r.json())

    def numbered(params: dict[str, Any]) -> tuple[list[int], list[str]]:
        got = bodies(params)
        return [e["n"] for e in got], [e["reading_id"] for e in got]

    async def sse_from(since: int) -> tuple[list[int], list[str], str | None]:
        numbers: list[int] = []
        ids: list[str] = []
        closed = None
        async with httpx.AsyncClient() as client:
            sse_url = live.url + f"/stream/sse/{sub}?heartbeat=1"
            resume = headers | {"Last-Event-ID": str(since)}
            async for event, _ident, data in sse_events(client, sse_url, resume):
                if event == "event-notification":
                    for r in readings_of(data):
                        numbers.append(r["n"])
                        ids.append(r["reading_id"])
                if event == "closed":
                    closed = data["reason"]
                if (numbers and numbers[-1] >= 12_000) or event == "closed":
                    break
        return numbers, ids, closed

    async def go() -> dict[str, Any]:
        # pt-1's first record alone first, so that its events (the ones the lake will lack)
        # are one fan-out poll of their own: the 410 then names just those 600.
        await produce(live.settings, batches[:1])
        await asyncio.sleep(0.5)
        await produce(live.settings, batches[1:])
        for _ in range(200):
            if numbered({"eventsSinceNumber": 11_999})[0] == [12_000]:
                break
            await asyncio.sleep(0.1)
        out: dict[str, Any] = {"delivered": bodies({"eventsSinceNumber": 0})}
        out["rest"] = numbered({"eventsSinceNumber": 10_000})
        out["sse"] = (await sse_from(500))[:2]
        topic = live.settings.kafka.topic_clean
        parts = [TopicPartition(topic, p) for p in range(live.settings.kafka.partitions)]
        consumer = AIOKafkaConsumer(
            bootstrap_servers=live.settings.kafka.bootstrap, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            ends = await consumer.end_offsets(parts)
            out["unsealed"] = await _seal_all_but_first(live.settings, consumer, ends, b"pt-1")
        finally:
            await consumer.stop()
        # Retention, as Kafka applies it: the records before the end are deleted.
        admin = AIOKafkaAdminClient(bootstrap_servers=live.settings.kafka.bootstrap)
        await admin.start()
        try:
            low = await admin.delete_records({tp: RecordsToDelete(ends[tp]) for tp in parts})
            assert sum(low.values()) >= 10, low  # every record produced is gone
        finally:
            await admin.close()
        return out

    got = asyncio.run(go())
    delivered = got["delivered"]
    assert [e["n"] for e in delivered] == list(range(1, 10_001))
    assert [e["reading_id"] for e in delivered] == want[:10_000]
    assert got["rest"] == (list(range(10_001, 12_001)), want[10_000:])
    assert got["sse"] == (list(range(501, 12_001)), want[500:])
    assert got["unsealed"] == 1
    # The events of pt-1's first record (and of any record fanned out in the same poll) are
    # in neither: named, never skipped.
    gone = httpx.get(events_url, params={"eventsSinceNumber": 0}, headers=headers, timeout=60)
    assert gone.status_code == 410, gone.text[:300]
    why = gone.json()["issue"][0]["diagnostics"]
    m = re.search(rf"events 1\.\.(\d+) of subscription {sub} came from (\S+) partition", why)
    assert m is not None, why
    lost = int(m.group(1))
    assert 600 <= lost < 2_000 and lost % 600 == 0, why  # whole records of 600 events
    assert m.group(2) == live.settings.kafka.topic_clean
    assert "which Kafka no longer holds below offset" in why, why
    assert f"Kafka and the lake give back {lost - 600} of them" in why, why  # all but one
    assert "search Observation history from" in why, why
    # The rest of what is no longer held comes back from the lake, exactly as delivered.
    again = bodies({"eventsSinceNumber": lost})
    assert [e["n"] for e in again] == list(range(lost + 1, lost + 10_001))
    assert again[: 10_000 - lost] == delivered[lost:]
    assert [e["reading_id"] for e in again] == want[lost : lost + 10_000]
    numbers, ids, closed = asyncio.run(sse_from(lost))
    assert closed is None
    assert (numbers, ids) == (list(range(lost + 1, 12_001)), want[lost:])
    refused = asyncio.run(sse_from(0))
    assert refused[:2] == ([], []) and refused[2] is not None and "events 1.." in refused[2]
    held = httpx.get(events_url, params={"eventsSinceNumber": 2000}, headers=headers)
    assert held.status_code == 200 and len(readings_of(held.json())) == 10_000  # still held


async def _seal_all_but_first(
    settings: Settings,
    consumer: AIOKafkaConsumer,
    ends: dict[TopicPartition, int],
    key: bytes,
) -> int:
    """Seal every record of vitals.clean into the service's lake with the real sealer, a few
    records a batch, except the first record of ``key`` (the lake will not have it); returns
    how many were left out."""
    records = []
    consumer.assign(list(ends))
    await consumer.seek_to_beginning()
    for _ in range(100):
        if all([await consumer.position(tp) >= end for tp, end in ends.items()]):
            break
        got = await consumer.getmany(timeout_ms=1_000)
        for batch in got.values():
            records.extend(batch)
    assert len(records) == sum(ends.values())
    left_out = 0
    kept = []
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        if r.key == key and not left_out:
            left_out += 1
            continue
        kept.append((r.topic, r.partition, r.offset, r.value or b""))
    sealer = Sealer(lake.open_lake(settings), LocalKeystore(settings.paths.keys_dir))
    for i in range(0, len(kept), 4):
        items, rejected = decode_records(kept[i : i + 4])
        assert not rejected
        assert sealer.seal(items) is not None
    return left_out
