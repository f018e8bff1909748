"""Every malformed request gets CONTRACT.md's JSON error and changes nothing."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest

from konsul.sync.limits import MAX_VALUE_BYTES


@pytest.fixture
def http(shared_edge):
    with httpx.Client(base_url=shared_edge.url, timeout=10) as client:
        yield client


def kv_index(http: httpx.Client) -> int:
    return int(http.get("/v1/kv/", params={"keys": ""}).headers["X-Consul-Index"])


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"] == code
    assert isinstance(body["detail"], str) and body["detail"]
    return body


@pytest.fixture
def unchanged(http):
    """Asserts, after the test, that no KV or catalog state changed."""
    http.put("/v1/kv/errors/seed", content=b"seed")
    before = (kv_index(http), http.get("/v1/agent/services").json(), http.get("/v1/kv/?recurse").json())
    yield
    after = (kv_index(http), http.get("/v1/agent/services").json(), http.get("/v1/kv/?recurse").json())
    assert after == before


def test_bad_json(http, unchanged):
    body = assert_error(http.put("/v1/agent/service/register", content=b"{not json"), 400, "invalid_argument")
    assert "JSON" in body["detail"]
    assert_error(http.put("/v1/agent/service/register", content=b"[1, 2]"), 400, "invalid_argument")


def test_service_without_name(http, unchanged):
    assert_error(http.put("/v1/agent/service/register", json={"Port": 80}), 400, "invalid_argument")


def test_wrong_field_type(http, unchanged):
    response = http.put("/v1/agent/service/register", json={"Name": "x", "Port": "eighty"})
    assert_error(response, 400, "invalid_argument")


@pytest.mark.parametrize(
    "check",
    [{"Script": "/bin/true", "Interval": "10s"}, {"GRPC": "127.0.0.1:1", "Interval": "1s"}, {"Notes": "no type"}],
)
def test_unknown_check_type(http, unchanged, check):
    response = http.put("/v1/agent/service/register", json={"Name": "svc", "Check": check})
    body = assert_error(response, 400, "invalid_argument")
    assert "unknown check type" in body["detail"]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/kv//leading-slash",
        "/v1/kv/a/%2E%2E/b",  # escaped: clients remove a literal ".." segment
        "/v1/kv/" + "k" * 513,
        "/v1/kv/nul%00byte",
    ],
)
def test_invalid_key(http, unchanged, path):
    assert_error(http.put(path, content=b"v"), 400, "invalid_key")


def test_oversized_value(http, unchanged, shared_edge, tmp_path):
    response = http.put("/v1/kv/errors/big", content=b"x" * (MAX_VALUE_BYTES + 1))
    assert_error(response, 413, "value_too_large")
    # Far beyond the limit the body is refused before it is read whole. httpx
    # writes a whole body before it reads, so this one goes through curl.
    huge = tmp_path / "huge"
    huge.write_bytes(b"x" * (4 * MAX_VALUE_BYTES))
    result = subprocess.run(
        ["curl", "-s", "-w", "\n%{http_code}", "-X", "PUT", "--data-binary", f"@{huge}",
         f"{shared_edge.url}/v1/kv/errors/huge"],
        capture_output=True, text=True, timeout=30, check=True,
    )
    body, status = result.stdout.rsplit("\n", 1)
    assert status == "413"
    assert json.loads(body)["error"] == "too_large"


def test_value_at_the_limit_is_accepted(http):
    assert http.put("/v1/kv/errors/max", content=b"x" * MAX_VALUE_BYTES).json() is True
    assert len(http.get("/v1/kv/errors/max?raw").content) == MAX_VALUE_BYTES
    http.delete("/v1/kv/errors/max")


def test_cas_on_missing_key(http, unchanged):
    body = assert_error(http.put("/v1/kv/errors/missing?cas=7", content=b"v"), 409, "cas_missing_key")
    assert "cas=0" in body["detail"]
    assert_error(http.delete("/v1/kv/errors/missing?cas=7"), 409, "cas_missing_key")


@pytest.mark.parametrize("query", ["cas=abc", "flags=-1", "flags=x", "ttl=soon", "ttl=0s"])
def test_bad_parameters(http, unchanged, query):
    assert_error(http.put(f"/v1/kv/errors/param?{query}", content=b"v"), 400, "invalid_argument")


def test_wrong_method(http, unchanged):
    assert_error(http.post("/v1/kv/errors/seed", content=b"v"), 405, "method_not_allowed")
    assert_error(http.delete("/v1/agent/services"), 405, "method_not_allowed")
    # (GET /v1/agent/service/<id> reads a service definition, as in Consul)
    assert_error(http.get("/v1/agent/service/deregister/web"), 405, "method_not_allowed")


def test_unparseable_wait(http, unchanged):
    body = assert_error(http.get("/v1/kv/errors/seed?index=1&wait=forever"), 400, "invalid_argument")
    assert "duration" in body["detail"]
    assert_error(http.get("/v1/kv/errors/seed?index=x"), 400, "invalid_argument")


def test_unknown_endpoint_and_check(http, unchanged):
    assert_error(http.get("/v1/nope"), 404, "unknown_endpoint")
    assert_error(http.put("/v1/agent/check/pass/no-such-check"), 404, "not_found")
    assert_error(http.put("/v1/agent/service/deregister/no-such-service"), 404, "not_found")


def test_unknown_datacenter(http, unchanged):
    body = assert_error(http.get("/v1/kv/errors/seed?dc=elsewhere"), 404, "not_found")
    assert "hub" in body["detail"]
