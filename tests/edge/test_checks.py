"""The agent runs HTTP and TCP checks itself and honours DeregisterCriticalServiceAfter."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import httpx
import pytest


def wait_until(condition, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)  # polling interval of a condition with a deadline


class Target(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def target():
    handler = type("Handler", (Target,), {"status": 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()


def status_of(edge, check_id: str) -> str | None:
    checks = httpx.get(f"{edge.url}/v1/agent/checks").json()
    return checks.get(check_id, {}).get("Status")


def test_http_check_follows_the_target(edge, target):
    server, handler = target
    url = f"http://127.0.0.1:{server.server_address[1]}/health"
    body = {"Name": "api", "Port": 1, "Check": {"HTTP": url, "Interval": "100ms", "Timeout": "1s"}}
    assert httpx.put(f"{edge.url}/v1/agent/service/register", json=body).status_code == 200
    wait_until(lambda: status_of(edge, "service:api") == "passing", what="passing")
    handler.status = 429
    wait_until(lambda: status_of(edge, "service:api") == "warning", what="warning on 429")
    handler.status = 503
    wait_until(lambda: status_of(edge, "service:api") == "critical", what="critical on 503")
    output = httpx.get(f"{edge.url}/v1/agent/checks").json()["service:api"]["Output"]
    assert "503" in output


def test_tcp_check(edge):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    body = {"Name": "db", "Check": {"TCP": f"127.0.0.1:{port}", "Interval": "100ms", "Timeout": "1s"}}
    httpx.put(f"{edge.url}/v1/agent/service/register", json=body).raise_for_status()
    wait_until(lambda: status_of(edge, "service:db") == "passing", what="tcp passing")
    listener.close()
    wait_until(lambda: status_of(edge, "service:db") == "critical", what="tcp critical")


def test_ttl_check_expires(edge):
    body = {"Name": "job", "Check": {"TTL": "300ms"}}
    httpx.put(f"{edge.url}/v1/agent/service/register", json=body).raise_for_status()
    httpx.put(f"{edge.url}/v1/agent/check/pass/service:job").raise_for_status()
    assert status_of(edge, "service:job") == "passing"
    wait_until(lambda: status_of(edge, "service:job") == "critical", what="ttl expiry")
    assert "TTL expired" in httpx.get(f"{edge.url}/v1/agent/checks").json()["service:job"]["Output"]


def test_deregister_critical_service_after(edge):
    body = {
        "Name": "flaky",
        "Check": {"TCP": "127.0.0.1:1", "Interval": "100ms", "Timeout": "200ms",
                  "DeregisterCriticalServiceAfter": "500ms"},
    }
    httpx.put(f"{edge.url}/v1/agent/service/register", json=body).raise_for_status()
    assert "flaky" in httpx.get(f"{edge.url}/v1/agent/services").json()
    wait_until(lambda: "flaky" not in httpx.get(f"{edge.url}/v1/agent/services").json(), what="deregistration")
    assert httpx.get(f"{edge.url}/v1/catalog/service/flaky").json() == []


def test_checks_survive_restart_of_the_agent(tmp_path):
    from agents import EdgeProcess

    edge = EdgeProcess(tmp_path / "d")
    httpx.put(f"{edge.url}/v1/agent/service/register", json={"Name": "keep", "Check": {"TTL": "30s"}}).raise_for_status()
    edge.stop()
    edge = EdgeProcess(tmp_path / "d")
    try:
        assert status_of(edge, "service:keep") == "critical"  # status restarts unknown
        httpx.put(f"{edge.url}/v1/agent/check/pass/service:keep").raise_for_status()
        assert status_of(edge, "service:keep") == "passing"
    finally:
        edge.stop()
