"""The CoAP resource tree of an edge, its discovery listing and its metrics.

Everything here runs on the asyncio side; the only way into trio is the
``run_trio`` function :mod:`.boundary` hands in.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

from aiocoap import Message, error, resource
from konsul.sync.log_limits import peer_log
from aiocoap.options import Options
from aiocoap.util.linkformat import Link, LinkFormat
from prometheus_client import CollectorRegistry, Counter, Gauge

from ..admission import ConnectionLimit
from ..gateway import GatewayContext

if TYPE_CHECKING:
    from ..oscore_contexts import OscoreContexts
from .access import Access, RunTrio
from .blocks import LimitedBlock1Spool, LimitedBlock2Cache, TransferBudget, check_block_options
from .devices import DeviceResource
from .directory import ResourceDirectory
from .errors import with_diagnostic
from .kv import KvResource, PutSoon
from .limits import ObserverAdmission
from .oscore_site import OscoreSite
from .rd import (
    DirectoryTimer,
    LookupResource,
    RegistrationResource,
    RegistrationsResource,
)


class CoapMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter("konsul_coap_requests", "CoAP requests by method", ["method"], registry=registry)
        self.errors = Counter("konsul_coap_errors", "CoAP error responses by code", ["code"], registry=registry)
        self.documents = Counter(
            "konsul_coap_device_documents", "Telemetry samples and reported states accepted", ["kind"], registry=registry
        )
        self.registrations = Gauge("konsul_coap_registrations", "Live resource-directory registrations", registry=registry)
        self.observations = Gauge("konsul_coap_observations", "Live CoAP observations", registry=registry)
        self.refused = Counter(
            "konsul_coap_refused",
            "CoAP input refused or limited before it could cost more, by reason",
            ["reason"],
            registry=registry,
        )


def responder_pipe(requester: Any, log: logging.Logger) -> Any:
    """aiocoap's ``pipe.error_to_message``, without its crash on a requester gone mid-response.

    The render task writes into the pipe this returns; each response is
    forwarded to ``requester``, the pipe of the request, and an error becomes
    an error response. aiocoap's version keeps forwarding (returns "call me
    again") after a non-final response even when forwarding it ended the
    requester: when the send fails, aiocoap ends the exchanges of that remote
    at once, inside the send, which unregisters this pipe's only listener
    while the pipe is still running its listeners. The pipe then asks an ended
    listener list for interest -- ``TypeError: 'bool' object is not
    iterable`` -- and, reporting that, calls the logger with an argument it
    does not take, which escaped the render task and ended the agent (an
    observer that closed its socket, then HTTP writes to the key it had
    observed). Here a listener says "again" only while the requester still
    listens, and an event for an ended pipe is dropped.
    """
    from aiocoap import pipe as pipes
    from aiocoap.numbers.codes import Code as Codes

    responder = pipes.Pipe(requester.request, log)

    def still_listening(pipe: Any) -> bool:
        return pipe._event_callbacks is not False

    def on_event(event: Any) -> bool:
        if not still_listening(requester):
            return False
        if event.message is not None:
            requester.add_response(event.message, event.is_last)
            return not event.is_last and still_listening(requester)
        exc = event.exception
        if isinstance(exc, error.RenderableError):
            try:
                message = exc.to_message()
            except Exception as failure:  # noqa: BLE001 - an error that cannot render itself
                log.error("rendering the error %r failed: %r", exc, failure)
                message = None
            requester.add_response(message or Message(code=Codes.INTERNAL_SERVER_ERROR), is_last=True)
        elif exc is not None:
            # A bug, not a peer's mistake; a peer can still repeat it: rate-limited
            peer_log.log(log, logging.ERROR, ("coap_render_error", type(exc).__name__),
                         "an exception occurred while rendering a CoAP resource: %r", exc)
            log.debug("the exception", exc_info=exc)
            requester.add_response(
                Message(code=Codes.INTERNAL_SERVER_ERROR, payload=b"internal_error: the edge failed to answer; it logged why"),
                is_last=True,
            )
        return False

    add_event = responder._add_event

    def add_event_while_listened(event: Any) -> None:
        if responder._event_callbacks is False:
            return  # the requester is gone: nothing to forward to, nothing to log
        add_event(event)

    responder._add_event = add_event_while_listened
    remove_interest = responder.on_event(on_event)
    requester.on_interest_end(remove_interest)
    return responder


def _with_path(request: Message, path: tuple[str, ...]) -> Message:
    """``request.copy(uri_path=path)`` without deep-copying every option.

    ``Message.copy`` deep-copies the options, which was a tenth of the CPU of
    a PUT with a few path segments and query parameters; option values are
    never mutated in place, so copying the per-number lists is enough.
    """
    stripped = copy.copy(request)
    options = Options()
    options._options = {number: list(values) for number, values in request.opt._options.items()}
    stripped.opt = options
    options.uri_path = path
    return stripped


class EdgeSite(resource.Site):
    """The root: dispatches, counts, and gives every error a diagnostic payload."""

    def __init__(self, metrics: CoapMetrics) -> None:
        super().__init__()
        self.metrics = metrics
        self._counters: dict[object, Counter] = {}

    def _find_child_and_pathstripped_message(self, request):
        """aiocoap's dispatch, without formatting the request's URI for every request.

        aiocoap keeps the URI for ``get_request_uri`` on stripped requests,
        which nothing here calls; the formatting was a measurable share of a GET.
        """
        path = request.opt.uri_path
        if path in self._resources:
            return self._resources[path], _with_path(request, ())
        for depth in range(len(path) - 1, 0, -1):
            subsite = self._subsites.get(path[:depth])
            if subsite is not None:
                rest = path[depth:]
                return subsite, _with_path(request, () if rest == ("",) else rest)
        raise KeyError(path)

    async def render_to_pipe(self, pipe) -> None:
        code = pipe.request.code
        counter = self._counters.get(code)
        if counter is None:
            counter = self._counters[code] = self.metrics.requests.labels(str(code))
        counter.inc()
        try:
            check_block_options(pipe.request)
            await super().render_to_pipe(pipe)
        except error.RenderableError as exc:
            explained = with_diagnostic(exc)
            code = getattr(explained, "code", None)
            if code is not None and not code.is_successful():
                self.metrics.errors.labels(str(code)).inc()
            raise explained from None


class CoapGateway:
    """The resources of one edge, built around a gateway context."""

    def __init__(
        self, gateways: GatewayContext, run_trio: RunTrio, put_soon: PutSoon, *,
        uri_tokens: bool = False, oscore: OscoreContexts | None = None,
    ) -> None:
        """``uri_tokens``: admit ``tk=`` tokens; ``oscore``: the devices' OSCORE contexts (None: no OSCORE)."""
        self.gateways = gateways
        self.metrics = CoapMetrics(gateways.registry)
        self.access = Access(gateways, run_trio, uri_tokens)
        limits = gateways.limits
        self.directory = ResourceDirectory(
            ConnectionLimit(limits.coap_registrations, limits.coap_registrations_per_source)
        )
        self.timer = DirectoryTimer(self.directory, gateways.presence)
        self.observers = ObserverAdmission(limits.coap_observers, limits.coap_observers_per_source, self.refused)
        self.kv = KvResource(gateways, self.access, run_trio, put_soon, self.observers)
        self.devices = DeviceResource(
            gateways, self.access, run_trio, lambda kind: self.metrics.documents.labels(kind).inc(), self.observers
        )
        site = self.site = EdgeSite(self.metrics)
        # What the server context serves: OSCORE-protected requests are unprotected, the rest pass through.
        self.root = OscoreSite(site, oscore, self.refused)
        site.add_resource([".well-known", "core"], resource.WKCResource(self.links, impl_info=None))
        site.add_resource(["kv"], self.kv)
        site.add_resource(["devices"], self.devices)
        site.add_resource(["rd"], RegistrationsResource(self.directory, self.timer, self.access, self.refused))
        site.add_resource(["rd"], RegistrationResource(self.directory, self.timer, self.access))
        site.add_resource(["rd-lookup", "ep"], LookupResource(self.directory, self.access, "ep"))
        site.add_resource(["rd-lookup", "res"], LookupResource(self.directory, self.access, "res"))
        # Every resource reassembles uploads under the same limit (RFC 7959 4.13),
        # and all hold their transfers within one budget (blocks.TransferBudget).
        self.transfers = TransferBudget(
            limits.coap_transfers, limits.coap_transfers_per_source, limits.coap_transfer_bytes, self.refused
        )
        for child in [*site._resources.values(), *site._subsites.values()]:
            child._block1 = LimitedBlock1Spool(gateways.max_payload, self.transfers)
            child._block2 = LimitedBlock2Cache(self.transfers)
        self.metrics.registrations.set_function(lambda: len(self.directory.registrations))
        self.metrics.observations.set_function(lambda: self.kv.observations + self.devices.observations)

    def links(self) -> LinkFormat:
        """The ``/.well-known/core`` listing (RFC 6690); the path parameters are in ``title``."""
        kv, devices = self.kv, self.devices
        return LinkFormat(
            [
                Link("/kv/", [["rt", kv.rt], ["ct", kv.ct], ["obs", None], ["title", "/kv/<key>"]]),
                Link(
                    "/devices/",
                    [["rt", devices.rt], ["ct", devices.ct], ["title", "/devices/<id>/telemetry|reported|desired"]],
                ),
                Link("/rd", [["rt", "core.rd"], ["ct", "40"]]),
                Link("/rd-lookup/ep", [["rt", "core.rd-lookup-ep"], ["ct", "40"]]),
                Link("/rd-lookup/res", [["rt", "core.rd-lookup-res"], ["ct", "40"]]),
            ]
        )

    def refused(self, reason: str, source: str) -> None:
        """Count input refused or limited before it cost more (the source is for the log line only)."""
        self.metrics.refused.labels(reason).inc()

    def close(self) -> None:
        self.timer.close()
