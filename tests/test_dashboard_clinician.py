"""The clinician's pages in a real chromium against `vitalproof serve` on the real Kafka, with
a ward of devices streaming clean readings in real time (heart rate and SpO2 at 1 Hz, motion
at 50 Hz), the worker's sequence events beside them (its own SequenceTracker, to
vitals.events, on request a hole or a restart), and an hour of sealed history in the lake.

What a clinician would check: their patients are listed with live values and a freshness
mark; a patient's charts receive points; a dropped connection comes back with no hole; older
history loads on demand with its gap drawn and its flagged value marked; revocation empties the
live chart within a second; without consent the page says so and break-glass opens access with
a countdown, and the patient's disclosure log shows it."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from playwright.sync_api import Browser, Page, expect

from clinic.audit import AuditLog
from clinic.auth import DevIssuer
from clinic.consent import ALL_VITALS
from clinic.consent_store import ConsentStore
from clinic.service.context import clinic_dir
from streams.lake.keystore import LocalKeystore
from streams.sealer import Pending, Sealer
from streams.sequence import SequenceEvent, SequenceTracker
from tests.test_clinic_service import serving
from tests.web import check_accessibility, screenshot, sign_in
from vitalproof.schema import Quality, SampleBatch, Transport
from vitalproof.settings import Settings
from vitalproof.wire import clean

DR_A, DR_B = "Practitioner/dr-a", "Practitioner/dr-b"
SCOPES = ["user/Observation.rs"]
S = 1_000_000


@dataclass
class Ward:
    """Devices of pt-1 and pt-2 streaming to vitals.clean until stopped."""

    settings: Settings
    sent: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (patient, metric)
    stop: threading.Event = field(default_factory=threading.Event)
    error: list[BaseException] = field(default_factory=list)
    # Faults on request: ticks of a patient's readings that never arrive (their sequence
    # numbers used up), and a device that restarts counting from 0.
    hole: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # sequence numbers lost
    restart: set[str] = field(default_factory=set)
    events: list[SequenceEvent] = field(default_factory=list)  # what the "worker" found

    def run(self) -> None:
        try:
            asyncio.run(self._produce())
        except BaseException as e:  # surfaced by the fixture
            self.error.append(e)

    async def _produce(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka.bootstrap, acks="all", linger_ms=5
        )
        await producer.start()
        seq = {"pt-1": 0, "pt-2": 0}
        tracker = SequenceTracker()  # the worker's gap and reset detection, as it runs it
        tick = 0
        try:
            while not self.stop.is_set():
                now = int(time.time() * S)
                for patient in ("pt-1", "pt-2"):
                    if patient in self.restart:
                        self.restart.discard(patient)
                        seq[patient] = 0
                    if self.hole.get(patient):
                        self.hole[patient] -= 1
                        lost = (2 if tick % 10 == 0 else 0) + 15
                        seq[patient] += lost
                        self.skipped[patient] = self.skipped.get(patient, 0) + lost
                        continue
                    b = SampleBatch(
                        device_id=f"watch-{patient}",
                        patient_id=patient,
                        gateway_id="gw",
                        transport=Transport.MQTT,
                        receive_time_us=now,
                    )
                    if tick % 10 == 0:  # 1 Hz vitals
                        b.add("heart_rate", "/min", now, seq[patient], 70.0 + tick % 5)
                        b.add("spo2", "%", now, seq[patient] + 1, 97.0)
                        seq[patient] += 2
                    for k in range(5):  # 50 Hz motion
                        t = now - (4 - k) * 20_000
                        for axis in ("accel_x", "accel_y", "accel_z"):
                            b.add(axis, "m/s2", t, seq[patient], 9.81 * (axis == "accel_z"))
                            seq[patient] += 1
                    b.fill_reading_ids()
                    for m, key in zip(b.metric, _keys(b), strict=True):
                        self.sent.setdefault((patient, m), set()).add(key)
                    for event in tracker.observe(b):  # to vitals.events first, as normalize
                        self.events.append(event)
                        await producer.send_and_wait(
                            self.settings.kafka.topic_events,
                            event.to_json(),
                            key=b.device_id.encode(),
                        )
                    await producer.send_and_wait(
                        self.settings.kafka.topic_clean,
                        clean.encode_bundle([b]),
                        key=patient.encode(),
                    )
                tick += 1
                await asyncio.sleep(0.1)
        finally:
            await producer.stop()


def _keys(b: SampleBatch) -> list[str]:
    """The chart's key of a reading: device, sequence number and time."""
    return [f"{b.device_id}:{s}:{t}" for s, t in zip(b.seq, b.device_time_us, strict=True)]


def seal_history(settings: Settings, now_us: int) -> int:
    """40 to 30 minutes ago: pt-1's heart rate at 1 Hz with a 2-minute hole and one
    implausible reading, sealed into the lake. Returns the readings sealed."""
    b = SampleBatch(
        device_id="watch-pt-1-old",
        patient_id="pt-1",
        gateway_id="gw",
        transport=Transport.MQTT,
        receive_time_us=now_us - 30 * 60 * S,
    )
    t0 = now_us - 40 * 60 * S
    n = 0
    for i in range(600):
        if 200 <= i < 320:  # the hole
            continue
        b.add("heart_rate", "/min", t0 + i * S, i, 250.0 if i == 400 else 65.0 + i % 4)
        if i == 400:
            b.quality[-1] = int(Quality.IMPLAUSIBLE)
        n += 1
    b.fill_reading_ids()
    sealer = Sealer(settings.lake_dir, LocalKeystore(settings.paths.keys_dir))
    assert sealer.seal([Pending(settings.kafka.topic_clean, 0, 0, b)]) is not None
    return n


@dataclass
class Site:
    url: str
    settings: Settings
    issuer: DevIssuer
    ward: Ward
    grants: dict[str, str]  # name -> grant id
    history: int

    def token(self, sub: str) -> str:
        return self.issuer.issue(sub, "clinician", SCOPES)

    def patient_token(self, patient: str) -> str:
        return self.issuer.issue(
            f"Patient/{patient}",
            "patient",
            ["patient/*.rs", "patient/Consent.cud"],
            patient=patient,
        )


@pytest.fixture
def site(kafka_topics: Settings, tmp_path: Path) -> Iterator[Site]:
    settings = kafka_topics
    history = seal_history(settings, int(time.time() * S))
    consent = ConsentStore(settings.paths.consent_path)
    a1 = consent.grant(
        patient_id="pt-1", grantee=DR_A, metrics=[ALL_VITALS], purpose="TREAT", actor="Patient/pt-1"
    )
    a2 = consent.grant(
        patient_id="pt-2",
        grantee=DR_A,
        metrics=["heart_rate"],
        purpose="TREAT",
        actor="Patient/pt-2",
    )
    consent.close()
    issuer = DevIssuer(clinic_dir(settings))
    env = os.environ | settings.child_env(tmp_path / "secrets")
    with serving(env, tmp_path / "serve.log", _fanout_ready) as url:
        ward = Ward(settings)
        thread = threading.Thread(target=ward.run, daemon=True)
        thread.start()
        try:
            yield Site(url, settings, issuer, ward, {"a1": a1.grant_id, "a2": a2.grant_id}, history)
        finally:
            ward.stop.set()
            thread.join(10)
        assert not ward.error, ward.error


def _fanout_ready(url: str) -> bool:
    return bool(httpx.get(url + "/status", timeout=2).json()["fanout"] == "ready")


def _points(page: Page, panel: str) -> int:
    return int(page.evaluate(f"window.vitalproofChart.panels.get('{panel}').points()"))


def _wait(page: Page, js: str, timeout_ms: int = 15_000) -> None:
    page.wait_for_function(js, timeout=timeout_ms)


def test_the_list_shows_my_patients_live_and_the_chart_survives_a_reconnect_and_loads_history(
    site: Site, page: Page, tmp_path: Path
) -> None:
    sign_in(page, site.url, site.token(DR_A), "/ui/clinician.html")
    rows = page.locator("#patients tr")
    expect(rows).to_have_count(2)
    hr = page.locator('tr[data-patient="pt-1"] td[data-metric="heart_rate"]')
    expect(hr).to_contain_text("/min", timeout=15_000)
    expect(page.locator('tr[data-patient="pt-1"] td[data-fresh="fresh"]')).to_be_visible()
    # pt-2 shares heart rate only: its SpO2 is never shown although its device sends it.
    expect(page.locator('tr[data-patient="pt-2"] td[data-metric="heart_rate"]')).to_contain_text(
        "/min", timeout=15_000
    )
    page.wait_for_timeout(1500)
    expect(page.locator('tr[data-patient="pt-2"] td[data-metric="spo2"]')).to_have_text("\u2013")
    check_accessibility(page)
    screenshot(page, "clinician-list", tmp_path)

    page.get_by_role("link", name="pt-1").click()
    expect(page.get_by_role("heading", name="Patient pt-1")).to_be_visible()
    _wait(page, "window.vitalproofChart.panels.get('motion')?.points() > 300")
    _wait(page, "window.vitalproofChart.panels.get('heart_rate')?.points() > 3")
    expect(page.locator("#feed-state")).to_have_text("live")

    # A dropped connection: the page fetches what it missed, then follows again; every
    # heart-rate and motion reading sent since it subscribed is drawn, none twice.
    first = page.evaluate("window.vitalproofChart.feed.last")
    page.evaluate("window.vitalproofChart.feed.drop()")
    page.wait_for_timeout(2500)
    expect(page.locator("#feed-state")).to_have_text("live")
    assert page.evaluate("window.vitalproofChart.feed.reconnects") >= 1
    assert page.evaluate("window.vitalproofChart.feed.last") > first
    for panel, metric in (("heart_rate", "heart_rate"), ("motion", "accel_x")):
        drawn = set(
            page.evaluate(
                f"[...window.vitalproofChart.panels.get('{panel}').series['{metric}'].keys]"
            )
        )
        sent = site.ward.sent[("pt-1", metric)]
        assert drawn <= sent | {k for k in drawn if k.startswith("watch-pt-1-old")}
        live_drawn = {k for k in drawn if k.startswith("watch-pt-1:")}
        newest = max(int(k.split(":")[1]) for k in live_drawn)
        oldest = min(int(k.split(":")[1]) for k in live_drawn)
        expected = {k for k in sent if oldest <= int(k.split(":")[1]) <= newest}
        assert expected == live_drawn, f"{metric}: {len(expected - live_drawn)} missing"

    # Older history from the lake, on demand: the hole is a gap, the flagged value a point.
    before = _points(page, "heart_rate")
    page.get_by_role("button", name="Last hour").click()
    _wait(page, f"window.vitalproofChart.panels.get('heart_rate').points() >= {before + 400}")
    assert _points(page, "heart_rate") >= before + site.history
    gaps = page.evaluate("window.vitalproofChart.panels.get('heart_rate').series.heart_rate.gaps()")
    assert gaps >= 1
    assert page.evaluate("window.vitalproofChart.panels.get('heart_rate').flagged()") == 1
    expect(page.locator('[data-count="heart_rate"]')).to_contain_text("1 flagged")
    check_accessibility(page)
    screenshot(page, "clinician-chart", tmp_path)


ZOOM_TO_LAST_40_S = """() => {
  const now = Date.now() / 1000;
  for (const p of window.vitalproofChart.panels.values()) {
    p.range = [now - 40, now + 2];
    p.draw();
  }
}"""
#: Whether the chart's canvas shows the device events' amber at time ``t`` (mid-height).
AMBER_AT = """({panel, t}) => {
  const u = window.vitalproofChart.panels.get(panel).plot;
  const x = Math.round(u.valToPos(t, "x", true)), y = Math.round(u.bbox.top + u.bbox.height / 2);
  const px = u.ctx.getImageData(x - 2, y, 5, 1).data;
  for (let i = 0; i < px.length; i += 4) {
    const [r, g, b, a] = [px[i], px[i + 1], px[i + 2], px[i + 3]];
    if (a > 100 && r > g + 20 && g > b + 20) return true;
  }
  return false;
}"""


def _marks(page: Page, panel: str) -> list[dict[str, object]]:
    got: list[dict[str, object]] = page.evaluate(
        f"window.vitalproofChart.panels.get('{panel}').shownMarks()"
    )
    return got


def test_a_sequence_gap_and_a_reset_are_marked_on_every_chart_of_the_device_with_both_sides_drawn(
    site: Site, page: Page, tmp_path: Path
) -> None:
    """The ward's device loses 2 s of readings (its numbers used up), then restarts counting:
    the worker's gap and reset events reach the chart through the fan-out, as markers on the
    heart-rate, SpO2 and motion charts, and in words under each; the readings before and
    after are drawn and the heart-rate line (3 s between readings: no time gap) breaks at the
    gap. A chart opened afterwards gets the markers with its history."""
    sign_in(page, site.url, site.token(DR_A), "/ui/chart.html?patient=pt-1")
    _wait(page, "window.vitalproofChart.panels.get('heart_rate')?.points() > 3")
    site.ward.hole["pt-1"] = 20
    _wait(page, "window.vitalproofChart.panels.get('heart_rate').shownMarks().length > 0")
    (gap,) = [e for e in site.ward.events if e.kind == "gap"]
    assert gap.missing == site.ward.skipped["pt-1"] >= 40
    label = f"gap: {gap.missing} readings missing"
    for panel in ("heart_rate", "spo2", "motion"):
        (mark,) = _marks(page, panel)
        assert (mark["event"], mark["t_us"], mark["label"]) == ("gap", gap.device_time_us, label)
        expect(page.locator(f'[data-marks="{panel}"] li[data-kind="gap"]')).to_contain_text(label)
    t_gap = gap.device_time_us / S
    hr = "window.vitalproofChart.panels.get('heart_rate')"
    _wait(page, f"{hr}.series.heart_rate.t.filter(t => t > {t_gap}).length >= 3")
    times = page.evaluate(f"{hr}.series.heart_rate.t")
    assert any(t < t_gap for t in times) and any(t >= t_gap for t in times)
    assert page.evaluate(f"{hr}.series.heart_rate.gaps()") == 0  # by time alone: unbroken
    assert page.evaluate(f"{hr}.series.heart_rate.gaps({hr}.breaksOf({hr}.series.heart_rate))") == 1

    site.ward.restart.add("pt-1")
    _wait(page, f"{hr}.shownMarks().some(m => m.event === 'reset')")
    expect(page.locator('[data-marks="motion"] li[data-kind="reset"]')).to_contain_text(
        "device reset: counting again from 0"
    )
    page.wait_for_timeout(1500)  # readings after the reset (numbers seen before) are drawn too
    t_reset = page.evaluate(f"{hr}.shownMarks()[1].t_us") / S
    assert page.evaluate(f"{hr}.series.heart_rate.t.filter(t => t > {t_reset}).length") >= 1
    # Drawn on the canvas: zoomed to the last 40 s, the gap's line is the marker's amber.
    page.evaluate(ZOOM_TO_LAST_40_S)
    assert page.evaluate(AMBER_AT, {"panel": "heart_rate", "t": t_gap}), "no marker drawn"
    check_accessibility(page)
    screenshot(page, "clinician-gap", tmp_path)

    page.reload()
    _wait(page, f"{hr}?.shownMarks().length === 2")
    assert [m["event"] for m in _marks(page, "motion")] == ["gap", "reset"]


def test_revocation_on_the_patients_page_empties_the_clinicians_live_chart_within_a_second(
    site: Site, page: Page, browser: Browser, tmp_path: Path
) -> None:
    sign_in(page, site.url, site.token(DR_A), "/ui/chart.html?patient=pt-1")
    _wait(page, "window.vitalproofChart.panels.get('heart_rate')?.points() > 3")
    patient = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        mine = patient.new_page()
        sign_in(mine, site.url, site.patient_token("pt-1"), "/ui/patient.html")
        mine.get_by_role("button", name=f"Revoke {DR_A}").click()
        mine.get_by_role("dialog").get_by_role("button", name="Revoke").click()
        expect(mine.locator("#grants-status")).to_contain_text("can no longer see your data")
        revoked = time.monotonic()
        _wait(
            page,
            "[...window.vitalproofChart.panels.values()].every(p => p.points() === 0)",
            timeout_ms=3000,
        )
        took = time.monotonic() - revoked
        screenshot(mine, "patient-revoked", tmp_path)
    finally:
        patient.close()
    assert took < 1.0, f"the chart emptied {took:.2f} s after the revocation"
    expect(page.get_by_role("alert")).to_contain_text("Live access ended")
    page.wait_for_timeout(1000)  # and nothing arrives after it
    counts = page.evaluate("[...window.vitalproofChart.panels.values()].map(p => p.points())")
    assert counts and set(counts) == {0}
    screenshot(page, "clinician-revoked", tmp_path)


def test_without_consent_break_glass_opens_access_with_a_countdown_the_patient_sees(
    site: Site, page: Page, tmp_path: Path
) -> None:
    sign_in(page, site.url, site.token(DR_B), "/ui/chart.html?patient=pt-2")
    expect(page.get_by_role("heading", name="Not shared with you")).to_be_visible()
    expect(page.locator("#charts-area")).to_be_hidden()
    check_accessibility(page)
    page.get_by_label("Reason for emergency access").fill("short")
    page.get_by_label("Duration (minutes)").fill("15")
    page.get_by_role("button", name="Open emergency access").click()
    expect(page.locator("#btg-error")).to_contain_text("at least 10 characters")
    page.get_by_label("Reason for emergency access").fill("unresponsive in the emergency room")
    page.get_by_role("button", name="Open emergency access").click()
    banner = page.get_by_role("region", name="Emergency access")
    expect(banner).to_be_visible()
    expect(page.locator("#btg-left")).to_contain_text("14:")
    expect(banner).to_contain_text("the patient sees this access")
    _wait(page, "window.vitalproofChart.panels.get('heart_rate')?.points() > 2")
    screenshot(page, "break-glass", tmp_path)
    audit = AuditLog(site.settings.paths.audit_path)
    try:
        mine = audit.records(patient_id="pt-2", actor=DR_B)
    finally:
        audit.close()
    btg = [r for r in mine if r.action == "break-glass"]
    assert len(btg) == 1 and btg[0].reason == "unresponsive in the emergency room"


def test_the_pages_api_refuses_what_consent_does_not_cover_with_the_reason(site: Site) -> None:
    def get(path: str, token: str) -> httpx.Response:
        return httpx.get(site.url + path, headers={"Authorization": f"Bearer {token}"}, timeout=10)

    r = get("/api/patients/pt-1/history?metric=heart_rate", site.token(DR_B))
    assert r.status_code == 403 and "t_us" not in r.text
    assert "no" in r.json()["issue"][0]["diagnostics"].lower()
    r = get("/api/patients/pt-2/history?metric=spo2", site.token(DR_A))
    assert r.status_code == 403 and "t_us" not in r.text
    r = get("/api/patients", site.patient_token("pt-1"))
    assert r.status_code == 403 and "for clinicians" in r.text
    r = get("/api/patients/pt-1/history?metric=nope", site.token(DR_A))
    assert r.status_code == 400 and "metric" in r.text
    r = get("/api/patients/pt-2/sharing", site.token(DR_B))
    assert r.status_code == 200 and r.json()["shared"] is False and r.json()["reason"]
