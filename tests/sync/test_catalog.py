"""The service catalog: register, deregister, list, and replication between replicas."""

from __future__ import annotations

import dataclasses

import pytest
from sync_support import BASE_MS, WallClock, send

from konsul.sync.catalog import CheckDefinition, ServiceEntry
from konsul.sync.errors import InvalidArgument, NotFound

WEB = ServiceEntry(
    "node1",
    "web-1",
    "web",
    "10.0.0.5",
    8080,
    ("primary", "v2"),
    {"version": "2.1"},
    (
        CheckDefinition("web-http", "http alive", "http", "http://10.0.0.5:8080/health", 5.0, 2.0),
        CheckDefinition("web-ttl", "heartbeat", "ttl", ttl_s=30.0, deregister_after_s=600.0),
    ),
)
DB = ServiceEntry("node1", "db", "postgres", "10.0.0.6", 5432)
OTHER_NODE = ServiceEntry("node2", "web-1", "web", "10.0.0.7", 8080)


def definition(entry: ServiceEntry) -> ServiceEntry:
    """An entry without its stamp, to compare with what was registered."""
    return dataclasses.replace(entry, stamp=None)


@pytest.fixture
async def pair(open_replica):
    a = await open_replica("a", wall_ms=WallClock(BASE_MS))
    b = await open_replica("b", wall_ms=WallClock(BASE_MS + 1_000))
    return a.scope("site"), b.scope("site")


async def test_register_get_list_and_deregister(pair):
    scope, _ = pair
    # An empty scope's index is reported as 1 and its first change is 2 (sync/kv.py ScopeIndex).
    index = max(1, scope.catalog.last_index)
    entry = await scope.register_service(WEB)
    assert definition(entry) == WEB
    assert entry.stamp is not None
    await scope.register_service(DB)
    await scope.register_service(OTHER_NODE)
    assert scope.catalog.last_index == index + 3
    assert [(s.node, s.service_id) for s in scope.catalog.services()] == [
        ("node1", "db"),
        ("node1", "web-1"),
        ("node2", "web-1"),  # same service id on another node is another service
    ]
    assert definition(scope.catalog.get("node1", "web-1")) == WEB

    await scope.deregister_service("node1", "web-1")
    assert scope.catalog.get("node1", "web-1") is None
    assert [(s.node, s.service_id) for s in scope.catalog.services()] == [
        ("node1", "db"),
        ("node2", "web-1"),
    ]
    assert scope.catalog.last_index == index + 4


async def test_registering_again_replaces_the_definition(pair):
    scope, _ = pair
    await scope.register_service(DB)
    moved = ServiceEntry("node1", "db", "postgres", "10.0.0.9", 5433, ("moved",))
    await scope.register_service(moved)
    assert definition(scope.catalog.get("node1", "db")) == moved
    assert len(scope.catalog.services()) == 1


async def test_deregistering_an_unknown_service_is_not_found(pair):
    scope, _ = pair
    await scope.register_service(DB)
    index = scope.catalog.last_index
    with pytest.raises(NotFound) as raised:
        await scope.deregister_service("node1", "nope")
    assert "nope" in str(raised.value)
    assert scope.catalog.last_index == index
    assert len(scope.catalog.services()) == 1


@pytest.mark.parametrize(
    "bad",
    [
        ServiceEntry("node1", "", "web"),
        ServiceEntry("node1", "web", ""),
        ServiceEntry("node/1", "web", "web"),
        ServiceEntry("node1", "a/b", "web"),
        ServiceEntry("node1", "web", "web", port=65536),
        ServiceEntry("node1", "web", "web", port=-1),
    ],
    ids=["no id", "no name", "slash in node", "slash in id", "port too high", "negative port"],
)
async def test_an_invalid_service_is_refused_and_changes_nothing(pair, bad):
    scope, _ = pair
    await scope.register_service(DB)

    def state():
        return scope.catalog.last_index, scope.catalog.services(), scope.doc("catalog").get_state()

    before = state()
    with pytest.raises(InvalidArgument):
        await scope.register_service(bad)
    assert state() == before


async def test_registrations_and_deregistrations_replicate(pair):
    a, b = pair
    await a.register_service(WEB)
    await a.register_service(DB)
    index = b.catalog.last_index
    assert await send(a, b, "catalog") == {"node1/web-1", "node1/db"}
    assert b.catalog.services() == a.catalog.services()
    assert b.catalog.last_index > index

    await a.deregister_service("node1", "db")
    await send(a, b, "catalog")
    assert [s.service_id for s in b.catalog.services()] == ["web-1"]

    await b.register_service(OTHER_NODE)
    await send(b, a, "catalog")
    assert a.catalog.services() == b.catalog.services()
    assert len(a.catalog.services()) == 2
    # the KV documents are untouched by catalog traffic
    assert a.kv.list("") == b.kv.list("") == []


async def test_concurrent_registrations_converge_to_the_later_one(pair):
    a, b = pair  # b's clock is ahead
    await a.register_service(ServiceEntry("node1", "api", "api", "10.0.0.1", 80))
    await b.register_service(ServiceEntry("node1", "api", "api", "10.0.0.2", 81))
    await send(a, b, "catalog")
    await send(b, a, "catalog")
    for scope in pair:
        assert scope.catalog.get("node1", "api").address == "10.0.0.2"


async def test_a_deregistration_does_not_come_back_from_an_older_concurrent_registration(pair):
    a, b = pair
    await a.register_service(DB)
    await send(a, b, "catalog")
    await a.register_service(ServiceEntry("node1", "db", "postgres", "10.0.0.99", 5432))
    await b.deregister_service("node1", "db")  # later: b's clock is ahead
    await send(a, b, "catalog")
    await send(b, a, "catalog")
    for scope in pair:
        assert scope.catalog.get("node1", "db") is None
        assert scope.catalog.services() == []
