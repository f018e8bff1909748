"""The resource directory's registrations (RFC 9176), without any I/O.

A registration is presence, not user-authored state: it lapses after its
lifetime and is rebuilt by the device's next registration, so it lives in
memory (DESIGN.md, decision 5). The device it names is in the durable device
registry; the CoAP resources mark it online while a registration lives and
offline when it is removed or lapses. Time comes in as ``now`` (seconds on a
monotonic clock) so that expiry is testable without waiting.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from aiocoap.util.linkformat import Link, LinkFormat
from konsul.sync.errors import InvalidArgument

from ..admission import ConnectionLimit

DEFAULT_LIFETIME = 90000  # seconds; RFC 9176 5.3
MAX_LIFETIME = 2**32 - 1


@dataclass
class Registration:
    location: str  # the last path segment of /rd/<location>
    endpoint: str
    sector: str
    base: str
    lifetime: int
    expires: float
    links: list[Link] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)  # et and extra query parameters
    source: str = ""  # the address that registered it, which it counts against

    @property
    def path(self) -> tuple[str, str]:
        return ("rd", self.location)

    def endpoint_link(self) -> Link:
        pairs = [["ep", self.endpoint], ["base", self.base], ["lt", str(self.lifetime)]]
        if self.sector:
            pairs.append(["d", self.sector])
        pairs.extend([name, value] for name, value in self.attributes.items())
        return Link("/rd/" + self.location, pairs)

    def resource_links(self) -> list[Link]:
        """The registered links with absolute targets, anchored at the device (RFC 9176 6.1).

        A link that does not resolve is left out rather than failing the whole
        lookup: :meth:`ResourceDirectory.register` refuses such links, so one
        can only be here if the rules were looser when it was registered.
        """
        resolved = []
        for link in self.links:
            try:
                resolved.append(resolved_link(self.base, link))
            except ValueError:
                continue
        return resolved


def resolved_link(base: str, link: Link) -> Link:
    """``link`` with its target and anchor made absolute against ``base``; ValueError if one is no URL."""
    pairs = [[k, v] for k, v in link.attr_pairs if k != "anchor"]
    anchor = dict(link.attr_pairs).get("anchor")
    pairs.append(["anchor", resolve(base, anchor) if anchor else base])
    return Link(resolve(base, link.href), pairs)


def resolve(base: str, reference: str) -> str:
    """``reference`` made absolute against ``base`` (urljoin knows no coap:// scheme).

    Raises ValueError when ``reference`` or the result is not a URL that
    ``urlsplit`` reads (``//[``: an unclosed IPv6 literal), so that what is
    resolved once can be read by every client that looks it up.
    """
    if urlsplit(reference).scheme:
        return reference
    parts = urlsplit(base)
    if reference.startswith("/"):
        absolute = f"{parts.scheme}://{parts.netloc}{reference}"
    else:
        absolute = base.rstrip("/") + "/" + reference
    urlsplit(absolute)
    return absolute


class InvalidLink(InvalidArgument):
    """A registered link whose target or anchor is not a URL (answered 4.00)."""

    code = "invalid_link"


def check_links(base: str, links: Iterable[Link]) -> None:
    """Raise :class:`InvalidLink` unless every link resolves against ``base``.

    aiocoap's link-format parser takes any text between ``<`` and ``>``; a
    target that is no URL would otherwise be stored and break every lookup
    that lists it, for every device, until the registration lapses.
    """
    for link in links:
        try:
            resolved_link(base, link)
        except ValueError as error:
            raise InvalidLink(
                f"the link <{link.href[:60]}> does not resolve against {base[:60]} ({error}); "
                "register links whose targets and anchors are URIs or paths (RFC 6690)"
            ) from None


def matches(pairs: Iterable[list[str]], filters: dict[str, str]) -> bool:
    """RFC 9176 7.2 filtering: every filter matches some value; a trailing ``*`` is a prefix match."""
    values: dict[str, list[str]] = {}
    for name, value in pairs:
        values.setdefault(name, []).extend((value or "").split(" ") if name in ("rt", "if") else [value or ""])
    for name, wanted in filters.items():
        found = values.get(name, [])
        if wanted.endswith("*"):
            if not any(v.startswith(wanted[:-1]) for v in found):
                return False
        elif wanted not in found:
            return False
    return True


class DirectoryFull(Exception):
    """A new registration would pass a bound: ``bound`` is "per_source" or "total"."""

    def __init__(self, bound: str) -> None:
        super().__init__(bound)
        self.bound = bound


class ResourceDirectory:
    """Registrations by location, one per (sector, endpoint).

    New registrations are bounded per source address and in total
    (``ConnectionLimit``; none when ``limit`` is None): registrations are
    unauthenticated state that any address can create.
    """

    def __init__(self, limit: ConnectionLimit | None = None) -> None:
        self.registrations: dict[str, Registration] = {}
        self._by_endpoint: dict[tuple[str, str], Registration] = {}
        self.limit = limit

    def find(self, location: str) -> Registration | None:
        return self.registrations.get(location)

    def register(
        self,
        endpoint: str,
        *,
        sector: str,
        base: str,
        lifetime: int,
        links: LinkFormat,
        attributes: dict[str, str],
        now: float,
        source: str = "",
    ) -> tuple[Registration, bool]:
        """Add or replace the endpoint's registration; returns it and whether it is new.

        A device that registers again (after a reboot, say) keeps its location,
        as RFC 9176 5.3 allows, so lookups do not see it twice. A new one past
        a bound raises :class:`DirectoryFull`, a link that does not resolve
        :class:`InvalidLink`; either way nothing changes.
        """
        check_links(base, links.links)
        existing = self._by_endpoint.get((sector, endpoint))
        if existing is not None:
            existing.base, existing.lifetime = base, lifetime
            existing.expires = now + lifetime
            existing.links, existing.attributes = list(links.links), attributes
            return existing, False
        if self.limit is not None:
            bound = self.limit.try_admit(source)
            if bound is not None:
                raise DirectoryFull(bound)
        location = secrets.token_hex(4)
        while location in self.registrations:
            location = secrets.token_hex(4)
        registration = Registration(
            location, endpoint, sector, base, lifetime, now + lifetime, list(links.links), attributes, source
        )
        self.registrations[location] = registration
        self._by_endpoint[(sector, endpoint)] = registration
        return registration, True

    def refresh(self, registration: Registration, *, now: float, lifetime: int | None, base: str | None) -> None:
        """A registration update (RFC 9176 5.3.1): new lifetime and base, timer restarted.

        A new base must resolve every registered link (:class:`InvalidLink`).
        """
        if base is not None:
            check_links(base, registration.links)
        if lifetime is not None:
            registration.lifetime = lifetime
        if base is not None:
            registration.base = base
        registration.expires = now + registration.lifetime

    def remove(self, location: str) -> Registration | None:
        registration = self.registrations.pop(location, None)
        if registration is not None:
            self._forget(registration)
        return registration

    def expire(self, now: float) -> list[Registration]:
        """Remove and return the registrations whose lifetime has passed."""
        lapsed = [r for r in self.registrations.values() if r.expires <= now]
        for registration in lapsed:
            del self.registrations[registration.location]
            self._forget(registration)
        return lapsed

    def _forget(self, registration: Registration) -> None:
        self._by_endpoint.pop((registration.sector, registration.endpoint), None)
        if self.limit is not None:
            self.limit.release(registration.source)

    def next_expiry(self) -> float | None:
        return min((r.expires for r in self.registrations.values()), default=None)

    def lookup_endpoints(self, filters: dict[str, str]) -> list[Link]:
        links = (r.endpoint_link() for r in self._in_order())
        return [link for link in links if matches(link.attr_pairs, filters)]

    def lookup_resources(self, filters: dict[str, str]) -> list[Link]:
        """Registered links matching ``filters``; endpoint filters (ep, d, et) select devices."""
        endpoint_filters = {k: v for k, v in filters.items() if k in ("ep", "d", "et", "base")}
        link_filters = {k: v for k, v in filters.items() if k not in endpoint_filters}
        found = []
        for registration in self._in_order():
            if not matches(registration.endpoint_link().attr_pairs, endpoint_filters):
                continue
            for link in registration.resource_links():
                if matches([*link.attr_pairs, ["href", link.href]], link_filters):
                    found.append(link)
        return found

    def _in_order(self) -> list[Registration]:
        return sorted(self.registrations.values(), key=lambda r: (r.sector, r.endpoint))
