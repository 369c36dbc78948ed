"""`vitalproof demo --serve`, as a newcomer runs it: after its checks the dashboard stays up
on 127.0.0.1 with the fleet streaming, and the sign-in links it prints work in a browser: a
clinician's chart fills live from the fleet (devices -> Mosquitto -> collector -> Kafka ->
worker -> fan-out), a dropped connection backfills with no hole, and the devices' restart
for the serving phase (their sequence numbers start again) shows as the worker's reset
markers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from playwright.sync_api import Page, expect

from vitalproof.devstack import PartStatus
from vitalproof.settings import Settings

LINK = re.compile(r"(http://127\.0\.0\.1:\d+/ui/#token=[\w.-]+)")


def test_demo_serve_leaves_the_dashboard_with_working_sign_in_links(
    settings: Settings, anvil: PartStatus, page: Page, tmp_path: Path
) -> None:
    out = tmp_path / "demo.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vitalproof", "demo", "--devices", "4", "--duration", "8",
             "--serve", "--serve-for", "45"],
            env=os.environ | settings.child_env(settings.paths.home / "secrets")
            | {"COLUMNS": "400"},
            stdout=sink, stderr=subprocess.STDOUT, cwd=tmp_path,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while "the fleet streams until" not in out.read_text(errors="replace"):
            assert proc.poll() is None, out.read_text()[-3000:]
            assert time.monotonic() < deadline, out.read_text()[-3000:]
            time.sleep(0.5)
        text = out.read_text()
        links = LINK.findall(text)
        assert len(links) == 5, text[-3000:]  # two clinicians, two patients, an operator
        assert "Practitioner/demo-dr-a" in text and "Organization/demo-ops" in text
        page.goto(links[0])
        expect(page).to_have_url(re.compile(r"/ui/clinician\.html"))
        expect(page.locator("#patients tr").first).to_be_visible()
        expect(page.locator("#patients tr td[data-fresh='fresh']").first).to_be_visible(
            timeout=20_000
        )
        chart_fills_live_and_a_drop_leaves_no_hole(page)
        page.goto(links[2])  # the first patient
        expect(page).to_have_url(re.compile(r"/ui/patient\.html"))
        expect(page.locator("body")).to_contain_text("Practitioner/demo-dr-a")  # their grant
    finally:
        page.goto("about:blank")  # its live feed would see the service stop, as an error
        if proc.poll() is None:
            proc.wait(90)
    assert proc.returncode == 0, out.read_text()[-3000:]


FEED = "window.vitalproofChart?.feed"
HR = "window.vitalproofChart?.panels?.get('heart_rate')"


def chart_fills_live_and_a_drop_leaves_no_hole(page: Page) -> None:
    """The first patient's chart, from the clinician's list: heart rate arrives live from the
    fleet; after a dropped connection every event number of the subscription was taken once
    (``taken == last``: the backfill through ``$events`` left no hole, the overlap no
    duplicate) and readings keep coming."""
    page.locator("#patients tr a").first.click()
    expect(page).to_have_url(re.compile(r"/ui/chart\.html\?patient="))
    page.wait_for_function(f"{HR}?.points() > 0 && {FEED}?.last > 0", timeout=15_000)
    # The fleet's devices restarted for this phase, so the worker saw each start counting
    # again: its reset event is on the chart (from the fan-out's memory, with the history).
    page.wait_for_function(f"{HR}.shownMarks().some(m => m.event === 'reset')", timeout=10_000)
    live = page.evaluate(f"{HR}.points()")
    page.wait_for_function(f"{HR}.points() > {live}", timeout=10_000)  # live, from the fleet
    before = page.evaluate(f"{FEED}.last")
    page.evaluate(f"{FEED}.drop()")
    page.wait_for_timeout(2500)  # the fleet sends on while the page is away
    expect(page.locator("#feed-state")).to_have_text("live")
    page.wait_for_function(f"{FEED}.last > {before}", timeout=10_000)
    assert page.evaluate(f"{FEED}.reconnects") >= 1
    taken, last = page.evaluate(f"[{FEED}.taken, {FEED}.last]")
    assert taken == last, f"{last - taken} events of the subscription never reached the page"
