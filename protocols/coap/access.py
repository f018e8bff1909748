"""Who is asking: the device behind a CoAP request, and what it may do.

A request protected with OSCORE (RFC 8613, :mod:`.oscore_site`) comes from the
device whose security context unprotected it: nothing in the URI names or
proves it, and ``tk=`` is ignored. The context is in force only while the
device's record names it (protocols/oscore_contexts.py).

Otherwise a device names itself with the URI-Query ``ep=<device id>`` (the RFC 9176
endpoint name, used for every resource, not only ``/rd``) and proves it with
``tk=<token>``, the token ``PUT /v1/devices/<id>`` issued. That is the weak
option docs/coap.md describes: the token crosses the network in clear inside
the URI, so it is only as safe as the site's network. It is refused (4.01)
unless the agent runs with ``--coap-uri-tokens on``.

Without ``--allow-anonymous`` every request needs both. With it, a request
without a token is admitted: with ``ep`` the device is registered on first
contact (``GatewayContext.authenticate``), without ``ep`` it is an unnamed
reader. Either way the device's rights apply (``protocols/device_access.py``:
its ``KVRead``/``KVWrite`` shorthands and, with ACLs on, its linked policies;
anonymous devices get the registry's default: read everything, write nothing).

Every request of an authenticated device (or, unnamed, of an address) spends
one message of its rate (``--device-message-rate``): past it the answer is
4.29 Too Many Requests with Max-Age the seconds until there is room again.
Refusals (wrong credentials, a missing permission, the rate: at most one event
per device and second) are audited.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiocoap import Message
from aiocoap.numbers.codes import Code
from konsul.sync.devices import DEFAULT_KV_READ, DeviceRecord
from konsul.sync.errors import KonsulError

from ..device_access import LegacyRights, Rights
from ..gateway import GatewayContext
from ..rate_limit import retry_after
from .errors import CoapError, bad_request, from_konsul
from .oscore_site import oscore_device

RunTrio = Callable[..., Awaitable[Any]]

# Verified (device, token) pairs; cleared whenever the device registry changes
# (locally or from the hub), so a revoked token stops working at once.
_CACHE_LIMIT = 4096

UNNAMED = DeviceRecord("", type="anonymous", kv_read=DEFAULT_KV_READ)


# The attribute that marks a request as charged to its device's rate: an
# observation's notifications render the same request again, and must not
# spend the device's messages.
_CHARGED = "_konsul_rate_charged"


@dataclass(frozen=True, slots=True)
class Caller:
    """The device a request comes from (``device_id`` None: unnamed, anonymous)."""

    device_id: str | None
    record: DeviceRecord
    rights: Rights | None = None  # None: the record's prefixes (ACLs off)
    source: str = ""
    access: Access | None = None  # for audit events

    def check_read(self, key: str) -> None:
        self.check("key", key, "read", "kv:read")

    def check_write(self, key: str, operation: str = "kv:write") -> None:
        self.check("key", key, "write", operation)

    def check(self, resource: str, name: str, access: str, operation: str) -> None:
        rights = self.rights if self.rights is not None else LegacyRights(self.record)
        if rights.allows(resource, name, access):
            return
        if resource == "key" and isinstance(rights, LegacyRights):
            error = self._forbidden(access, name)
        else:
            error = CoapError(Code.FORBIDDEN, "permission_denied", rights.denial(resource, name, access))
        if self.access is not None:
            self.access.audit(self, operation, name, "denied", f"{error.short}: {error.detail}")
        raise error

    def check_is(self, device_id: str, access: str = "write", operation: str = "device:write") -> None:
        """The caller may act on ``device_id``'s resources: its own, or (a policy) another's."""
        if self.device_id is None or self.device_id == device_id:
            return
        if self.rights is None or isinstance(self.rights, LegacyRights):
            raise CoapError(
                Code.FORBIDDEN, "forbidden", f"device {self.device_id!r} may not act for device {device_id!r}"
            )
        self.check("device", device_id, access, operation)

    def _forbidden(self, what: str, key: str) -> CoapError:
        who = f"device {self.device_id!r}" if self.device_id else "an unnamed anonymous client"
        grant = "KVWrite" if what == "write" else "KVRead"
        hint = (
            f"; grant it with PUT /v1/devices/{self.device_id} {{\"{grant}\": [\"<prefix>\"]}}"
            if self.device_id
            else "; name the device with ep=<id> and give it an allowance"
        )
        return CoapError(Code.FORBIDDEN, "forbidden", f"{who} may not {what} {key!r}{hint}")


def query_params(request: Message) -> dict[str, str]:
    """URI-Query options as a dict (``k=v``; a bare ``k`` maps to "")."""
    params: dict[str, str] = {}
    for item in request.opt.uri_query:
        name, _, value = item.partition("=")
        params[name] = value
    return params


class Access:
    """Authenticates CoAP requests through the gateway context, with a small cache."""

    def __init__(self, gateways: GatewayContext, run_trio: RunTrio, uri_tokens: bool = False) -> None:
        self.gateways = gateways
        self.run_trio = run_trio
        self.uri_tokens = uri_tokens  # --coap-uri-tokens: admit tk= (in clear in the URI)
        self._verified: dict[tuple[str, str | None], DeviceRecord] = {}
        self._verified_at = -1
        self._addresses: dict[Any, str] = {}
        self.device_access = gateways.device_access
        self.rate = gateways.device_access.rate("coap")
        self._observations: dict[str, dict[Any, str | None]] = {}  # device -> observation -> its token

    # -- observations end with their credentials ------------------------------------

    def observed(self, request: Message, serverobservation: Any, device_id: str | None = None) -> Callable[[], None]:
        """Remember who holds ``serverobservation``; returns what forgets it (call on cancellation).

        ``device_id`` is the device a path names (used when ``ep`` is absent).
        """
        params = query_params(request)
        protected = oscore_device(request)
        caller = protected[0] if protected else params.get("ep") or device_id
        if not caller:
            return _nothing
        held = self._observations.setdefault(caller, {})
        held[serverobservation] = (_OSCORE, protected[1].hex()) if protected else params.get("tk") or None

        def forget() -> None:
            held.pop(serverobservation, None)
            if not held and self._observations.get(caller) is held:
                del self._observations[caller]

        return forget

    def devices_changed(self, keys: set[str]) -> None:
        """End the observations of devices whose token was rotated, or which were deleted."""
        for key in keys:
            if not key.startswith("d/"):
                continue  # a twin field
            held = self._observations.get(key[2:])
            if not held:
                continue
            for observation, token in list(held.items()):
                if not self.still_valid(key[2:], token):
                    held.pop(observation, None)
                    observation.trigger(Message(
                        code=Code.UNAUTHORIZED,
                        payload=b"unauthorized: this device's credentials were rotated or the device deleted; "
                                b"observe again with the new ones",
                    ), is_last=True)

    def still_valid(self, device_id: str, token: str | tuple[str, str] | None) -> bool:
        """Whether ``device_id`` with ``token`` would still be admitted (without registering anything).

        Asked when the device's record changed, for every observation it
        holds: a rotated token or OSCORE context, or a deleted device, ends them.
        ``token`` is ``(_OSCORE, sender id)`` for an observation made over OSCORE.
        """
        devices = self.gateways.scope.devices
        if isinstance(token, tuple):
            record = devices.get(device_id)
            return record is not None and record.oscore_id == token[1]
        if token:
            return devices.verify(device_id, token) is not None
        record = devices.get(device_id)
        return self.gateways.allow_anonymous and record is not None and record.type == "anonymous"

    async def caller(
        self, request: Message, device_id: str | None = None, name_param: str = "ep", acting_for: bool = False
    ) -> Caller:
        """The caller of ``request``; ``device_id`` is the device a path names.

        ``name_param`` is the query parameter that names the caller: ``ep``,
        except on the lookup interfaces, where ``ep`` is a filter and ``id``
        names the caller. With ``acting_for`` (a device's own resources) and
        ACLs on, ``ep`` may name another device than the path's: the caller
        then needs a policy granting it the path's device (``Caller.check_is``).
        Raises 4.01 for missing or wrong credentials, 4.00 for a
        contradiction, 4.29 past the device's message rate.
        """
        params = query_params(request)
        named = params.get(name_param) or None
        protected = oscore_device(request)
        if protected is not None:
            return await self._protected_caller(request, protected, named, device_id, name_param, acting_for)
        if device_id is not None and named is not None and named != device_id:
            if not (acting_for and self.device_access.enabled):
                raise bad_request(f"ep={named!r} contradicts the device {device_id!r} in the path")
            device_id = None  # the caller is ep; the path's device is what it acts on
        device_id = named or device_id
        token = params.get("tk") or None
        if device_id is None:
            if token is not None:
                raise bad_request(f"a token (tk=) needs the device id it belongs to ({name_param}=)")
            if not self.gateways.allow_anonymous:
                raise CoapError(
                    Code.UNAUTHORIZED,
                    "unauthorized",
                    f"name the device with {name_param}=<device id> and give its token with tk=<token>",
                )
            caller = Caller(None, UNNAMED, self.device_access.rights(UNNAMED), self._address(request.remote), self)
            self._charge(request, caller, "@" + _host(caller.source))
            return caller
        address = self._address(request.remote)
        if token is not None and not self.uri_tokens:
            detail = (
                "tokens in the URI (tk=) are off on this edge: protect requests with OSCORE (a context from "
                f"PUT /v1/devices/{device_id}?oscore=true) or start the agent with --coap-uri-tokens on"
            )
            self.device_access.audit(device_id, _host(address), "coap", "device:connect", device_id, "denied",
                                     f"uri_tokens_off: {detail}")
            raise CoapError(Code.UNAUTHORIZED, "uri_tokens_off", detail)
        try:
            record = await self._authenticate(device_id, token)
        except CoapError as error:
            if error.code == Code.UNAUTHORIZED:
                self.device_access.audit(device_id, _host(address), "coap", "device:connect", device_id, "denied",
                                         f"{error.short}: {error.detail}")
            raise
        self.gateways.presence.seen(device_id, "coap", address)
        caller = Caller(device_id, record, self.device_access.rights(record), address, self)
        self._charge(request, caller, device_id)
        return caller

    async def _protected_caller(
        self, request: Message, protected: tuple[str, bytes], named: str | None, device_id: str | None,
        name_param: str, acting_for: bool,
    ) -> Caller:
        """The caller of an OSCORE request: its context's device (``ep``, if given, must agree)."""
        own, sender_id = protected
        if named is not None and named != own:
            raise bad_request(f"{name_param}={named!r} contradicts the OSCORE context's device {own!r}")
        if device_id is not None and device_id != own and not (acting_for and self.device_access.enabled):
            raise bad_request(f"device {own!r} (its OSCORE context) may not act for device {device_id!r}")
        address = self._address(request.remote)
        record = self._oscore_record(own, sender_id)
        if record is None:
            detail = f"the OSCORE context of device {own!r} was rotated or the device deleted"
            self.device_access.audit(own, _host(address), "coap", "device:connect", own, "denied",
                                     f"unauthorized: {detail}")
            raise CoapError(Code.UNAUTHORIZED, "unauthorized", detail)
        self.gateways.presence.seen(own, "coap", address)
        caller = Caller(own, record, self.device_access.rights(record), address, self)
        self._charge(request, caller, own)
        return caller

    def _oscore_record(self, device_id: str, sender_id: bytes) -> DeviceRecord | None:
        """The record of ``device_id`` if it still names the context ``sender_id`` (cached as tokens are)."""
        devices = self.gateways.scope.devices
        if devices.last_index != self._verified_at or len(self._verified) >= _CACHE_LIMIT:
            self._verified.clear()
            self._verified_at = devices.last_index
        key = (device_id, _OSCORE + sender_id.hex())  # no token contains ':'
        record = self._verified.get(key)
        if record is None:
            record = devices.get(device_id)
            if record is None or record.oscore_id != sender_id.hex():
                return None
            self._verified[key] = record
        return record

    def _charge(self, request: Message, caller: Caller, key: str) -> None:
        """Spend one message of the caller's rate; 4.29 with Max-Age when it has none left."""
        if getattr(request, _CHARGED, False):
            return  # a notification of an observation: the request was charged once
        try:
            setattr(request, _CHARGED, True)
        except AttributeError:
            pass
        wait = self.rate.take(key)
        if wait is None:
            return
        seconds = retry_after(wait)
        detail = (
            f"over this device's message rate ({self.rate.rate:g}/s, burst {self.rate.burst:g}); "
            f"retry after {seconds} s (Max-Age)"
        )
        self.device_access.audit_rate_limited(
            caller.device_id or "", _host(caller.source), "coap", "/".join(request.opt.uri_path), detail
        )
        raise CoapError(Code.TOO_MANY_REQUESTS, "rate_limited", detail, max_age=seconds)

    def audit(self, caller: Caller, operation: str, resource: str, result: str = "allowed", reason: str = "") -> None:
        """One audit event for ``caller`` (nothing without an audit log)."""
        self.device_access.audit(caller.device_id, _host(caller.source), "coap", operation, resource, result, reason)

    def _address(self, remote: Any) -> str:
        # aiocoap formats a remote's address afresh on every call, which cost
        # a noticeable share of a GET; devices keep their address for a while.
        remote = getattr(remote, "underlying_address", remote)  # an OSCORE request's: the UDP peer
        key = getattr(remote, "sockaddr", None)
        if key is None:
            return remote.hostinfo
        address = self._addresses.get(key)
        if address is None:
            if len(self._addresses) >= _CACHE_LIMIT:
                self._addresses.clear()
            address = self._addresses[key] = remote.hostinfo
        return address

    async def _authenticate(self, device_id: str, token: str | None) -> DeviceRecord:
        devices = self.gateways.scope.devices
        if devices.last_index != self._verified_at or len(self._verified) >= _CACHE_LIMIT:
            self._verified.clear()
            self._verified_at = devices.last_index
        record = self._verified.get((device_id, token))
        if record is not None:
            return record
        try:
            # Usually a lookup; registering an unknown anonymous device writes
            # to the store, so this runs in trio.
            record = await self.run_trio(self.gateways.authenticate, device_id, token)
        except KonsulError as exc:
            raise from_konsul(exc) from None
        if devices.last_index == self._verified_at:
            self._verified[(device_id, token)] = record
        return record


_OSCORE = "oscore:"


def _nothing() -> None:
    pass


def _host(address: str) -> str:
    """``host`` of ``host:port`` / ``[v6]:port`` (aiocoap's hostinfo), for audit events."""
    if address.startswith("["):
        return address[1:].partition("]")[0]
    host, colon, port = address.rpartition(":")
    return host if colon and port.isdigit() and ":" not in host else address
