"""Existing Consul clients work unchanged: py-consul against a real `konsul edge`."""

from __future__ import annotations

import threading

import consul
import pytest


@pytest.fixture
def client(shared_edge):
    return consul.Consul(host=shared_edge.host, port=shared_edge.port)


def test_kv_put_get_delete(client):
    assert client.kv.put("app/name", "konsul") is True
    index, entry = client.kv.get("app/name")
    assert entry["Value"] == b"konsul"
    assert entry["Key"] == "app/name"
    assert int(index) >= entry["ModifyIndex"] >= entry["CreateIndex"] >= 1
    assert client.kv.delete("app/name") is True
    assert client.kv.get("app/name")[1] is None


def test_kv_flags_and_recurse_and_keys(client):
    client.kv.put("tree/a", "1", flags=42)
    client.kv.put("tree/b/c", "2")
    client.kv.put("tree/b/d", "3")
    client.kv.put("treehouse", "4")
    _, entries = client.kv.get("tree/", recurse=True)
    assert [(e["Key"], e["Value"]) for e in entries] == [
        ("tree/a", b"1"),
        ("tree/b/c", b"2"),
        ("tree/b/d", b"3"),
    ]
    assert entries[0]["Flags"] == 42
    _, keys = client.kv.get("tree/", keys=True, separator="/")
    assert keys == ["tree/a", "tree/b/"]
    assert client.kv.delete("tree/", recurse=True) is True
    assert client.kv.get("tree/", recurse=True)[1] is None
    assert client.kv.get("treehouse")[1]["Value"] == b"4"


def test_kv_cas(client):
    assert client.kv.put("cas/key", "v1", cas=0) is True
    assert client.kv.put("cas/key", "again", cas=0) is False  # create-only
    _, entry = client.kv.get("cas/key")
    assert client.kv.put("cas/key", "v2", cas=entry["ModifyIndex"] + 1000) is False
    assert client.kv.put("cas/key", "v2", cas=entry["ModifyIndex"]) is True
    assert client.kv.get("cas/key")[1]["Value"] == b"v2"
    _, entry = client.kv.get("cas/key")
    assert client.kv.delete("cas/key", cas=entry["ModifyIndex"] + 1000) is False
    assert client.kv.delete("cas/key", cas=entry["ModifyIndex"]) is True


def test_blocking_get_returns_when_another_client_writes(shared_edge, client):
    client.kv.put("watch/me", "before")
    index, _ = client.kv.get("watch/me")
    result: dict = {}
    started = threading.Event()

    def blocking_get() -> None:
        other = consul.Consul(host=shared_edge.host, port=shared_edge.port)
        started.set()
        result["answer"] = other.kv.get("watch/me", index=index, wait="20s")

    waiter = threading.Thread(target=blocking_get)
    waiter.start()
    started.wait()
    # The waiter must still be blocked: the index has not moved.
    waiter.join(timeout=0.2)
    assert waiter.is_alive()
    client.kv.put("watch/me", "after")
    waiter.join(timeout=15)
    assert not waiter.is_alive()
    new_index, entry = result["answer"]
    assert int(new_index) > int(index)
    assert entry["Value"] == b"after"


def test_service_with_ttl_check(client):
    client.agent.service.register(
        "web", service_id="web-1", address="10.0.0.5", port=8080, tags=["v1", "blue"],
        meta={"team": "edge"}, check=consul.Check.ttl("30s"),
    )
    services = client.agent.services()
    assert services["web-1"]["Service"] == "web"
    assert services["web-1"]["Port"] == 8080
    assert services["web-1"]["Meta"] == {"team": "edge"}
    check_id = "service:web-1"
    assert client.agent.checks()[check_id]["Status"] == "critical"
    _, nodes = client.health.service("web", passing=True)
    assert nodes == []
    client.agent.check.ttl_pass(check_id, notes="all good")
    assert client.agent.checks()[check_id]["Status"] == "passing"
    _, nodes = client.health.service("web", passing=True)
    assert [n["Service"]["ID"] for n in nodes] == ["web-1"]
    assert nodes[0]["Checks"][0]["Output"] == "all good"
    client.agent.check.ttl_warn(check_id)
    _, nodes = client.health.service("web", passing=True)
    assert nodes == []
    _, warning = client.health.state("warning")
    assert [c["CheckID"] for c in warning] == [check_id]

    # Catalog and health queries
    _, catalog = client.catalog.services()
    assert set(catalog["web"]) == {"v1", "blue"}
    _, instances = client.catalog.service("web", tag="blue")
    assert [(i["ServiceID"], i["ServiceAddress"], i["ServicePort"]) for i in instances] == [
        ("web-1", "10.0.0.5", 8080)
    ]
    assert client.catalog.service("web", tag="green")[1] == []
    _, nodes = client.catalog.nodes()
    assert "n1" in [n["Node"] for n in nodes]
    assert client.catalog.datacenters() == ["s1"]
    _, checks = client.health.checks("web")
    assert [c["CheckID"] for c in checks] == [check_id]

    # Deregister
    assert client.agent.service.deregister("web-1") is True
    assert "web-1" not in client.agent.services()
    assert client.health.service("web")[1] == []
    assert check_id not in client.agent.checks()


def test_status_leader_and_self(shared_edge, client):
    assert client.status.leader() == shared_edge.addr
    me = client.agent.self()
    assert me["Config"]["Datacenter"] == "s1"
    assert me["Config"]["NodeName"] == "n1"
