"""The dashboard's front door in a real chromium: signing in with a token from the service's
development issuer routes each role to its page; a refused token says why and shows no data."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from clinic.auth import DevIssuer
from clinic.service.context import clinic_dir
from tests.test_clinic_service import _answers_metadata, serving
from tests.web import check_accessibility, screenshot
from vitalproof.settings import PathSettings, Settings


@dataclass
class Site:
    url: str
    issuer: DevIssuer


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    home = tmp_path_factory.mktemp("dash-home")
    settings = Settings(paths=PathSettings(home=home))
    issuer = DevIssuer(clinic_dir(settings))
    env = os.environ | {"VITALPROOF_HOME": str(home)}
    with serving(env, home / "serve.log", _answers_metadata) as url:
        yield Site(url, issuer)


def test_sign_in_page_is_accessible_and_refuses_a_bad_token_with_the_reason(
    site: Site, page: Page, tmp_path: Path
) -> None:
    page.goto(site.url + "/")
    expect(page).to_have_url(site.url + "/ui/")
    check_accessibility(page)
    page.get_by_label("Access token").fill("not-a-jwt")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("token")
    screenshot(page, "signin", tmp_path)
