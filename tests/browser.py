"""Headless Chromium for the browser tests: Playwright driving Debian's chromium (.ci/run installs it)."""

from __future__ import annotations

import shutil
from contextlib import contextmanager

from tests.conftest import missing_service

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextmanager
def chromium():
    """A launched headless browser, closed afterwards; without Chromium the test is skipped (fails under
    REQUIRE_SERVICES, as CI runs)."""
    if CHROMIUM is None:
        missing_service("Chromium is not installed (apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            if browser.is_connected():
                browser.close()


def log_in(page, url: str, username: str, password: str) -> None:
    """Fill in and send a log-in form (the site's or the admin's) at `url`."""
    page.goto(url)
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
