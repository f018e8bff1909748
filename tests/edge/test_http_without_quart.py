"""The edge and the hub serve HTTP (and the sync WebSocket) without quart, Flask or werkzeug.

Each agent runs with ``PYTHONPROFILEIMPORTTIME=1``, so every module it ever
imports, at start and while it answers requests on every kind of route, is
named in its output.
"""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest

from agents import AgentProcess, eventually, free_port

FORBIDDEN = ("quart", "quart_trio", "flask", "werkzeug", "jinja2", "blinker")
_IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|(\s*)(\S+)$")


def imported(output: str) -> set[str]:
    return {found.group(2) for line in output.splitlines() if (found := _IMPORTED.match(line))}


def forbidden(modules: set[str]) -> set[str]:
    return {name for name in modules if name.split(".")[0] in FORBIDDEN}


def test_importing_the_edge_agent_and_its_app_leaves_out_quart_and_flask():
    code = (
        "import sys, konsul.edge.agent, konsul.cli.main, konsul.hub.agent, konsul.protocols.http.app; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"


@pytest.fixture
def traced_agents(tmp_path):
    hub = AgentProcess(
        ["hub", "--data-dir", str(tmp_path / "hub"), "--http-addr", "127.0.0.1:0", "--acl", "off"],
        env={"PYTHONPROFILEIMPORTTIME": "1"},
    )
    hub_url = hub.wait_for(r"http listening on (\S+)").group(1)
    edge = AgentProcess(
        ["edge", "--site", "s1", "--data-dir", str(tmp_path / "edge"), "--http-addr", "127.0.0.1:0",
         "--mqtt-addr", "127.0.0.1:0", "--coap-addr", f"127.0.0.1:{free_port()}", "--hub-url", hub_url,
         "--acl", "off"],
        env={"PYTHONPROFILEIMPORTTIME": "1"},
    )
    edge_url = edge.wait_for(r"http listening on (\S+)").group(1)
    yield hub, hub_url, edge, edge_url
    edge.stop()
    hub.stop()


def test_agents_serving_every_kind_of_request_never_import_quart_or_flask(traced_agents):
    hub, hub_url, edge, edge_url = traced_agents
    with httpx.Client(base_url=edge_url, timeout=10) as http:
        assert http.put("/v1/kv/plain", content=b"v").json() is True  # the fast path
        assert http.put("/v1/kv/plain?flags=3&ttl=60s", content=b"w").json() is True  # routed
        assert http.get("/v1/kv/plain?index=1&wait=10ms").status_code == 200  # a blocking query
        assert http.get("/v1/kv/?recurse").json()[0]["Flags"] == 3
        assert http.get("/v1/agent/self").status_code == 200
        assert http.post("/v1/kv/plain").status_code == 405
        assert http.get("/v1/nowhere").json()["error"] == "unknown_endpoint"
        assert http.get("/v1/snapshot").status_code == 200  # a streamed answer
        assert http.get("/metrics").status_code == 200
    # The edge syncs with the hub over the WebSocket: the hub sees its key.
    eventually(lambda: httpx.get(f"{hub_url}/v1/kv/plain?dc=s1&raw", timeout=5).content == b"w", what="synced key")
    assert httpx.get(f"{hub_url}/v1/sites", timeout=5).json()[0]["Connected"] is True
    edge.stop()
    hub.stop()
    for agent in (edge, hub):
        modules = imported(agent.output)
        assert "konsul.protocols.http.app" in modules, "the import trace was not collected"
        assert forbidden(modules) == set()
