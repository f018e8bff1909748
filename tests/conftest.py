from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from agents import EdgeProcess  # noqa: E402

# Agents the tests start serve no DNS unless a test gives --dns-addr: the
# default port (127.0.0.1:8600) is one per machine, and tests run side by side.
os.environ.setdefault("KONSUL_DNS_ADDR", "")


@pytest.fixture
def edge(tmp_path):
    """A running `konsul edge` (standalone) on free ports, stopped after the test."""
    process = EdgeProcess(tmp_path / "edge")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def shared_edge(tmp_path_factory):
    """One edge for a whole test module; tests use their own keys."""
    process = EdgeProcess(tmp_path_factory.mktemp("edge"))
    yield process
    process.stop()
