"""The CoAP gateway's bounds on observers and registrations, in total as well as per source."""

from __future__ import annotations

from types import SimpleNamespace

from aiocoap.util.linkformat import LinkFormat

from konsul.protocols.admission import ConnectionLimit
from konsul.protocols.coap.directory import DirectoryFull, ResourceDirectory
from konsul.protocols.coap.limits import ObserverAdmission, peer_source


def request_from(host: str):
    return SimpleNamespace(remote=SimpleNamespace(sockaddr=(host, 5683, 0, 0)))


def test_peer_source_drops_the_ipv4_mapping() -> None:
    assert peer_source(("::ffff:192.0.2.1", 5683, 0, 0)) == "192.0.2.1"
    assert peer_source(SimpleNamespace(sockaddr=("2001:db8::1", 5683, 0, 0))) == "2001:db8::1"


def test_observers_past_the_total_are_refused_and_released_places_come_back() -> None:
    refused: list[str] = []
    observers = ObserverAdmission(total=3, per_source=2, refused=lambda reason, source: refused.append(reason))
    admitted = [observers.admit(request_from(f"::ffff:10.0.0.{n}")) for n in range(3)]
    assert admitted == ["10.0.0.0", "10.0.0.1", "10.0.0.2"]
    assert observers.admit(request_from("10.0.0.9")) is None and refused == ["observers_total"]
    observers.release("10.0.0.1")
    assert observers.admit(request_from("10.0.0.9")) == "10.0.0.9"
    assert observers.admit(request_from("10.0.0.9")) is None and refused[-1] == "observers_total"
    observers.release("10.0.0.0")
    assert observers.admit(request_from("10.0.0.9")) == "10.0.0.9"  # its second place
    observers.release("10.0.0.2")
    assert observers.admit(request_from("10.0.0.9")) is None and refused[-1] == "observers_per_source"


def test_registrations_are_bounded_and_removal_or_lapse_gives_places_back() -> None:
    directory = ResourceDirectory(ConnectionLimit(total=3, per_source=2))

    def register(endpoint: str, source: str, now: float = 0.0):
        return directory.register(
            endpoint, sector="", base="coap://x", lifetime=10, links=LinkFormat([]), attributes={}, now=now, source=source
        )

    first, _ = register("a", "s1")
    register("b", "s1")
    try:
        register("c", "s1")
    except DirectoryFull as full:
        assert full.bound == "per_source"
    else:
        raise AssertionError("a third registration from s1 was accepted")
    assert register("a", "s1")[1] is False  # registering again is an update, always allowed
    register("c", "s2", now=5.0)
    try:
        register("d", "s3")
    except DirectoryFull as full:
        assert full.bound == "total"
    else:
        raise AssertionError("a registration past the total was accepted")
    directory.remove(first.location)
    register("d", "s3")
    assert {r.endpoint for r in directory.expire(now=12.0)} == {"b", "d"}
    register("e", "s1", now=12.0)
    register("f", "s1", now=12.0)
