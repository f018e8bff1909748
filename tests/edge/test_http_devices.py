"""``/v1/devices``: create with a token shown once, read, filter, update, delete."""

from __future__ import annotations

import sqlite3

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
def http(shared_edge):
    with httpx.Client(base_url=shared_edge.url, timeout=10) as client:
        yield client


def test_create_returns_the_token_once_and_stores_only_its_hash(http, shared_edge):
    created = http.put("/v1/devices/sensor-1", json={"Type": "thermo", "Tags": ["hall"], "Firmware": "1.2"})
    assert created.status_code == 201
    token = created.json()["Token"]
    assert len(token) >= 40
    again = http.get("/v1/devices/sensor-1").json()
    assert "Token" not in again
    assert again["Type"] == "thermo" and again["Tags"] == ["hall"] and again["Online"] is False
    assert again["KVRead"] == [""] and again["KVWrite"] == []
    updated = http.put("/v1/devices/sensor-1", json={"Firmware": "1.3"})
    assert updated.status_code == 200 and "Token" not in updated.json()
    assert updated.json()["Type"] == "thermo" and updated.json()["Firmware"] == "1.3"
    rotated = http.put("/v1/devices/sensor-1?rotate-token", json={}).json()["Token"]
    assert rotated != token
    # The plain token is nowhere on disk.
    with sqlite3.connect(f"file:{shared_edge.data_dir / 'konsul.db'}?mode=ro", uri=True) as db:
        blobs = b"".join(row[0] for row in db.execute("SELECT data FROM updates"))
    assert token.encode() not in blobs and rotated.encode() not in blobs


def test_list_filters_and_delete(http):
    http.put("/v1/devices/f-1", json={"Type": "valve", "Tags": ["north"]})
    http.put("/v1/devices/f-2", json={"Type": "valve", "Tags": ["south"]})
    http.put("/v1/devices/f-3", json={"Type": "pump", "Tags": ["north"]})
    ids = lambda **q: sorted(d["ID"] for d in http.get("/v1/devices", params=q).json() if d["ID"].startswith("f-"))
    assert ids(type="valve") == ["f-1", "f-2"]
    assert ids(tag="north") == ["f-1", "f-3"]
    assert ids(online="true") == []
    assert ids(online="false") == ["f-1", "f-2", "f-3"]
    assert http.delete("/v1/devices/f-2").json() is True
    assert http.get("/v1/devices/f-2").status_code == 404
    assert http.delete("/v1/devices/f-2").status_code == 404


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/devices/bad id", {"Type": "x"}),
        ("/v1/devices/ok-id", {"Tags": "not-a-list"}),
        ("/v1/devices/ok-id", {"Attributes": [1]}),
        ("/v1/devices/ok-id", {"KVWrite": ["/abs"]}),
    ],
)
def test_bad_device_requests(http, path, body):
    response = http.put(path, json=body)
    assert response.status_code == 400
    assert response.json()["error"] in ("invalid_argument",)
    assert http.get("/v1/devices/ok-id").status_code == 404
