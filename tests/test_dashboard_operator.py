"""The operator's view on the real pipeline: `vitalproof serve` against the session's Kafka
while the real Faust worker normalizes, rejects and seals, and the anchor job anchors on the
embedded chain. /metrics (parsed by prometheus-client's own parser) must say what Kafka, the
lake and the anchor log say: records written per topic, readings and batches sealed, each
consumer group's lag (a stopped worker lags by exactly what was produced since), DLQ records
by stage and reason (two reasons, through normalize's real rejections), the anchor's tx and
block, the live subscriptions. /api/health refuses other roles with the reason; the operator
page in chromium shows the same numbers, passes axe, and says so when Kafka is unreachable.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from playwright.sync_api import Page, expect
from prometheus_client.parser import text_string_to_metric_families

from anchor.chain import AnchorReceipt
from anchor.job import AnchorJob
from clinic.auth import DevIssuer
from clinic.service.context import clinic_dir
from tests.test_clinic_service import serving
from tests.web import check_accessibility, screenshot, sign_in
from vitalproof.cli import processes
from vitalproof.devstack.procs import free_ports
from vitalproof.raw import RawRecord
from vitalproof.registry import Registry
from vitalproof.schema import CONTENT_TYPE_JSON, Transport
from vitalproof.settings import PathSettings, Settings

pytestmark = [pytest.mark.integration, pytest.mark.browser]

DEVICES = {"dev-op-0": "pat-op-0", "dev-op-1": "pat-op-1"}
SAMPLES = 5  # per raw record
OPERATOR = ("Organization/ops", "operator", "system/*.rs")

T = TypeVar("T")
Metrics = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Metrics:
    r = httpx.get(url + "/metrics", timeout=5)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.get((name, frozenset(labels.items())))


def wait_for(what: str, check: Callable[[], object], within_s: float = 90.0) -> None:
    """Until ``check()`` is true (or, if it returns a list, empty: what still differs)."""
    deadline = time.monotonic() + within_s
    while True:
        got = check()
        if (not got) if isinstance(got, list) else got:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within_s:g} s: {what} (last: {got})", pytrace=False)
        time.sleep(0.5)


def raw_record(device: str, seq0: int, payload: bytes | None = None) -> RawRecord:
    now = int(time.time() * 1e6)
    doc = {
        "schema": 1,
        "series": [
            {
                "metric": "heart_rate",
                "unit": "/min",
                "t": [now - (SAMPLES - i) * 1_000_000 for i in range(SAMPLES)],
                "seq": [seq0 + i for i in range(SAMPLES)],
                "v": [62 + i for i in range(SAMPLES)],
            }
        ],
    }
    body = json.dumps(doc).encode() if payload is None else payload
    return RawRecord(
        device, body, CONTENT_TYPE_JSON, Transport.MQTT, "gw-op", now, f"devices/{device}/vitals"
    )


def off_loop(fn: Callable[[], T]) -> T:
    """``fn()`` in a thread of its own: Playwright's sync API keeps an event loop running in
    this one, so asyncio.run (ours, aiokafka's, the anchor job's) must run elsewhere."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def produce(settings: Settings, records: list[RawRecord]) -> None:
    async def go() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap, acks="all")
        await producer.start()
        try:
            for r in records:
                await producer.send_and_wait(
                    settings.kafka.topic_raw,
                    r.payload,
                    key=r.device_id.encode(),
                    headers=r.headers(),
                )
        finally:
            await producer.stop()

    off_loop(lambda: asyncio.run(go()))


def records_in(settings: Settings, topic: str) -> int:
    """What Kafka itself says was written to ``topic`` (the sum of its end offsets)."""

    async def go() -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap)
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap, group_id=None)
        await admin.start()
        await consumer.start()
        try:
            (described,) = await admin.describe_topics([topic])  # it exists (kafka_topics)
            tps = [TopicPartition(topic, p["partition"]) for p in described["partitions"]]
            return sum((await consumer.end_offsets(tps)).values())
        finally:
            await consumer.stop()
            await admin.close()

    return off_loop(lambda: asyncio.run(go()))


def manifests(settings: Settings) -> list[dict[str, Any]]:
    folder = settings.lake_dir / "_batches"
    return [json.loads(p.read_bytes()) for p in sorted(folder.glob("*.json"))]


@dataclass
class Pipeline:
    url: str
    settings: Settings
    issuer: DevIssuer
    receipt: AnchorReceipt
    sealed_readings: int
    batches: int
    produced_while_stopped: int

    def token(self, subject: str, role: str, scopes: str, patient: str | None = None) -> str:
        return self.issuer.issue(subject, role, scopes, patient=patient)

    def get(self, path: str, token: str | None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(self.url + path, headers=headers, timeout=5)


def _kafka_up(url: str) -> bool:
    return value(scrape(url), "vitalproof_kafka_up") == 1


@pytest.fixture
def pipeline(kafka_topics: Settings, tmp_path: Path) -> Iterator[Pipeline]:
    settings = kafka_topics.evolve(batching={"max_age_s": 1.0})
    registry = Registry(settings.paths.registry_path)
    for device, patient in DEVICES.items():
        registry.enroll(device, patient)
    issuer = DevIssuer(clinic_dir(settings))
    env = os.environ | settings.child_env(tmp_path / "secrets")
    with serving(env, tmp_path / "serve.log", _kafka_up) as url:
        worker = processes.start(settings, "worker", log=tmp_path / "worker.log")
        try:
            good = [raw_record(d, 100 * n) for n in range(6) for d in DEVICES]
            ghosts = [raw_record("ghost-op-7", 0), raw_record("ghost-op-8", 0)]
            broken = [raw_record("dev-op-0", 9_000, payload=b"{heart_rate: 71") for _ in range(3)]
            produce(settings, good + ghosts + broken)
            readings = len(good) * SAMPLES
            wait_for(
                f"{readings} readings sealed",
                lambda: sum(m["rows"] for m in manifests(settings)) == readings,
            )
            wait_for(
                "5 DLQ records",
                lambda: [n for n in [records_in(settings, settings.kafka.topic_dlq)] if n != 5],
            )
            job = AnchorJob.from_settings(settings)  # the embedded chain
            try:
                off_loop(job.poll_manifests)
                receipt = job.anchor_once()
                assert receipt is not None
            finally:
                job.close()

            def worker_caught_up() -> bool:
                m = scrape(url)
                return all(
                    value(m, "vitalproof_consumer_lag_records", **lag) == 0
                    for lag in _lags(settings, "normalize", "seal")
                )

            wait_for("the worker committed everything", worker_caught_up)
        finally:
            processes.stop(worker)
        later = [raw_record("dev-op-1", 10_000 + 100 * n) for n in range(3)]
        produce(settings, later)  # nobody normalizes these: the worker is stopped
        yield Pipeline(
            url, settings, issuer, receipt, readings, len(manifests(settings)), len(later)
        )


def _lags(settings: Settings, *names: str) -> list[dict[str, str]]:
    k = settings.kafka
    table = {
        "normalize": (f"vitalproof-{settings.namespace}", k.topic_raw),
        "seal": (f"vitalproof-{settings.namespace}", k.topic_clean),
        "anchor": (f"vitalproof-anchor-{settings.namespace}", k.topic_batches),
        "fanout": (f"vitalproof-clinic-{settings.namespace}", k.topic_clean),
    }
    return [{"consumer": n, "group": table[n][0], "topic": table[n][1]} for n in names]


def test_metrics_and_the_operator_page_show_the_pipelines_real_figures(
    pipeline: Pipeline, page: Page, tmp_path: Path
) -> None:
    p, k = pipeline, pipeline.settings.kafka
    # A patient watching their own vitals live: one subscription.
    patient = p.token("Patient/pat-op-0", "patient", "patient/Observation.rs", "pat-op-0")
    r = httpx.post(
        p.url + "/fhir/Subscription",
        json={"patients": None, "metrics": None},
        headers={"Authorization": f"Bearer {patient}"},
    )
    assert r.status_code == 201, r.text

    raw_written = records_in(p.settings, k.topic_raw)
    clean_written = records_in(p.settings, k.topic_clean)
    assert raw_written == 12 + 5 + p.produced_while_stopped
    assert 1 <= clean_written <= 12  # normalize bundles several raw records into one
    receipt = p.receipt

    def expected(m: Metrics) -> list[str]:
        """What in the scrape differs from what Kafka, the lake and the log say."""
        want: list[tuple[str, dict[str, str], float]] = [
            ("vitalproof_kafka_up", {}, 1),
            ("vitalproof_topic_records_total", {"topic": k.topic_raw}, raw_written),
            ("vitalproof_topic_records_total", {"topic": k.topic_clean}, clean_written),
            ("vitalproof_topic_records_total", {"topic": k.topic_dlq}, 5),
            ("vitalproof_sealed_readings_total", {}, p.sealed_readings),
            ("vitalproof_sealed_batches_total", {}, p.batches),
            ("vitalproof_dlq_records_total",
             {"stage": "normalize", "reason": "unknown device …"}, 2),
            ("vitalproof_dlq_records_total",
             {"stage": "normalize", "reason": "invalid JSON: Expecting property name "
              "enclosed in double quotes at byte …"}, 3),
            ("vitalproof_dlq_records_uncounted", {}, 0),
            ("vitalproof_last_anchor_block", {}, receipt.block_number),
            ("vitalproof_last_anchor_tree_size", {}, receipt.tree_size),
            ("vitalproof_last_anchor_timestamp_seconds", {}, receipt.block_timestamp),
            ("vitalproof_last_anchor_info",
             {"tx_hash": receipt.tx_hash, "chain_id": str(receipt.chain_id)}, 1),
            ("vitalproof_anchors_total", {}, 1),
            ("vitalproof_live_subscriptions", {}, 1),
        ]  # fmt: skip
        (normalize, seal, anchor, fanout) = _lags(
            p.settings, "normalize", "seal", "anchor", "fanout"
        )
        lag = "vitalproof_consumer_lag_records"
        want += [(lag, normalize, p.produced_while_stopped), (lag, seal, 0), (lag, anchor, 0),
                 (lag, fanout, 0)]  # fmt: skip
        return [
            f"{name}{labels}: {value(m, name, **labels)} != {v}"
            for name, labels, v in want
            if value(m, name, **labels) != v
        ]

    wait_for("/metrics to agree", lambda: expected(scrape(p.url)), within_s=30)
    m = scrape(p.url)
    age = value(m, "vitalproof_last_anchor_age_seconds")
    assert age is not None and 0 <= age < 600
    # Nothing of a patient or a device in any label or value name.
    text = httpx.get(p.url + "/metrics").text
    for name in (*DEVICES, *DEVICES.values(), "ghost-op-7", "ghost-op-8"):
        assert name not in text

    # /api/health: operators only, with the reason; the same figures as /metrics.
    for who, role, scopes, pid in (
        ("Practitioner/dr-op", "clinician", "user/Observation.rs", None),
        ("Patient/pat-op-0", "patient", "patient/*.rs", "pat-op-0"),
    ):
        refused = p.get("/api/health", p.token(who, role, scopes, pid))
        assert refused.status_code == 403
        reason = refused.json()["issue"][0]["diagnostics"]
        assert reason == f"pipeline health is for operators; a {role} token may not read it"
        assert "records" not in refused.text
    assert p.get("/api/health", None).status_code == 401
    operator = p.token(*OPERATOR)
    h = p.get("/api/health", operator).json()
    assert h["kafka"]["up"] and h["topics"]["raw"]["records"] == raw_written
    assert h["sealed"]["readings"] == p.sealed_readings
    assert {(x["consumer"], x["records"]) for x in h["lag"]} == {
        ("normalize", 3), ("seal", 0), ("anchor", 0), ("fanout", 0)
    }  # fmt: skip
    assert h["anchor"]["tx_hash"] == receipt.tx_hash
    # The service measured the records going in and the readings being sealed while it ran,
    # and the rates fell back to 0 once everything stopped.
    history = h["history"]
    assert max(x or 0 for x in history["raw_in"]) > 0
    assert max(x or 0 for x in history["clean_in"]) > 0
    assert max(x or 0 for x in history["sealed_readings"]) > 0
    wait_for(
        "the rates to settle at 0",
        lambda: p.get("/api/health", operator).json()["topics"]["raw"]["per_s"] == 0,
        within_s=15,
    )

    # The page shows the same numbers.
    sign_in(page, p.url, operator, "/ui/operator.html")
    tid = page.get_by_test_id
    expect(tid("raw-records")).to_have_text(f"{raw_written:,}")
    expect(tid("clean-records")).to_have_text(f"{clean_written:,}")
    expect(tid("sealed-readings")).to_have_text(f"{p.sealed_readings:,}")
    expect(tid("sealed-batches")).to_have_text(f"{p.batches:,}")
    expect(tid("raw-rate")).to_have_text("0.0")
    expect(tid("dlq-records")).to_have_text("5")
    dlq = page.locator("#dlq tr")
    expect(dlq).to_have_count(2)
    expect(dlq.nth(0)).to_have_text(
        "normalizeinvalid JSON: Expecting property name enclosed in double quotes at byte …3"
    )
    expect(dlq.nth(1)).to_have_text("normalizeunknown device …2")
    expect(page.locator('#lag tr[data-consumer="normalize"] td').last).to_have_text("3")
    expect(page.locator('#lag tr[data-consumer="seal"] td').last).to_have_text("0")
    expect(tid("anchor-tx")).to_have_text(receipt.tx_hash)
    expect(tid("anchor-block")).to_have_text(f"{receipt.block_number:,}")
    expect(tid("anchor-age")).to_have_text(_any_age())
    expect(tid("subscriptions")).to_have_text("1")
    expect(page.locator("#chart canvas")).to_have_count(1)
    expect(page.get_by_role("alert")).to_have_count(0)
    check_accessibility(page)
    screenshot(page, "operator", tmp_path)


def _any_age() -> Any:
    import re

    return re.compile(r"^\d+ (s|min|h)$")


def test_the_operator_page_says_when_kafka_cannot_be_reached(page: Page, tmp_path: Path) -> None:
    (port,) = free_ports(1)  # nothing listens there
    home = tmp_path / "home"
    settings = Settings(paths=PathSettings(home=home))
    env = os.environ | {
        "VITALPROOF_HOME": str(home),
        "VITALPROOF_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
    }

    def refreshed_without_kafka(url: str) -> bool:
        m = scrape(url)
        return value(m, "vitalproof_kafka_up") == 0 and bool(
            value(m, "vitalproof_health_refresh_timestamp_seconds")
        )

    with serving(env, tmp_path / "serve.log", refreshed_without_kafka) as url:
        m = scrape(url)
        assert not [name for name, _ in m if name.startswith("vitalproof_topic_")]
        assert not [name for name, _ in m if name.startswith("vitalproof_consumer_lag")]
        operator = DevIssuer(clinic_dir(settings)).issue(*OPERATOR)
        sign_in(page, url, operator, "/ui/operator.html")
        alert = page.get_by_role("alert")
        expect(alert).to_contain_text(f"The service cannot reach Kafka at 127.0.0.1:{port}")
        expect(page.get_by_test_id("raw-records")).to_have_text("\u2013")
        expect(page.locator("#lag")).to_contain_text("Unknown: Kafka does not answer.")
        check_accessibility(page)
        screenshot(page, "operator-no-kafka", tmp_path)
