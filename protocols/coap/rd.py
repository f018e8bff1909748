"""The resource directory's CoAP interfaces (RFC 9176): ``/rd`` and ``/rd-lookup``.

- ``POST /rd?ep=<id>[&lt=<s>][&d=<sector>][&base=<uri>][&et=<type>]`` with a
  link-format payload (or none) registers; answers 2.01 with Location-Path
  ``rd/<location>``. The endpoint name is the device id, so a registration
  lands in the device registry (an unknown device is registered there when
  anonymous devices are allowed) and marks the device online.
- ``POST /rd/<location>[?lt=][&base=]`` refreshes it (2.04), ``DELETE`` removes
  it (2.02). Only the registered device may do either.
- ``GET /rd-lookup/ep`` and ``GET /rd-lookup/res`` list registrations and
  registered resources, filtered by query (``?rt=temp*``); the caller names
  itself with ``id=`` there, since ``ep`` is a filter.

A registration lapses after its lifetime: one asyncio timer, always set for
the earliest expiry, removes it and marks the device offline.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

from aiocoap import Message, resource
from aiocoap.numbers.codes import Code
from aiocoap.util.linkformat import LinkFormat, parse
from aiocoap.util.vendored.link_header import ParseException
from konsul.sync.devices import PresenceTable, check_device_id

from .access import Access, query_params
from .directory import DEFAULT_LIFETIME, MAX_LIFETIME, DirectoryFull, Registration, ResourceDirectory, check_links
from .limits import Refused, peer_source
from .errors import CoapError, ExplainedResource, bad_request

LINK_FORMAT = 40
# A registration's links, at most: a constrained device lists a handful of
# resources; every byte is kept (parsed, several times the size) until the
# registration lapses, for any address that asks (bounded in number, directory.py).
MAX_LINKS_BYTES = 2048
_REGISTRATION_PARAMS = ("ep", "d", "lt", "base", "tk")


def _lifetime(params: dict[str, str]) -> int | None:
    if "lt" not in params:
        return None
    try:
        lifetime = int(params["lt"])
    except ValueError:
        lifetime = 0
    if not 1 <= lifetime <= MAX_LIFETIME:
        raise bad_request(f"lt is a lifetime in seconds, 1 to {MAX_LIFETIME}; got {params['lt']!r}")
    return lifetime


def _base(params: dict[str, str]) -> str | None:
    base = params.get("base")
    if base is None:
        return None
    try:
        parts = urlsplit(base)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        parts = None
    if parts is None or not parts.scheme.startswith("coap") or not parts.netloc or parts.path not in ("", "/"):
        raise bad_request(f"base is the device's scheme and authority, like coap://192.0.2.1:5683; got {base!r}")
    return base.rstrip("/")


def _links(request: Message) -> LinkFormat:
    if not request.payload:
        return LinkFormat([])
    if len(request.payload) > MAX_LINKS_BYTES:
        raise CoapError(
            Code.REQUEST_ENTITY_TOO_LARGE,
            "links_too_large",
            f"a registration lists at most {MAX_LINKS_BYTES} bytes of links; this one has {len(request.payload)}",
            size1=MAX_LINKS_BYTES,
        )
    fmt = request.opt.content_format
    if fmt is not None and int(fmt) != LINK_FORMAT:
        raise CoapError(
            Code.UNSUPPORTED_CONTENT_FORMAT,
            "unsupported_content_format",
            f"a registration carries link-format (40), not content-format {int(fmt)}",
        )
    try:
        return parse(request.payload.decode("utf-8"))
    except (ParseException, UnicodeDecodeError) as exc:
        raise bad_request(f"the payload is not valid link-format (RFC 6690): {exc}", "malformed_link_format") from None


def _link_format(links: list) -> Message:
    return Message(code=Code.CONTENT, payload=str(LinkFormat(links)).encode("utf-8"), content_format=LINK_FORMAT)


class DirectoryTimer:
    """Lapses registrations when their lifetime ends (one timer for the earliest)."""

    def __init__(self, directory: ResourceDirectory, presence: PresenceTable) -> None:
        self.directory = directory
        self.presence = presence
        self._timer: asyncio.TimerHandle | None = None

    def changed(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        due = self.directory.next_expiry()
        if due is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + max(0.0, due - time.monotonic()), self._lapse)

    def removed(self, registration: Registration) -> None:
        self.presence.offline(registration.endpoint)

    def _lapse(self) -> None:
        self._timer = None
        for registration in self.directory.expire(time.monotonic()):
            self.removed(registration)
        self.changed()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class RegistrationsResource(ExplainedResource):
    """``/rd``: POST registers a device."""

    rt = "core.rd"
    ct = str(LINK_FORMAT)

    def __init__(
        self, directory: ResourceDirectory, timer: DirectoryTimer, access: Access, refused: Refused
    ) -> None:
        super().__init__()
        self.directory, self.timer, self.access = directory, timer, access
        self.refused = refused

    async def render_post(self, request: Message) -> Message:
        params = query_params(request)
        endpoint = params.get("ep")
        if not endpoint:
            raise bad_request("a registration names the device: POST /rd?ep=<device id>", "missing_endpoint")
        check_device_id(endpoint)
        lifetime = _lifetime(params) or DEFAULT_LIFETIME
        base = _base(params) or f"coap://{request.remote.hostinfo}"
        links = _links(request)
        # Before the caller is known: a refused registration must not register
        # an anonymous device either.
        check_links(base, links.links)
        await self.access.caller(request)  # authenticates ep (registers anonymous devices)
        attributes = {k: v for k, v in params.items() if k not in _REGISTRATION_PARAMS}
        source = peer_source(request.remote)
        try:
            registration, _new = self.directory.register(
                endpoint,
                sector=params.get("d", ""),
                base=base,
                lifetime=lifetime,
                links=links,
                attributes=attributes,
                now=time.monotonic(),
                source=source,
            )
        except DirectoryFull as full:
            self.refused(f"registrations_{full.bound}", source)
            where = "from this address" if full.bound == "per_source" else "on this edge"
            raise CoapError(
                Code.SERVICE_UNAVAILABLE,
                "too_many_registrations",
                f"the resource directory holds all the registrations it may {where}; "
                "remove unused ones (DELETE /rd/<location>) or wait for them to lapse",
                max_age=60,
            ) from None
        self.timer.changed()
        return Message(code=Code.CREATED, location_path=registration.path)


class RegistrationResource(ExplainedResource, resource.PathCapable):
    """``/rd/<location>``: POST refreshes, DELETE removes a registration."""

    def __init__(self, directory: ResourceDirectory, timer: DirectoryTimer, access: Access) -> None:
        super().__init__()
        self.directory, self.timer, self.access = directory, timer, access

    def get_link_description(self):
        return None  # registrations are listed by /rd-lookup/ep, not /.well-known/core

    async def _registration(self, request: Message) -> Registration:
        location = "/".join(request.opt.uri_path)
        registration = self.directory.find(location)
        if registration is None:
            raise CoapError(Code.NOT_FOUND, "not_found", f"no registration /rd/{location}; it lapsed or was removed: register again")
        await self.access.caller(request, device_id=registration.endpoint)
        return registration

    async def render_post(self, request: Message) -> Message:
        registration = await self._registration(request)
        params = query_params(request)
        self.directory.refresh(registration, now=time.monotonic(), lifetime=_lifetime(params), base=_base(params))
        self.timer.changed()
        return Message(code=Code.CHANGED)

    async def render_delete(self, request: Message) -> Message:
        registration = await self._registration(request)
        self.directory.remove(registration.location)
        self.timer.removed(registration)
        self.timer.changed()
        return Message(code=Code.DELETED)

    async def render_get(self, request: Message) -> Message:
        registration = await self._registration(request)
        return _link_format(registration.links)


class LookupResource(ExplainedResource):
    """``/rd-lookup/ep`` and ``/rd-lookup/res``."""

    ct = str(LINK_FORMAT)

    def __init__(self, directory: ResourceDirectory, access: Access, kind: str) -> None:
        super().__init__()
        self.directory, self.access, self.kind = directory, access, kind
        self.rt = f"core.rd-lookup-{kind}"

    async def render_get(self, request: Message) -> Message:
        await self.access.caller(request, name_param="id")
        filters = {k: v for k, v in query_params(request).items() if k not in ("id", "tk", "page", "count")}
        if self.kind == "ep":
            links = self.directory.lookup_endpoints(filters)
        else:
            links = self.directory.lookup_resources(filters)
        params = query_params(request)
        try:
            page, count = int(params.get("page", 0)), int(params.get("count", 0)) or None
            if page < 0 or (count is not None and count < 0):
                raise ValueError(page)
        except ValueError:
            raise bad_request("page and count are non-negative integers") from None
        if count is not None:
            links = links[page * count : (page + 1) * count]
        return _link_format(links)
