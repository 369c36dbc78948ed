"""`vitalproof demo --serve`, as a newcomer runs it: after its checks the dashboard stays up
on 127.0.0.1 with the fleet streaming, and the sign-in links it prints work in a browser."""

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
        page.goto(links[2])  # the first patient
        expect(page).to_have_url(re.compile(r"/ui/patient\.html"))
        expect(page.locator("body")).to_contain_text("Practitioner/demo-dr-a")  # their grant
    finally:
        page.goto("about:blank")  # its live feed would see the service stop, as an error
        if proc.poll() is None:
            proc.wait(90)
    assert proc.returncode == 0, out.read_text()[-3000:]
