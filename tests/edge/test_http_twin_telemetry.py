"""The twin and telemetry routes of an edge, including every kind of bad input."""

from __future__ import annotations

import uuid

import httpx
import pytest
from agents import EdgeProcess


@pytest.fixture(scope="module")
def shared_edge(tmp_path_factory):
    """One edge for the module, with ACLs off: these tests are about devices, not access control."""
    process = EdgeProcess(tmp_path_factory.mktemp("edge"), extra=["--acl", "off"])
    yield process
    process.stop()


@pytest.fixture
def device(shared_edge: EdgeProcess) -> str:
    name = f"tw-{uuid.uuid4().hex[:8]}"
    httpx.put(f"{shared_edge.url}/v1/devices/{name}", json={"Type": "meter"}).raise_for_status()
    return name


def url(edge: EdgeProcess, device: str, suffix: str) -> str:
    return f"{edge.url}/v1/devices/{device}/{suffix}"


def test_put_replaces_patch_merges_and_the_twin_shows_the_delta(shared_edge, device):
    assert httpx.put(url(shared_edge, device, "desired"), json={"a": 1, "b": 2}).json() == {"a": 1, "b": 2}
    assert httpx.patch(url(shared_edge, device, "desired"), json={"b": None, "c": [1]}).json() == {"a": 1, "c": [1]}
    assert httpx.post(url(shared_edge, device, "reported"), json={"a": 1, "c": [2]}).json() == {"a": 1, "c": [2]}
    twin = httpx.get(url(shared_edge, device, "twin")).json()
    assert twin["Delta"] == {"c": [1]} and twin["Site"] == "s1" and twin["Conflicts"] == []


@pytest.mark.parametrize(
    ("method", "suffix", "body", "status", "code"),
    [
        ("PUT", "desired", b"{not json", 400, "invalid_argument"),
        ("PUT", "desired", b"[1, 2]", 400, "invalid_argument"),
        ("PATCH", "desired", b'{"": 1}', 400, "invalid_argument"),
        ("PUT", "desired", b'{"big": "' + b"x" * 70_000 + b'"}', 413, "value_too_large"),
        ("POST", "telemetry", b"{not json", 400, "invalid_argument"),
        ("POST", "telemetry", b'"a string"', 400, "invalid_argument"),
        ("POST", "telemetry", b'[{"seq": 1}, {"seq": -1}]', 400, "invalid_argument"),
        ("POST", "telemetry", b'{"seq": 1.5}', 400, "invalid_argument"),
        ("POST", "telemetry", b'{"ts": "yesterday"}', 400, "invalid_argument"),
        ("POST", "telemetry", b"[]", 400, "invalid_argument"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(shared_edge, device, method, suffix, body, status, code):
    httpx.put(url(shared_edge, device, "desired"), json={"keep": True}).raise_for_status()
    response = httpx.request(method, url(shared_edge, device, suffix), content=body)
    assert response.status_code == status, response.text
    assert response.json()["error"] == code
    assert httpx.get(url(shared_edge, device, "desired")).json() == {"keep": True}
    assert httpx.get(url(shared_edge, device, "telemetry")).json() == []


def test_unknown_devices_and_bad_queries(shared_edge, device):
    for suffix in ("desired", "reported", "twin", "telemetry"):
        response = httpx.get(url(shared_edge, "nobody-1", suffix))
        assert response.status_code == (200 if suffix == "telemetry" else 404), (suffix, response.text)
    assert httpx.post(url(shared_edge, "nobody-1", "telemetry"), json={"t": 1}).status_code == 404
    assert httpx.put(url(shared_edge, "bad id!", "desired"), json={}).status_code in (400, 404)
    for query in ({"limit": "0"}, {"limit": "x"}, {"since": "soon"}, {"limit": "100000"}):
        response = httpx.get(url(shared_edge, device, "telemetry"), params=query)
        assert response.status_code == 400, (query, response.text)
    assert httpx.get(f"{shared_edge.url}/v1/telemetry").status_code == 400  # names no devices


def test_telemetry_window_and_order(shared_edge, device):
    samples = [{"seq": n, "ts": 1_700_000_000 + n, "v": n} for n in range(10)]
    assert httpx.post(url(shared_edge, device, "telemetry"), json=samples).json() == {"Stored": 10}
    found = httpx.get(url(shared_edge, device, "telemetry"), params={"since": 1_700_000_003, "until": "2023-11-14T22:13:28Z", "limit": 3}).json()
    # until is exclusive: 1_700_000_008 is 2023-11-14T22:13:28Z
    assert [s["Seq"] for s in found] == [5, 6, 7]
    assert found[0]["Time"] == 1_700_000_005 and found[0]["Device"] == device
    by_type = httpx.get(f"{shared_edge.url}/v1/telemetry", params={"type": "meter", "limit": 10_000}).json()
    assert {s["Device"] for s in by_type} >= {device}
