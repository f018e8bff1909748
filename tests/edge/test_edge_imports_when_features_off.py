"""An edge with MQTT, CoAP and DNS off does not load the modules of those features.

Every module is resident for the agent's life once imported (docs/benchmarks.md,
"Edge memory"), so a feature that is off must not be imported at start nor while
the edge answers ordinary requests. The edge runs with
``PYTHONPROFILEIMPORTTIME=1``: every module it ever imports is named in its output.
"""

from __future__ import annotations

import httpx
import pytest

from agents import AgentProcess
from test_http_without_quart import imported

# Top-level packages, or our own modules, that belong to features that are off here.
OFF_FEATURE_MODULES = (
    "asyncio", "trio_asyncio", "aiocoap", "cryptography", "dns", "re2",
    "konsul.protocols.mqtt", "konsul.protocols.coap", "konsul.protocols.dns_server",
    # The snapshot archive code: only when a snapshot is taken or staged.
    "tarfile", "konsul.sync.snapshot", "konsul.sync.snapshot_restore", "konsul.sync.snapshot_hub",
    # The client commands: `konsul edge` parses only its own command line.
    "konsul.cli.client_commands", "konsul.cli.acl_commands", "konsul.cli.device_commands",
    "konsul.cli.site_commands", "konsul.cli.snapshot_commands", "konsul.cli.audit_commands",
    "konsul.cli.dev", "konsul.cli.sim",
)


def belongs_to_off_feature(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in OFF_FEATURE_MODULES)


@pytest.fixture
def traced_edge(tmp_path):
    edge = AgentProcess(
        ["edge", "--site", "s1", "--data-dir", str(tmp_path / "edge"), "--http-addr", "127.0.0.1:0",
         "--mqtt-addr", "", "--coap-addr", "", "--dns-addr", "", "--acl", "off"],
        env={"PYTHONPROFILEIMPORTTIME": "1"},
    )
    yield edge, edge.wait_for(r"http listening on (\S+)").group(1)
    edge.stop()


def test_edge_without_mqtt_coap_dns_never_imports_their_modules(traced_edge):
    edge, url = traced_edge
    with httpx.Client(base_url=url, timeout=10) as http:
        assert http.put("/v1/kv/plain", content=b"v").json() is True
        assert http.get("/v1/kv/?recurse").json()[0]["Key"] == "plain"
        assert http.put("/v1/agent/service/register", json={"Name": "web", "Port": 80}).status_code == 200
        assert http.get("/v1/catalog/services").status_code == 200
        assert http.get("/v1/agent/self").status_code == 200
        assert http.get("/metrics").status_code == 200
    edge.stop()
    modules = imported(edge.output)
    assert "konsul.protocols.http.app" in modules, "the import trace was not collected"
    assert sorted(m for m in modules if belongs_to_off_feature(m)) == []


def test_a_filter_expression_imports_re2_only_when_a_request_uses_one(traced_edge):
    edge, url = traced_edge
    with httpx.Client(base_url=url, timeout=10) as http:
        assert http.put("/v1/agent/service/register", json={"Name": "web", "Port": 80}).status_code == 200
        assert http.get("/v1/agent/services").status_code == 200
        assert "re2" not in imported(edge.output)
        found = http.get("/v1/agent/services", params={"filter": 'Service matches "^w"'})
        assert found.status_code == 200 and "web" in found.json()
    edge.stop()
    assert "re2" in imported(edge.output)
