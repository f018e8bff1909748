"""Konsul's KV extensions over HTTP: ?ttl=, ?history, ?dc=global, blocking reads."""

from __future__ import annotations

import httpx
import pytest


@pytest.fixture
def http(shared_edge):
    with httpx.Client(base_url=shared_edge.url, timeout=30) as client:
        yield client


def test_ttl_key_disappears_unless_rewritten(http):
    assert http.put("/v1/kv/cache/short?ttl=400ms", content=b"v").json() is True
    assert http.put("/v1/kv/cache/long?ttl=1h", content=b"v").json() is True
    index = int(http.get("/v1/kv/cache/short").headers["X-Consul-Index"])
    # A blocking read wakes when the key expires: expiry is a change.
    response = http.get(f"/v1/kv/cache/short?index={index}&wait=20s")
    assert response.status_code == 404
    assert int(response.headers["X-Consul-Index"]) > index
    assert http.get("/v1/kv/cache/long").status_code == 200


def test_history_lists_past_versions(http):
    for value in (b"one", b"two", b"three"):
        http.put("/v1/kv/hist/key", content=value)
    http.delete("/v1/kv/hist/key")
    history = http.get("/v1/kv/hist/key?history").json()
    assert [h["Op"] for h in history] == ["delete", "set", "set", "set"]
    assert [h["Size"] for h in history] == [0, 5, 3, 3]
    stamps = [h["Stamp"] for h in history]
    assert stamps == sorted(stamps, reverse=True)
    assert not any(h["Conflict"] for h in history)
    assert http.get("/v1/kv/hist/key").status_code == 404


def test_global_scope_is_separate(http):
    http.put("/v1/kv/shared/mode?dc=global", content=b"fleet")
    http.put("/v1/kv/shared/mode", content=b"site")
    assert http.get("/v1/kv/shared/mode?dc=global&raw").content == b"fleet"
    assert http.get("/v1/kv/shared/mode?raw").content == b"site"
    assert http.get("/v1/kv/shared/mode?dc=s1&raw").content == b"site"


def test_blocking_read_times_out_with_same_index(http):
    http.put("/v1/kv/block/quiet", content=b"v")
    index = http.get("/v1/kv/block/quiet").headers["X-Consul-Index"]
    response = http.get(f"/v1/kv/block/quiet?index={index}&wait=300ms")
    assert response.status_code == 200
    assert response.headers["X-Consul-Index"] == index


def test_metrics_and_health(http):
    http.put("/v1/kv/metrics/k", content=b"v")
    text = http.get("/metrics").text
    assert 'konsul_kv_keys{scope="s1"}' in text
    assert "konsul_store_commit_rounds_total" in text
    assert 'konsul_http_requests_total{method="PUT",status="200"}' in text
    assert http.get("/health/live").json() == {"status": "live"}
    assert http.get("/health/ready").json() == {"status": "ready"}
