"""Edges serving one device gateway (MQTT or CoAP) on free ports, for the interop tests.

The module fixtures here are shared by several test modules: a module uses one
by importing it (``from gateway_edges import coap_edge_anonymous``), and
pytest gives each importing module its own edge. Each fixture is registered
under the name the tests ask for (``edge``, ``http``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from agents import EdgeProcess


def start_mqtt_edge(data_dir: Path, *extra: str) -> EdgeProcess:
    """An edge with its embedded broker on a free port: ``mqtt_host`` and ``mqtt_port`` say where."""
    process = EdgeProcess(data_dir, extra=["--mqtt-addr", "127.0.0.1:0", *extra])
    process.mqtt_host, process.mqtt_port = process.mqtt_addr()
    return process


def start_coap_edge(data_dir: Path, *extra: str) -> EdgeProcess:
    """An edge serving CoAP on a free port: ``coap_host_port`` and the ``coap`` URI say where."""
    process = EdgeProcess(data_dir, extra=["--coap-addr", "127.0.0.1:0", *extra])
    process.coap_host_port = process.coap_addr()
    host, port = process.coap_host_port
    process.coap = f"coap://{host}:{port}"
    return process


@pytest.fixture(scope="module", name="edge")
def mqtt_edge(tmp_path_factory) -> Iterator[EdgeProcess]:
    """One MQTT edge for the module (devices authenticate with their tokens)."""
    process = start_mqtt_edge(tmp_path_factory.mktemp("edge"))
    yield process
    process.stop()


@pytest.fixture(scope="module", name="http")
def edge_http(edge: EdgeProcess) -> Iterator[httpx.Client]:
    """An HTTP client of the module's edge."""
    with httpx.Client(base_url=edge.url, timeout=10) as client:
        yield client


@pytest.fixture(scope="module", name="edge")
def coap_edge_anonymous(tmp_path_factory) -> Iterator[EdgeProcess]:
    """One CoAP edge for the module, taking devices it does not know (``--allow-anonymous``)."""
    process = start_coap_edge(tmp_path_factory.mktemp("coap-edge"), "--allow-anonymous")
    yield process
    process.stop()
