"""The resource directory's bookkeeping (protocols/coap/directory.py), without I/O or waiting."""

from __future__ import annotations

from aiocoap.util.linkformat import parse
from konsul.protocols.coap.directory import ResourceDirectory, matches, resolve


def register(directory: ResourceDirectory, endpoint: str, now: float, lifetime: int = 60, links: str = ""):
    return directory.register(
        endpoint, sector="", base="coap://192.0.2.1:5683", lifetime=lifetime, links=parse(links), attributes={}, now=now
    )


def test_registrations_lapse_at_their_lifetime():
    directory = ResourceDirectory()
    short, _ = register(directory, "a", now=100.0, lifetime=5)
    register(directory, "b", now=100.0, lifetime=50)
    assert directory.next_expiry() == 105.0
    assert directory.expire(104.9) == []
    assert directory.expire(105.0) == [short]
    assert directory.next_expiry() == 150.0


def test_refresh_restarts_the_lifetime_and_reregistration_keeps_the_location():
    directory = ResourceDirectory()
    first, new = register(directory, "a", now=0.0, lifetime=10)
    assert new
    directory.refresh(first, now=8.0, lifetime=None, base=None)
    assert directory.expire(15.0) == [] and first.expires == 18.0
    again, new = register(directory, "a", now=9.0, lifetime=30)
    assert not new and again.location == first.location and again.expires == 39.0


def test_resource_lookup_resolves_links_against_the_base():
    directory = ResourceDirectory()
    register(directory, "lamp", now=0.0, links='</light>;rt="light";if="core.a",</temp>;rt="temperature"')
    register(directory, "fan", now=0.0, links='</speed>;rt="speed"')
    found = [str(link) for link in directory.lookup_resources({"rt": "light"})]
    assert found == ['<coap://192.0.2.1:5683/light>;rt="light";if="core.a";anchor="coap://192.0.2.1:5683"']
    assert len(directory.lookup_resources({"ep": "lamp"})) == 2
    assert len(directory.lookup_resources({"rt": "t*"})) == 1
    assert next(str(link) for link in directory.lookup_endpoints({"ep": "f*"})).startswith("</rd/")


def test_filters_and_resolution():
    assert matches([["rt", "a b"], ["ep", "x"]], {"rt": "b", "ep": "x"})
    assert not matches([["rt", "a b"]], {"rt": "c"})
    assert matches([["rt", "temperature"]], {"rt": "temp*"})
    assert resolve("coap://h:1", "/p") == "coap://h:1/p"
    assert resolve("coap://h:1", "coap://other/p") == "coap://other/p"
    assert resolve("coap://h:1", "p") == "coap://h:1/p"
