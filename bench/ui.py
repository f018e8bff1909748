"""The web console's weight and time to first render, against a real edge on loopback.

    .venv/bin/python bench/ui.py              # 10 loads
    .venv/bin/python bench/ui.py --loads 30

Weight: every file of the console (protocols/http/ui/) as served with
``Accept-Encoding: gzip`` (what a browser downloads on a first visit), and
uncompressed. Time to first render: headless Chromium (Debian's, by path, as
the tests) opens ``/ui/`` in a fresh context each load (no cache) and reads the
page's own marks: first contentful paint, and ``konsul:first-render`` (the
page frame drawn after the token and role checks, before its data arrives),
plus the time until the site page shows its sync table (data rendered). Prints
each load's figures and the medians. ACLs off, so no login step is timed.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from agents import EdgeProcess  # noqa: E402  - the tests' harness: a real `konsul edge`

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def weight(url: str) -> tuple[int, int, list[str]]:
    from konsul.protocols.http.ui_routes import ASSETS

    compressed = plain = 0
    lines = []
    for name in sorted(ASSETS):
        path = "/ui/" if name == "index.html" else f"/ui/{name}"
        gz = httpx.get(url + path, headers={"Accept-Encoding": "gzip"})
        raw = len(gz.content)  # httpx decodes: the plain size
        wire = int(gz.headers.get("content-length", raw)) if gz.headers.get("content-encoding") == "gzip" else raw
        compressed += wire
        plain += raw
        lines.append(f"  {name:14} {wire:7,d} B gzip  {raw:7,d} B")
    return compressed, plain, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", type=int, default=10)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as data:
        edge = EdgeProcess(Path(data) / "edge")
        try:
            compressed, plain, lines = weight(edge.url)
            print("console files:")
            print("\n".join(lines))
            print(f"total: {compressed:,d} B gzip ({compressed / 1024:.1f} KiB), {plain:,d} B uncompressed")
            paints, renders, data_renders = [], [], []
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                for _ in range(args.loads):
                    context = browser.new_context()
                    page = context.new_page()
                    started = time.perf_counter()
                    page.goto(f"{edge.url}/ui/")
                    page.get_by_role("table", name="Sync peers").or_(page.get_by_text("runs without a hub")).wait_for()
                    data_ms = (time.perf_counter() - started) * 1000
                    marks = page.evaluate(
                        "[performance.getEntriesByName('first-contentful-paint')[0]?.startTime ?? -1,"
                        " performance.getEntriesByName('konsul:first-render')[0]?.startTime ?? -1]"
                    )
                    paints.append(marks[0])
                    renders.append(marks[1])
                    data_renders.append(data_ms)
                    print(f"load: first paint {marks[0]:6.1f} ms, frame rendered {marks[1]:6.1f} ms, "
                          f"site data shown {data_ms:6.1f} ms (measured from Python, includes the driver)")
                    context.close()
                browser.close()
            print(f"median over {args.loads}: first paint {statistics.median(paints):.1f} ms, "
                  f"frame rendered {statistics.median(renders):.1f} ms, site data shown {statistics.median(data_renders):.1f} ms")
        finally:
            edge.stop()


if __name__ == "__main__":
    main()
