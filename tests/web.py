"""The dashboard's browser tests' kit: Debian's chromium driven by Playwright (no browser
download), a page that may reach only 127.0.0.1 (every other request is aborted and fails the
test), axe-core's accessibility rules run in that page, and screenshots for the docs.

Screenshots go to ``$VITALPROOF_SCREENSHOTS`` (``make screenshots`` sets docs/img) or, by
default, to the test's temporary folder, so a test run leaves the checkout as it was.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Page, Route, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
AXE = ROOT / "node_modules" / "axe-core" / "axe.min.js"
#: The WCAG 2.x A and AA rules (labels, contrast, names, keyboard-reachable roles).
AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(
        "chromium is not installed: `apt-get install chromium` (scripts/install-system.sh)",
        pytrace=False,
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Per module, not per session: Playwright's sync API runs an event loop in the main
    thread while it is open, so a later test's ``asyncio.run`` would find a loop running."""
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh tab (its own storage) that may load nothing but 127.0.0.1; its console errors
    and any external request fail the test (a 4xx answer the page shows is not an error)."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    external: list[str] = []
    errors: list[str] = []

    def guard(route: Route) -> None:
        host = urlsplit(route.request.url).hostname
        if host in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            external.append(route.request.url)
            route.abort()

    context.route("**/*", guard)
    tab = context.new_page()
    tab.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    tab.on(
        "console",
        lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None,
    )
    tab.set_default_timeout(15_000)
    try:
        yield tab
    finally:
        context.close()
    assert not external, f"the page reached outside 127.0.0.1: {external}"
    # A refused request (4xx) is the page's business to show; anything else is a bug.
    assert not [e for e in errors if "responded with a status of 4" not in e], errors


def check_accessibility(page: Page) -> None:
    """axe-core's WCAG A/AA rules on the page as it is now; any violation fails, named."""
    page.add_script_tag(path=str(AXE))
    result: dict[str, Any] = page.evaluate(
        "tags => axe.run(document, {runOnly: {type: 'tag', values: tags}})", AXE_TAGS
    )
    problems = [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
        for v in result["violations"]
    ]
    assert not problems, "accessibility:\n" + "\n".join(problems)


def screenshot(page: Page, name: str, tmp_path: Path) -> Path:
    folder = Path(os.environ.get("VITALPROOF_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"dashboard-{name}.png"
    page.screenshot(path=str(out), full_page=True)
    return out


def sign_in(page: Page, url: str, token: str, path: str = "/ui/") -> None:
    """Open ``path`` signed in (the token in the fragment, as the demo's links carry it)."""
    page.goto(f"{url}{path}#token={token}")
