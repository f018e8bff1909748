"""The resource directory keeps only links it can resolve, and lists what it keeps."""

from __future__ import annotations

import pytest
from aiocoap.util.linkformat import Link, parse

from konsul.protocols.coap.directory import InvalidLink, ResourceDirectory

BASE = "coap://192.0.2.1:5683"


def _register(directory: ResourceDirectory, links: str, endpoint: str = "dev-1"):
    return directory.register(
        endpoint, sector="", base=BASE, lifetime=60, links=parse(links), attributes={}, now=0.0
    )


@pytest.mark.parametrize("links", ["<//[>", '</a>;anchor="//][",</b>', "<coap://[::1/x>"])
def test_a_link_that_does_not_resolve_is_refused_and_nothing_changes(links):
    directory = ResourceDirectory()
    registration, _ = _register(directory, "</a>")
    with pytest.raises(InvalidLink):
        _register(directory, links)  # a new registration of the same endpoint: replaced only if valid
    with pytest.raises(InvalidLink):
        _register(directory, links, "dev-2")
    assert list(directory.registrations.values()) == [registration]
    assert [link.href for link in registration.links] == ["/a"]


def test_a_stored_link_that_does_not_resolve_is_left_out_of_lookups():
    directory = ResourceDirectory()
    registration, _ = _register(directory, '</a>;rt="t"')
    registration.links.append(Link("//[", [["rt", "t"]]))  # as if stored before links were checked
    assert [link.href for link in directory.lookup_resources({"rt": "t"})] == [BASE + "/a"]


def test_a_refreshed_base_resolves_the_registered_links():
    directory = ResourceDirectory()
    registration, _ = _register(directory, "<x>")
    directory.refresh(registration, now=1.0, lifetime=None, base="coap://192.0.2.2")
    assert registration.base == "coap://192.0.2.2"
    assert [link.href for link in directory.lookup_resources({})] == ["coap://192.0.2.2/x"]
