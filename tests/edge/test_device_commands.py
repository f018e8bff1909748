"""`konsul devices ...` run as real commands against a real edge."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
from agents import EdgeProcess
from test_client_commands import fails, konsul, ok


@pytest.fixture(scope="module")
def shared_edge(tmp_path_factory):
    """One edge for the module, with ACLs off: these tests are about devices, not access control."""
    process = EdgeProcess(tmp_path_factory.mktemp("edge"), extra=["--acl", "off"])
    yield process
    process.stop()


def device_name() -> str:
    return f"dev-{uuid.uuid4().hex[:8]}"


def test_create_list_show_and_delete(shared_edge: EdgeProcess):
    name = device_name()
    created = ok(konsul(shared_edge, "devices", "create", name, "--type", "pump", "--tag", "hall", "--attr", "room=2", "--kv-read", "cfg/"))
    token = created.strip().splitlines()[-1]
    record = httpx.get(f"{shared_edge.url}/v1/devices/{name}").json()
    assert (record["Type"], record["Tags"], record["Attributes"], record["KVRead"]) == ("pump", ["hall"], {"room": "2"}, ["cfg/"])
    # The printed token is the device's: it opens its telemetry over HTTP too (ingest needs no token
    # over HTTP, so check it the way a device would, on the registry's side: a rotation changes it).
    assert len(token) >= 40
    rotated = ok(konsul(shared_edge, "devices", "create", name, "--rotate-token")).strip().splitlines()[-1]
    assert rotated != token

    listed = json.loads(ok(konsul(shared_edge, "devices", "list", "--type", "pump", "--tag", "hall", "--format", "json")))
    assert name in [d["ID"] for d in listed]
    assert name in ok(konsul(shared_edge, "devices", "list"))
    assert "Desired" in ok(konsul(shared_edge, "devices", "show", name))

    ok(konsul(shared_edge, "devices", "delete", name))
    assert f"no device '{name}'" in fails(konsul(shared_edge, "devices", "show", name))


def test_desired_set_unset_replace_and_telemetry(shared_edge: EdgeProcess):
    name = device_name()
    ok(konsul(shared_edge, "devices", "create", name))
    assert json.loads(ok(konsul(shared_edge, "devices", "desired", name, "interval=30", "led=true", "mode=eco"))) == {
        "interval": 30, "led": True, "mode": "eco",
    }
    assert json.loads(ok(konsul(shared_edge, "devices", "desired", name, "--unset", "mode"))) == {"interval": 30, "led": True}
    assert json.loads(ok(konsul(shared_edge, "devices", "desired", name, "--replace", "interval=5"))) == {"interval": 5}
    assert httpx.get(f"{shared_edge.url}/v1/devices/{name}/desired").json() == {"interval": 5}
    fails(konsul(shared_edge, "devices", "desired", name, "interval"), code=2)
    assert "not_found" in fails(konsul(shared_edge, "devices", "desired", "nobody-here", "x=1"))

    httpx.post(f"{shared_edge.url}/v1/devices/{name}/telemetry", json=[{"seq": 1, "t": 20.5}, {"seq": 2, "t": 21}]).raise_for_status()
    samples = json.loads(ok(konsul(shared_edge, "devices", "telemetry", name, "--format", "json")))
    assert [s["Data"] for s in samples] == [{"seq": 1, "t": 20.5}, {"seq": 2, "t": 21}]
    assert "21" in ok(konsul(shared_edge, "devices", "telemetry", name, "--limit", "1"))
