"""The console's browser tests: Debian's headless chromium driven by Playwright for Python.

Playwright never downloads a browser here: it launches the system's chromium
(``scripts/setup`` installs it) by its path. Pages are screenshotted into
docs/ui/ for docs/ui.md.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="session")
def browser() -> Iterator:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: run scripts/setup (Debian's chromium package)")
    # Playwright's sync API runs its own asyncio loop. Earlier tests in the same process may
    # have installed trio-asyncio's loop policy (the MQTT and CoAP gateways run behind it),
    # whose loops cannot be driven that way: make Playwright's loop with asyncio's own policy.
    policy = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    try:
        playwright = sync_api.sync_playwright().start()
    finally:
        asyncio.set_event_loop_policy(policy)
    try:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()
    finally:
        playwright.stop()


@pytest.fixture
def page(browser):
    """A fresh tab (its own sessionStorage), laptop width; JS errors and CSP violations fail the test."""
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    # Anything the Content-Security-Policy blocked (an inline style or script) fails the test too.
    tab.on("console", lambda message: "Content Security Policy" in message.text and errors.append(message.text))
    tab.set_default_timeout(20_000)
    yield tab
    context.close()
    assert not errors, f"JavaScript errors in the console: {errors}"
