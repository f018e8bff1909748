"""The outermost CoAP resource: OSCORE-protected requests (RFC 8613) in, everything else passed on.

A request without the OSCORE option goes to the edge's site unchanged (and is
authenticated as before: ``ep``/``tk`` or anonymous, :mod:`.access`). A
protected one is unprotected with the context its 'kid' names, answered by the
same site as coming from that context's device (``request.remote`` is then
aiocoap's ``OSCOREAddress``, whose ``security_context`` knows the device), and
its answers are protected. Unknown contexts, wrong keys and replays are
refused with 4.01/4.00 and counted in ``konsul_coap_refused{reason="oscore_*"}``.

This module stays light: ``aiocoap.oscore`` and ``cryptography`` are imported
(by :mod:`.oscore_context`) only once a request names a context this edge holds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiocoap import CON, interfaces
from aiocoap.numbers.codes import Code

from .errors import CoapError
from .limits import peer_source

if TYPE_CHECKING:
    from ..oscore_contexts import OscoreContexts


class OscoreSite(interfaces.Resource):
    """Wraps the edge's site; ``contexts`` None serves no OSCORE at all (every protected request 4.01)."""

    def __init__(self, inner: Any, contexts: OscoreContexts | None, refused: Callable[[str, str], None]) -> None:
        self.inner = inner
        self.contexts = contexts
        self.refused = refused

    def get_resources_as_linkheader(self) -> Any:
        return self.inner.get_resources_as_linkheader()

    async def render(self, request: Any) -> Any:
        raise RuntimeError("the OSCORE site renders through render_to_pipe only")

    async def needs_blockwise_assembly(self, request: Any) -> bool:
        raise RuntimeError("the OSCORE site renders through render_to_pipe only")

    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        if request.opt.oscore is None:
            await self.inner.render_to_pipe(pipe)
            return
        if self.contexts is None or not self.contexts.any:
            # Nothing to look up: refused without loading any cryptography.
            self.refused("oscore_unknown_context", peer_source(request.remote))
            if request.mtype == CON:
                raise CoapError(
                    Code.UNAUTHORIZED, "oscore_unknown_context",
                    "no OSCORE security contexts here (provision one with PUT /v1/devices/<id>?oscore=true)",
                )
            return
        from .oscore_context import render_protected

        await render_protected(pipe, self.inner, self.contexts, self.refused)


def oscore_device(request: Any) -> tuple[str, bytes] | None:
    """(device id, its Sender ID) of an unprotected OSCORE request; None for a plain one."""
    context = getattr(request.remote, "security_context", None)
    device_id = getattr(context, "device_id", None)
    if device_id is None:
        return None
    return device_id, context.kid
