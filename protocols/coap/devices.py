"""``/devices/<id>/telemetry``, ``/reported`` and ``/desired``: the device twin over CoAP.

Storage of telemetry and of the twin belongs to the agent, not to this
gateway: it validates documents (a CBOR map or a JSON object), counts them and
hands them to the hooks the agent installs in ``gateways.hooks`` (``DeviceHooks``):

- ``on_telemetry(device_id, document)`` and ``on_reported(device_id, document
  [, replace])``, plain functions or trio async functions (a PUT of reported
  state passes ``replace=True``; a POST merges);
- ``desired_state(device_id) -> dict``, read for every GET and notification of
  ``/desired``;

and it installs ``gateways.push.notify_desired(device_id)`` (chained to any
notifier already there), which the agent calls when a device's desired state
changes, to notify its observers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from aiocoap import Message, resource
from aiocoap.numbers.codes import Code
from konsul.sync.devices import check_device_id

from ..gateway import GatewayContext
from .access import Access, Caller, RunTrio
from .errors import CoapError, ExplainedResource
from .limits import ObserverAdmission, serve_without_observing
from .formats import (
    DOCUMENT_FORMATS,
    document_from_payload,
    document_to_payload,
    request_format,
    response_format,
)

KINDS = ("telemetry", "reported", "desired")
_OPERATIONS = {"telemetry": "telemetry:write", "reported": "twin:reported"}  # audited operation names
_METHODS = {"telemetry": ("POST",), "reported": ("POST", "PUT"), "desired": ("GET",)}


class DeviceResource(ExplainedResource, resource.ObservableResource, resource.PathCapable):
    """Everything below ``/devices``; observations of ``desired`` are kept per device."""

    rt = "konsul.device"
    ct = " ".join(str(f) for f in DOCUMENT_FORMATS)

    def __init__(
        self,
        gateways: GatewayContext,
        access: Access,
        run_trio: RunTrio,
        counted: Callable[[str], None],
        observers: ObserverAdmission,
    ) -> None:
        super().__init__()
        self.gateways = gateways
        self.observers = observers  # the bounds on registrations, shared with /kv
        self.access = access
        self.run_trio = run_trio
        self.counted = counted
        self._watching: dict[str, set] = {}

    # -- Observe of desired ------------------------------------------------------------

    async def add_observation(self, request: Message, serverobservation) -> None:
        path = request.opt.uri_path
        if len(path) != 2 or path[1] != "desired":
            serve_without_observing(serverobservation)
            return  # only desired state is observable; render answers the rest
        source = self.observers.admit(request)
        if source is None:  # past the bounds: answered as a plain GET (limits.ObserverAdmission)
            serve_without_observing(serverobservation)
            return
        watchers = self._watching.setdefault(path[0], set())
        watchers.add(serverobservation)
        forget = self.access.observed(request, serverobservation, path[0])

        def cancelled() -> None:
            forget()
            self.observers.release(source)
            watchers.discard(serverobservation)
            if not watchers and self._watching.get(path[0]) is watchers:
                del self._watching[path[0]]

        serverobservation.accept(cancelled)

    @property
    def observations(self) -> int:
        return sum(len(watchers) for watchers in self._watching.values())

    def notify_desired(self, device_id: str) -> None:
        for observation in list(self._watching.get(device_id, ())):
            observation.trigger()

    # -- methods -------------------------------------------------------------------------

    async def render_get(self, request: Message) -> Message:
        device_id, _kind, _caller = await self._target(request, "GET")
        fmt = response_format(request, DOCUMENT_FORMATS)
        document = self.gateways.hooks.desired_state(device_id) or {}
        return Message(code=Code.CONTENT, payload=document_to_payload(document, fmt), content_format=fmt)

    async def render_post(self, request: Message) -> Message:
        device_id, kind, caller = await self._target(request, "POST")
        document = document_from_payload(request.payload, request_format(request, DOCUMENT_FORMATS))
        await self._hand_over(kind, device_id, document)
        self.access.audit(caller, _OPERATIONS[kind], device_id)  # one event per request, not per sample
        return Message(code=Code.CHANGED)

    async def render_put(self, request: Message) -> Message:
        device_id, kind, caller = await self._target(request, "PUT")
        document = document_from_payload(request.payload, request_format(request, DOCUMENT_FORMATS))
        await self._hand_over(kind, device_id, document, replace=True)
        self.access.audit(caller, _OPERATIONS[kind], device_id)
        return Message(code=Code.CHANGED)

    # -- helpers -------------------------------------------------------------------------

    async def _target(self, request: Message, method: str) -> tuple[str, str, Caller]:
        path = request.opt.uri_path
        if len(path) != 2 or path[1] not in KINDS:
            raise CoapError(
                Code.NOT_FOUND,
                "not_found",
                "device resources are /devices/<id>/telemetry, /reported and /desired",
            )
        device_id, kind = path
        check_device_id(device_id)
        if method not in _METHODS[kind]:
            raise CoapError(
                Code.METHOD_NOT_ALLOWED,
                "method_not_allowed",
                f"/devices/<id>/{kind} takes {' or '.join(_METHODS[kind])}",
            )
        # With ACLs on, ep= may name another device than the path's (a gateway
        # device reporting for the sensors behind it): a policy must grant it.
        caller = await self.access.caller(request, device_id=device_id, acting_for=True)
        if method == "GET":
            caller.check_is(device_id, "read", "device:read")
        else:
            caller.check_is(device_id, "write", _OPERATIONS[kind])
        return device_id, kind, caller

    async def _hand_over(self, kind: str, device_id: str, document: dict[str, Any], replace: bool = False) -> None:
        """Give a document to the agent's hook; a PUT of reported state replaces it (POST merges)."""
        self.counted(kind)
        hook = self.gateways.hooks.on_document(kind)
        if hook is None:
            return
        args = (device_id, document, True) if replace else (device_id, document)
        if inspect.iscoroutinefunction(hook):
            await self.run_trio(hook, *args)
        else:
            hook(*args)
