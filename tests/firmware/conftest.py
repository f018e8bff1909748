from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from device_edge import DeviceEdge, start_edge  # noqa: E402


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeviceEdge]:
    """One edge serving MQTT and CoAP for a test module; tests use their own device ids."""
    process = start_edge(tmp_path_factory.mktemp("firmware-edge"))
    yield process
    code = process.stop()
    # An edge that died under a test shows why in the test report.
    assert code == 0, f"the edge exited with {code}:\n{process.output[-6000:]}"
