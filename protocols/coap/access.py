"""Who is asking: the device behind a CoAP request, and what it may do.

A device names itself with the URI-Query ``ep=<device id>`` (the RFC 9176
endpoint name, used for every resource, not only ``/rd``) and proves it with
``tk=<token>``, the token ``PUT /v1/devices/<id>`` issued. That is the weak
option docs/coap.md describes: the token crosses the network in clear inside
the URI, so it is only as safe as the site's network; OSCORE with a per-device
key is the next step.

Without ``--allow-anonymous`` every request needs both. With it, a request
without a token is admitted: with ``ep`` the device is registered on first
contact (``GatewayContext.authenticate``), without ``ep`` it is an unnamed
reader. Either way the device's KV allowance applies (anonymous devices get
the registry's default: read everything, write nothing).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiocoap import Message
from aiocoap.numbers.codes import Code
from konsul.sync.devices import DEFAULT_KV_READ, DeviceRecord
from konsul.sync.errors import KonsulError

from ..gateway import GatewayContext
from .errors import CoapError, bad_request, from_konsul

RunTrio = Callable[..., Awaitable[Any]]

# Verified (device, token) pairs; cleared whenever the device registry changes
# (locally or from the hub), so a revoked token stops working at once.
_CACHE_LIMIT = 4096

UNNAMED = DeviceRecord("", type="anonymous", kv_read=DEFAULT_KV_READ)


@dataclass(frozen=True, slots=True)
class Caller:
    """The device a request comes from (``device_id`` None: unnamed, anonymous)."""

    device_id: str | None
    record: DeviceRecord

    def check_read(self, key: str) -> None:
        if not self.record.may_read(key):
            raise self._forbidden("read", key)

    def check_write(self, key: str) -> None:
        if not self.record.may_write(key):
            raise self._forbidden("write", key)

    def check_is(self, device_id: str) -> None:
        if self.device_id is not None and self.device_id != device_id:
            raise CoapError(
                Code.FORBIDDEN, "forbidden", f"device {self.device_id!r} may not act for device {device_id!r}"
            )

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

    def __init__(self, gateways: GatewayContext, run_trio: RunTrio) -> None:
        self.gateways = gateways
        self.run_trio = run_trio
        self._verified: dict[tuple[str, str | None], DeviceRecord] = {}
        self._verified_at = -1
        self._addresses: dict[Any, str] = {}

    async def caller(self, request: Message, device_id: str | None = None, name_param: str = "ep") -> Caller:
        """The caller of ``request``; ``device_id`` is the device a path names.

        ``name_param`` is the query parameter that names the caller: ``ep``,
        except on the lookup interfaces, where ``ep`` is a filter and ``id``
        names the caller. Raises 4.01 for missing or wrong credentials, 4.00
        for a contradiction.
        """
        params = query_params(request)
        named = params.get(name_param) or None
        if device_id is not None and named is not None and named != device_id:
            raise bad_request(f"ep={named!r} contradicts the device {device_id!r} in the path")
        device_id = device_id or named
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
            return Caller(None, UNNAMED)
        record = await self._authenticate(device_id, token)
        self.gateways.presence.seen(device_id, "coap", self._address(request.remote))
        return Caller(device_id, record)

    def _address(self, remote: Any) -> str:
        # aiocoap formats a remote's address afresh on every call, which cost
        # a noticeable share of a GET; devices keep their address for a while.
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
