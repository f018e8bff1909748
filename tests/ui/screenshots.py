"""Screenshots of the console's pages, kept in docs/ui/ and shown in docs/ui.md.

Taken on every run (so a page that cannot be drawn fails the test), but written
into docs/ui/ only with ``KONSUL_UI_SCREENSHOTS=1``, so that running the suite
leaves the checkout clean; elsewhere they go to a temporary directory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

DOCS_SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "ui"


def _directory() -> Path:
    if os.environ.get("KONSUL_UI_SCREENSHOTS") == "1":
        return DOCS_SCREENSHOTS
    return Path(tempfile.gettempdir()) / "konsul-ui-screenshots"


def screenshot(page, name: str) -> None:
    directory = _directory()
    directory.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(directory / f"{name}.png"), full_page=True)
