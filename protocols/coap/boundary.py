"""The CoAP gateway's trio <-> asyncio boundary (DESIGN.md, decision 2).

aiocoap is asyncio-native. The agent opens one ``trio_asyncio`` loop; this is
the only module of the gateway that crosses it:

- trio -> asyncio: :func:`run_coap_gateway` (trio) creates and shuts down the
  aiocoap server context through ``aio_as_trio``.
- asyncio -> trio: resources await ``run_trio(fn, *args)`` (``trio_as_aio``)
  for whatever writes state (conditional KV writes, deletes, device
  registration, trio hooks). Unconditional KV puts, the common write, do not
  cross per request: the resource submits them to the scope synchronously
  (``Scope.kv_submit``; both loops share one thread), where they join the
  scope's put group, and awaits an asyncio future that the scope's completion
  callback resolves once the put is durable (:func:`put_soon`).
  Reads (GET, Observe notifications) are plain in-memory lookups and never
  cross, which keeps the hot path as fast as a bare aiocoap server.
- state changes: the scope announces durable changes to listeners from trio;
  the listener hands them to the asyncio side with ``loop.call_soon``, where
  the resources trigger their Observe notifications.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from functools import partial
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio
import trio_asyncio
from konsul.sync.log_limits import peer_log

from ..aio_guard import contain_callback_errors
from ..aio_loop import run_callbacks_in_batches
from ..admission import source_of
from ..gateway import GatewayContext
from ..listen_addr import split_addr
from .backlog import coalesce_notifications
from .dedup import compact_duplicates
from .site import CoapGateway, responder_pipe

if TYPE_CHECKING:
    from ..oscore_contexts import OscoreContexts

log = logging.getLogger("konsul.coap")


def put_soon(new_future: Callable[[], Any], scope: Any, key: str, value: bytes) -> Any:
    """Submit an unconditional put to ``scope`` from the asyncio side; a future that resolves once it is durable.

    ``Scope.kv_submit`` is a plain synchronous call (both loops share one
    thread): no crossing into trio per request. The scope calls back in trio
    once the put's group is durable, or with the store's error if it is not.
    """
    future = new_future()

    def done(error: BaseException | None) -> None:
        if future.done():  # the request was given up on
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    try:
        scope.kv_submit(("set", key, value, 0), done)
    except Exception as error:  # noqa: BLE001 - refused (InvalidArgument) or no store: the request's answer
        future.set_exception(error)
    return future


def _bound_port(context: Any) -> int:
    """The UDP port the server context listens on (asked for when bound to port 0)."""
    for tokens in context.request_interfaces:
        messages = getattr(tokens, "token_interface", None)
        transport = getattr(messages, "message_interface", None)
        if hasattr(transport, "_local_port"):
            return transport._local_port()
    raise RuntimeError("aiocoap created no UDP transport")


def _drain_datagrams(context: Any, batch: int = 64) -> None:
    """Read up to ``batch`` waiting datagrams per readiness event instead of one.

    aiocoap's UDP transport reads one datagram per readiness callback. On a
    plain asyncio loop that is cheap; under trio-asyncio every callback is a
    trio task waking up plus a loop synchronisation, which made a loaded
    gateway spend more time waking up than answering (bench/coap.py). This
    reaches into aiocoap's transport; if its shape changes, the gateway keeps
    aiocoap's own one-at-a-time reading.
    """
    for tokens in context.request_interfaces:
        transport = getattr(getattr(getattr(tokens, "token_interface", None), "message_interface", None), "transport", None)
        sock = getattr(transport, "_RecvmsgSelectorDatagramTransport__sock", None)
        protocol = getattr(transport, "_protocol", None)
        if sock is None or protocol is None or not hasattr(transport, "_read_ready"):
            log.debug("aiocoap transport %r not drained: unknown shape", transport)
            continue
        read_one = transport._read_ready

        def read_waiting(read_one=read_one, sock=sock, protocol=protocol, size=transport.max_size) -> None:
            read_one()  # aiocoap's own read: the error queue, then one datagram
            for _ in range(batch):
                try:
                    data, ancdata, flags, address = sock.recvmsg(size, 1024)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    protocol.error_received(exc)
                    return
                protocol.datagram_msg_received(data, ancdata, flags, address)

        transport._read_ready = read_waiting


def _udp_transports(context: Any):
    """(transport, protocol) of each aiocoap UDP server transport, if aiocoap still has that shape."""
    for tokens in context.request_interfaces:
        protocol = getattr(getattr(tokens, "token_interface", None), "message_interface", None)
        transport = getattr(protocol, "transport", None)
        if transport is None or not hasattr(protocol, "datagram_msg_received") or not hasattr(transport, "sendmsg"):
            log.warning("aiocoap transport %r not guarded: unknown shape", transport)
            continue
        yield transport, protocol


# An ICMP error for an earlier datagram is reported by the kernel on the next
# send from the socket, whoever that goes to (sock_error() in the send path).
_PENDING_ICMP = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN)


def _send_without_stale_errors(transport: Any) -> None:
    """Do not blame a datagram's destination for an error another peer caused.

    aiocoap's transport hands a send error to the protocol, which ends every
    exchange and observation of the remote being sent to. With IP_RECVERR an
    ICMP "port unreachable" for a notification to an observer that went away
    is reported by the *next* send, whoever it goes to: one client that
    observes and closes its socket ended the observations of the others (and
    tripped the pipe bug site.py works around). The error is cleared by being
    reported, so the send is tried once more; the ICMP error itself also
    arrives on the error queue with its real address, where aiocoap handles it.
    """
    sendmsg = transport.sendmsg
    sock = getattr(transport, "_RecvmsgSelectorDatagramTransport__sock", None)
    if sock is None:
        log.debug("aiocoap transport %r sends as it did: unknown shape", transport)
        return

    def send(data, ancdata, flags, address) -> None:
        try:
            sock.sendmsg((data,), ancdata, flags, address)
            return
        except OSError as exc:
            if exc.errno not in _PENDING_ICMP:
                transport._protocol.error_received(exc)
                return
        sendmsg(data, ancdata, flags, address)  # once more, reporting as aiocoap does

    transport.sendmsg = send


def _refuse_undecodable(
    transport: Any, protocol: Any, refused: Callable[[str, str], None]
) -> None:
    """Answer a datagram aiocoap cannot decode instead of raising in the read callback.

    aiocoap turns most malformed messages into ``UnparsableMessage`` and
    drops them, but an option value it cannot decode (a Uri-Path that is
    not UTF-8: ``40 01 00 01 b1 ff``) raises out of ``datagram_msg_received``
    into the loop. Contained here, to the one datagram: a confirmable
    request gets 4.00 with a diagnostic (piggybacked, RFC 7252 5.2.1), a
    confirmable non-request a Reset (4.2), anything else is dropped (4.3).
    An error after decoding (in dispatch) is contained the same way, and
    counted apart.
    """
    from aiocoap import Message

    received = protocol.datagram_msg_received

    def answer(data: bytes, ancdata: Any, address: Any, reply: bytes | None) -> None:
        if reply is not None:
            pktinfo = [item for item in ancdata if item[:2] == (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO)]
            transport.sendmsg(reply, pktinfo, 0, address)

    def datagram_msg_received(data, ancdata, flags, address) -> None:
        if flags & socket.MSG_TRUNC:
            # Larger than the read buffer: what arrived is a prefix, which
            # aiocoap would take for the whole message (a PUT stored cut short).
            refused("truncated", source_of(address))
            detail = f"truncated: a datagram is at most {transport.max_size} bytes here; send larger payloads block-wise (Block1)"
            answer(data, ancdata, address, refusal_for(data, detail, code=0x8D, options=_SIZE1_1024))
            return
        if len(data) >= 4 and data[0] & 0x0F > 8:
            # Token lengths 9-15 are reserved: a message format error (RFC 7252 3),
            # rejected with a Reset if confirmable; aiocoap answered it as a request.
            refused("bad_token_length", source_of(address))
            if data[0] >> 4 == 0x4:  # version 1, confirmable
                answer(data, ancdata, address, bytes([0x70, 0]) + data[2:4])
            return
        try:
            received(data, ancdata, flags, address)
        except Exception as exc:  # noqa: BLE001 - one datagram's failure must stay its own
            try:
                Message.decode(data)
            except Exception:  # noqa: BLE001 - any decoding failure is the datagram's fault
                reason = "undecodable"
            else:
                reason = "dispatch_error"
            refused(reason, source_of(address))
            peer_log.log(
                log, logging.WARNING, ("coap_datagram", source_of(address)),
                "CoAP datagram from %s refused (%s): %s: %s", source_of(address), reason, type(exc).__name__, exc,
            )
            answer(data, ancdata, address, refusal_for(data, f"{reason}: {exc}; the message could not be processed"))

    protocol.datagram_msg_received = datagram_msg_received


_SIZE1_1024 = bytes([0xD2, 60 - 13, 0x04, 0x00])  # Size1 (option 60) = 1024: the block size to use


def refusal_for(data: bytes, diagnostic: str, code: int = 0x80, options: bytes = b"") -> bytes | None:
    """The answer to a datagram refused before decoding, if its fixed header is sound and asks for one.

    ``code`` is the response code byte (4.00 by default), ``options`` encoded
    options (the first delta from 0).
    """
    if len(data) < 4 or data[0] >> 6 != 1:
        return None
    mtype, token_length, request_code = (data[0] >> 4) & 3, data[0] & 0x0F, data[1]
    if mtype != 0 or token_length > 8 or len(data) < 4 + token_length:
        return None  # only a confirmable message asks for an answer
    mid = data[2:4]
    if 1 <= request_code <= 31:  # a request: ACK with the refusal and the same token
        token = data[4 : 4 + token_length]
        payload = diagnostic.encode("utf-8", "replace")[:200]
        return bytes([0x60 | token_length, code]) + mid + token + options + b"\xff" + payload
    return bytes([0x70, 0]) + mid  # Reset


def _render_without_naming(context: Any) -> None:
    """Render requests without formatting each one into its asyncio task's name.

    aiocoap's ``Context.render_to_pipe`` names the task of every request
    ``"Rendering for %r" % request``; the formatting was 8% of the CPU of a
    GET (bench/coap.py). The rest is aiocoap's own code, but for its
    ``error_to_message``, replaced by :func:`.site.responder_pipe` (which
    see). If its shape changes, aiocoap's method stays.
    """
    try:
        from aiocoap.pipe import run_driving_pipe

        render = context._render_to_pipe
        context_log = context.log
    except (ImportError, AttributeError) as exc:
        log.debug("aiocoap's render_to_pipe kept: %s", exc)
        return

    def render_to_pipe(pipe: Any) -> None:
        run_driving_pipe(responder_pipe(pipe, context_log), render(pipe), name="CoAP request")

    context.render_to_pipe = render_to_pipe


class _RepeatedLinesLimit(logging.Filter):
    """aiocoap logs a line per odd datagram (unparsable, unknown exchange): a few per minute each."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        allowed, _suppressed = peer_log.allow(("aiocoap", record.name, record.msg))
        return allowed


def _limit_aiocoap_logs() -> None:
    for name in ("coap-server", "coap"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RepeatedLinesLimit) for f in logger.filters):
            logger.addFilter(_RepeatedLinesLimit())


async def run_coap_gateway(
    gateways: GatewayContext, addr: str, *, uri_tokens: bool = False, oscore: OscoreContexts | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve CoAP on ``addr`` (UDP) until cancelled; reports ``host:port`` once bound.

    ``uri_tokens`` admits device tokens in the URI (``tk=``, --coap-uri-tokens);
    ``oscore`` holds the devices' OSCORE contexts (None: OSCORE requests are refused).
    Must run inside ``trio_asyncio.open_loop()``.
    """
    import aiocoap

    host, port = split_addr(addr, "a CoAP address", need_host=True,
                            usage="{what} is HOST:PORT (port 0 picks a free one); got {addr!r}")
    loop = trio_asyncio.current_loop.get()
    run_callbacks_in_batches(loop)
    contain_callback_errors(loop, gateways.registry)
    _limit_aiocoap_logs()

    def run_trio(fn, *args, **kwargs):
        return trio_asyncio.trio_as_aio(partial(fn, **kwargs) if kwargs else fn, loop=loop)(*args)

    gateway = CoapGateway(gateways, run_trio, partial(put_soon, loop.create_future), uri_tokens=uri_tokens, oscore=oscore)
    # aiocoap sets SO_REUSEPORT by default, which would let a second agent bind
    # the same port silently and split the traffic; we want "address in use".
    os.environ.setdefault("AIOCOAP_REUSE_PORT", "0")
    try:
        context = await trio_asyncio.aio_as_trio(aiocoap.Context.create_server_context, loop=loop)(
            gateway.root, bind=(host, port), transports=["udp6"]
        )
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen for CoAP on {addr}: {exc.strerror or exc}") from None
    for transport, protocol in _udp_transports(context):
        _send_without_stale_errors(transport)
        _refuse_undecodable(transport, protocol, gateway.refused)
    _drain_datagrams(context)
    _render_without_naming(context)
    for tokens in context.request_interfaces:
        manager = getattr(tokens, "token_interface", None)
        if manager is not None:
            coalesce_notifications(manager, gateway.refused)
            limits = gateways.limits
            compact_duplicates(
                manager, limits.coap_duplicate_entries, limits.coap_duplicate_entries_per_source, gateway.refused
            )

    def on_change(scope_name: str, collection: str, keys: set[str]) -> None:
        if collection == "kv":
            loop.call_soon(gateway.kv.changed, scope_name, set(keys))
        elif collection == "devices" and scope_name == gateways.site:
            # A rotated token or a deleted device ends the observations made with the old one.
            loop.call_soon(gateway.access.devices_changed, set(keys))

    scopes = [gateways.scope, gateways.global_scope]
    listeners = [partial(on_change, scope.name) for scope in scopes]
    for scope, listener in zip(scopes, listeners, strict=True):
        scope.listeners.append(listener)
    push = gateways.push
    previous_notify = push.notify_desired

    def notify_desired(device_id: str) -> None:
        if previous_notify is not None:
            previous_notify(device_id)
        loop.call_soon(gateway.devices.notify_desired, device_id)

    push.notify_desired = notify_desired
    try:
        shown = f"[{host}]" if ":" in host else host
        task_status.started(f"{shown}:{_bound_port(context)}")
        await trio.sleep_forever()  # the gateway runs on the asyncio side until cancelled
    finally:
        for scope, listener in zip(scopes, listeners, strict=True):
            scope.listeners.remove(listener)
        if push.notify_desired is notify_desired:
            push.notify_desired = previous_notify
        gateway.close()
        with trio.CancelScope(shield=True):
            await trio_asyncio.aio_as_trio(context.shutdown, loop=loop)()
