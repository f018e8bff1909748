"""``/v1/txn``: Consul KV transactions, all or nothing, with base64 values."""

from __future__ import annotations

import base64

import consul
import httpx
import pytest


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


@pytest.fixture
def http(shared_edge):
    with httpx.Client(base_url=shared_edge.url, timeout=10) as client:
        yield client


def index(http) -> int:
    return int(http.get("/v1/kv/?keys").headers["X-Consul-Index"])


def test_set_get_and_delete_tree_with_py_consul(shared_edge):
    client = consul.Consul(host=shared_edge.host, port=shared_edge.port)
    result = client.txn.put([
        {"KV": {"Verb": "set", "Key": "txn/a", "Value": b64(b"1")}},
        {"KV": {"Verb": "set", "Key": "txn/b", "Value": b64(b"2"), "Flags": 7}},
        {"KV": {"Verb": "get", "Key": "txn/b"}},
    ])
    assert result["Errors"] is None
    assert result["Results"][2]["KV"]["Value"] == b64(b"2")
    assert result["Results"][2]["KV"]["Flags"] == 7
    assert client.kv.get("txn/a")[1]["Value"] == b"1"
    client.txn.put([{"KV": {"Verb": "delete-tree", "Key": "txn/"}}])
    assert client.kv.get("txn/", recurse=True)[1] is None


def test_failed_check_changes_nothing(http):
    http.put("/v1/kv/txn2/held", content=b"v")
    before = index(http)
    response = http.put("/v1/txn", json=[
        {"KV": {"Verb": "set", "Key": "txn2/new", "Value": b64(b"x")}},
        {"KV": {"Verb": "check-not-exists", "Key": "txn2/held"}},
        {"KV": {"Verb": "cas", "Key": "txn2/held", "Value": b64(b"y"), "Index": 999999}},
    ])
    assert response.status_code == 409
    assert [e["OpIndex"] for e in response.json()["Errors"]] == [1, 2]
    assert http.get("/v1/kv/txn2/new").status_code == 404
    assert http.get("/v1/kv/txn2/held?raw").content == b"v"
    assert index(http) == before


def test_checks_see_earlier_operations(http):
    response = http.put("/v1/txn", json=[
        {"KV": {"Verb": "set", "Key": "txn3/k", "Value": b64(b"1")}},
        {"KV": {"Verb": "check-not-exists", "Key": "txn3/k"}},
    ])
    assert response.status_code == 409
    assert http.get("/v1/kv/txn3/k").status_code == 404


@pytest.mark.parametrize(
    "body, detail",
    [
        (b"[{not json", "JSON"),
        (b'[{"KV": {"Verb": "set", "Key": "txn4/k", "Value": "%%%not-base64"}}]', "base64"),
        (b'[{"KV": {"Verb": "set", "Key": "/txn4/k", "Value": "eA=="}}]', "key"),
        (b'[{"KV": {"Verb": "explode", "Key": "txn4/k"}}]', "verb"),
        (b'[{"KV": {"Verb": "lock", "Key": "txn4/k"}}]', "Session"),
        (b'{"KV": {}}', "list"),
    ],
)
def test_malformed_transactions_are_refused(http, body, detail):
    before = index(http)
    response = http.put("/v1/txn", content=body)
    assert response.status_code == 400
    assert response.json()["error"] in ("invalid_argument", "invalid_key")
    assert detail in response.json()["detail"]
    assert http.get("/v1/kv/txn4/k").status_code == 404
    assert index(http) == before


def test_too_many_operations(http):
    ops = [{"KV": {"Verb": "set", "Key": f"txn5/{i}", "Value": b64(b"v")}} for i in range(65)]
    response = http.put("/v1/txn", json=ops)
    assert response.status_code == 400
    assert http.get("/v1/kv/txn5/?keys").status_code == 404
