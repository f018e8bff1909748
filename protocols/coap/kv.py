"""``/kv/<key>``: the site's KV store for devices (GET + Observe, PUT, DELETE).

The key is the rest of the path (``/kv/a/b`` is key ``a/b``); ``?dc=global``
addresses the fleet-wide scope. Values travel in the formats of
:mod:`.formats`. The ETag of a representation is the key's ModifyIndex and
the format, so ``If-Match`` on a PUT or DELETE is a check-and-set (Consul's
``?cas=``) and ``If-None-Match`` creates only if absent.

Observe: the agent calls :meth:`KvResource.changed` with the keys of every
durable change, whatever made it (HTTP, MQTT, CoAP, the hub, TTL expiry), and
each observation of those keys gets a fresh notification. A deleted key ends
its observations with 4.04, as RFC 7641 prescribes for a resource gone.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

from aiocoap import Message, resource
from aiocoap.numbers.codes import Code
from konsul.sync.errors import KonsulError
from konsul.sync.limits import check_key, check_value
from konsul.sync.replica import GLOBAL_SCOPE
from konsul.sync.scope import Scope

from ..gateway import GatewayContext
from .access import Access, RunTrio, query_params
from .blocks import first_block
from .errors import CoapError, ExplainedResource, from_konsul
from .limits import ObserverAdmission, serve_without_observing
from .formats import (
    VALUE_FORMATS,
    request_format,
    response_format,
    value_from_payload,
    value_to_payload,
)


class PutSoon(Protocol):
    """An unconditional put handed to the scope without crossing into trio (boundary.py).

    Returns an awaitable that resolves once the put is durable (``Scope.kv_submit``).
    """

    def __call__(self, scope: Scope, key: str, value: bytes) -> Awaitable[None]: ...


def make_etag(modify_index: int, fmt: int) -> bytes:
    tag = (modify_index << 8) | fmt
    return tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")


def etag_index(etag: bytes) -> int:
    return int.from_bytes(etag, "big") >> 8


class KvResource(ExplainedResource, resource.ObservableResource, resource.PathCapable):
    """Every key below ``/kv``; observations are kept per (scope, key)."""

    rt = "konsul.kv"
    ct = " ".join(str(f) for f in VALUE_FORMATS)

    def __init__(
        self,
        gateways: GatewayContext,
        access: Access,
        run_trio: RunTrio,
        put_soon: PutSoon,
        observers: ObserverAdmission,
    ) -> None:
        super().__init__()
        self.gateways = gateways
        self.observers = observers  # the bounds on registrations, shared with /devices
        self.access = access
        self.run_trio = run_trio
        # Unconditional puts join the scope's put group without crossing into trio.
        self.put_soon = put_soon
        self._watching: dict[tuple[str, str], set] = {}

    # -- Observe -------------------------------------------------------------------

    async def add_observation(self, request: Message, serverobservation) -> None:
        try:
            scope, key = self._target(request)
        except CoapError:
            serve_without_observing(serverobservation)
            return  # render answers the error
        source = self.observers.admit(request)
        if source is None:  # past the bounds: answered as a plain GET (limits.ObserverAdmission)
            serve_without_observing(serverobservation)
            return
        watch = (scope.name, key)
        watchers = self._watching.setdefault(watch, set())
        watchers.add(serverobservation)
        forget = self.access.observed(request, serverobservation)

        def cancelled() -> None:
            forget()
            self.observers.release(source)
            watchers.discard(serverobservation)
            if not watchers and self._watching.get(watch) is watchers:
                del self._watching[watch]

        serverobservation.accept(cancelled)

    def changed(self, scope_name: str, keys: set[str]) -> None:
        """Notify the observers of ``keys`` (called once the change is durable)."""
        if not self._watching:
            return
        for key in keys:
            for observation in list(self._watching.get((scope_name, key), ())):
                observation.trigger()

    @property
    def observations(self) -> int:
        return sum(len(watchers) for watchers in self._watching.values())

    # -- methods ---------------------------------------------------------------------

    async def render_get(self, request: Message) -> Message:
        caller = await self.access.caller(request)
        scope, key = self._target(request)
        caller.check_read(key)
        fmt = response_format(request, VALUE_FORMATS)
        entry = scope.kv.get(key)
        if entry is None:
            raise CoapError(Code.NOT_FOUND, "not_found", f"no key {key!r} in scope {scope.name!r}")
        etag = make_etag(entry.modify_index, fmt)
        if request.opt.observe is None and etag in request.opt.etags:
            return Message(code=Code.VALID, etag=etag)
        response = Message(code=Code.CONTENT, payload=value_to_payload(entry.value, fmt), content_format=fmt, etag=etag)
        if request.opt.observe is not None:
            return first_block(request, response, self._block2)
        return response

    async def render_put(self, request: Message) -> Message:
        caller = await self.access.caller(request)
        scope, key = self._target(request)
        caller.check_write(key)
        fmt = request_format(request, VALUE_FORMATS)
        value = value_from_payload(request.payload, fmt)
        check_value(value)
        cas = self._cas(request, scope, key)
        if cas is None:
            # A put submitted before and not yet durable is in memory already.
            existed = scope.kv.get(key) is not None
            await self.put_soon(scope, key, value)  # resolves once durable
        else:
            existed = scope.kv.get(key) is not None
            if not await self.run_trio(scope.kv_put, key, value, cas=cas):
                raise self._precondition_failed(key)
        self.access.audit(caller, "kv:write", key)
        entry = scope.kv.get(key)
        etag = make_etag(entry.modify_index, fmt) if entry else None
        return Message(code=Code.CHANGED if existed else Code.CREATED, etag=etag)

    async def render_delete(self, request: Message) -> Message:
        caller = await self.access.caller(request)
        scope, key = self._target(request)
        caller.check_write(key, "kv:delete")
        cas = self._cas(request, scope, key)
        if cas == 0:
            raise CoapError(Code.BAD_REQUEST, "bad_request", "If-None-Match makes no sense on a DELETE")
        if not await self.run_trio(scope.kv_delete, key, cas=cas):
            raise self._precondition_failed(key)
        self.access.audit(caller, "kv:delete", key)
        return Message(code=Code.DELETED)

    # -- helpers -------------------------------------------------------------------

    def _target(self, request: Message) -> tuple[Scope, str]:
        key = "/".join(request.opt.uri_path)
        try:
            check_key(key)
        except KonsulError as exc:
            raise from_konsul(exc) from None
        dc = query_params(request).get("dc") or self.gateways.site
        if dc == self.gateways.site:
            return self.gateways.scope, key
        if dc == GLOBAL_SCOPE:
            return self.gateways.global_scope, key
        raise CoapError(
            Code.NOT_FOUND,
            "unknown_scope",
            f"this edge holds site {self.gateways.site!r} and {GLOBAL_SCOPE!r}; ask the hub for {dc!r}",
        )

    def _cas(self, request: Message, scope: Scope, key: str) -> int | None:
        """The check-and-set index the conditional options ask for (None: unconditional)."""
        if request.opt.if_none_match:
            return 0
        if not request.opt.if_match:
            return None
        etag = request.opt.if_match[0]
        if etag:
            return etag_index(etag)
        # an empty If-Match means "if it exists, whatever its version"
        entry = scope.kv.get(key)
        if entry is None:
            raise self._precondition_failed(key)
        return entry.modify_index

    @staticmethod
    def _precondition_failed(key: str) -> CoapError:
        return CoapError(
            Code.PRECONDITION_FAILED,
            "precondition_failed",
            f"{key!r} changed since the ETag given (or exists, with If-None-Match); GET it and retry",
        )
