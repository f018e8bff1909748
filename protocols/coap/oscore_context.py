"""OSCORE-protected requests: unprotect, render as the context's device, protect the answers.

Imported on the first OSCORE request that names a context this edge holds
(``aiocoap.oscore`` brings ``cryptography``); see :mod:`.oscore_site` for the
part every request goes through.

This follows aiocoap's ``OscoreSiteWrapper`` (oscore_sitewrapper.py), which
is not used as is: it imports EDHOC's ``lakers`` at module level, looks
contexts up by trying every credential in turn, and neither counts nor
explains refusals.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import aiocoap
import aiocoap.pipe
from aiocoap import error, oscore
from aiocoap.numbers.codes import Code
from aiocoap.transports.oscore import OSCOREAddress

from konsul.sync.log_limits import peer_log

from .limits import peer_source
from .errors import CoapError

log = logging.getLogger("konsul.coap.oscore")
# aiocoap's error_to_message logs every error answer at INFO: a peer could fill the log.
_render_log = logging.getLogger("konsul.coap.oscore.render")
_render_log.setLevel(logging.WARNING)


class DeviceSecurityContext(oscore.FilesystemSecurityContext):
    """aiocoap's file-backed context, knowing its device, that can be retired while a response is in flight.

    A retired context (rotated, or its device deleted) is out of the store
    and its directory is gone; it may still protect the final 4.01 that ends
    an observation made with it, so it keeps its keys but writes nothing.
    """

    def __init__(self, basedir: str, device_id: str, sender_id: bytes) -> None:
        self.retired = False
        self.device_id = device_id
        self.kid = sender_id
        super().__init__(basedir)

    def _store(self) -> None:
        if not self.retired:
            super()._store()

    def retire(self) -> None:
        self.retired = True
        if self.lockfile is not None:
            self.lockfile.release()
            self.lockfile = None

    def close(self) -> None:
        """Write the exact sequence number and replay window back (a clean restart needs no Echo round trip)."""
        if self.lockfile is not None and not self.retired:
            self._destroy()


def _refuse(pipe: Any, code: Code, reason: str, detail: str, refused: Callable[[str, str], None]) -> None:
    source = peer_source(pipe.request.remote)
    refused(reason, source)
    peer_log.log(log, logging.INFO, ("oscore", reason, source), "OSCORE request from %s refused: %s", source, detail)
    if pipe.request.mtype == aiocoap.CON:
        raise CoapError(code, reason, detail)
    # a non-confirmable request that fails is dropped (RFC 8613 8.2)


async def render_protected(pipe: Any, inner: Any, contexts: Any, refused: Callable[[str, str], None]) -> None:
    """Answer the OSCORE request in ``pipe`` through ``inner`` (the edge's site), as its context's device."""
    request = pipe.request
    try:
        header = oscore.verify_start(request)
    except Exception:  # noqa: BLE001 - aiocoap raises IndexError, not DecodeError, for some truncated options
        return _refuse(pipe, Code.BAD_OPTION, "oscore_decode", "the OSCORE option could not be decoded", refused)
    sender_id = header.get(oscore.COSE_KID)
    context = contexts.context(sender_id) if isinstance(sender_id, bytes) else None
    if context is None:
        return _refuse(
            pipe, Code.UNAUTHORIZED, "oscore_unknown_context",
            "no OSCORE security context with this kid here (provision one with PUT /v1/devices/<id>?oscore=true)",
            refused,
        )
    if request.code not in (aiocoap.POST, aiocoap.FETCH):
        return _refuse(pipe, Code.METHOD_NOT_ALLOWED, "oscore_method", "an OSCORE request is sent as POST or FETCH", refused)
    try:
        plain, request_id = context.unprotect(request)
    except oscore.ReplayErrorWithEcho:
        # After an unclean stop the replay window is unknown (RFC 8613 B.1.2):
        # the device repeats the request with this Echo value, which proves it fresh.
        refused("oscore_echo", peer_source(request.remote))
        raise
    except oscore.ReplayError:
        return _refuse(pipe, Code.UNAUTHORIZED, "oscore_replay", "replay detected: this sequence number was used", refused)
    except oscore.DecodeError:
        return _refuse(pipe, Code.BAD_OPTION, "oscore_decode", "the OSCORE message could not be decoded", refused)
    except oscore.ProtectionInvalid:
        return _refuse(pipe, Code.BAD_REQUEST, "oscore_decrypt", "decryption failed (wrong key?)", refused)
    except Exception as exc:  # noqa: BLE001 - whatever else a malformed message makes aiocoap raise
        return _refuse(pipe, Code.BAD_REQUEST, "oscore_decode", f"the protected message is malformed ({type(exc).__name__})", refused)
    plain.remote = OSCOREAddress(context, request.remote)
    responder = context.context_for_response()

    inner_pipe = aiocoap.pipe.IterablePipe(plain)
    aiocoap.pipe.run_driving_pipe(
        aiocoap.pipe.error_to_message(inner_pipe, _render_log), inner.render_to_pipe(inner_pipe), name="OSCORE request"
    )
    async for event in inner_pipe:
        if event.exception is not None:
            # Not rendered: its text would leave the edge outside the protection.
            log.warning("OSCORE request from %s failed: %r", context.device_id, event.exception)
            message, is_last = aiocoap.Message(code=Code.INTERNAL_SERVER_ERROR), True
        else:
            message, is_last = event.message, event.is_last
        if not is_last:
            message.opt.observe = 0  # a notification: protected with a sequence number of its own
        try:
            protected, _ = responder.protect(message, request_id)
        except (error.Error, ValueError, AttributeError) as exc:
            log.warning("an answer to %s could not be protected: %r", context.device_id, exc)
            break
        if message.opt.observe is not None:
            protected.opt.observe = responder.sender_sequence_number & 0xFFFFFFFF
        pipe.add_response(protected, is_last=is_last)
        if is_last:
            break
