"""The CoAP gateway's trio <-> asyncio boundary (DESIGN.md, decision 2).

aiocoap is asyncio-native. The agent opens one ``trio_asyncio`` loop; this is
the only module of the gateway that crosses it:

- trio -> asyncio: :func:`run_coap_gateway` (trio) creates and shuts down the
  aiocoap server context through ``aio_as_trio``.
- asyncio -> trio: resources await ``run_trio(fn, *args)`` (``trio_as_aio``)
  for whatever writes state (conditional KV writes, deletes, device
  registration, trio hooks). Unconditional KV puts, the common write, do not
  cross per request: the resource calls ``KvWriter.submit`` synchronously
  (both loops share one thread) and awaits an asyncio future that the
  writer's trio task resolves once the put's batch is durable (writer.py).
  Reads (GET, Observe notifications) are plain in-memory lookups and never
  cross, which keeps the hot path as fast as a bare aiocoap server.
- state changes: the scope announces durable changes to listeners from trio;
  the listener hands them to the asyncio side with ``loop.call_soon``, where
  the resources trigger their Observe notifications.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from typing import Any

import trio
import trio_asyncio

from ..aio_loop import run_callbacks_in_batches
from ..gateway import GatewayContext
from .dedup import compact_duplicates
from .site import CoapGateway
from .writer import KvWriter

log = logging.getLogger("konsul.coap")


def parse_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ValueError(f"a CoAP address is HOST:PORT (port 0 picks a free one); got {addr!r}")
    return host, int(port)


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


def _render_without_naming(context: Any) -> None:
    """Render requests without formatting each one into its asyncio task's name.

    aiocoap's ``Context.render_to_pipe`` names the task of every request
    ``"Rendering for %r" % request``; the formatting was 8% of the CPU of a
    GET (bench/coap.py). The rest is aiocoap's own code. If its shape
    changes, aiocoap's method stays.
    """
    try:
        from aiocoap.pipe import error_to_message, run_driving_pipe

        render = context._render_to_pipe
        context_log = context.log
    except (ImportError, AttributeError) as exc:
        log.debug("aiocoap's render_to_pipe kept: %s", exc)
        return

    def render_to_pipe(pipe: Any) -> None:
        run_driving_pipe(error_to_message(pipe, context_log), render(pipe), name="CoAP request")

    context.render_to_pipe = render_to_pipe


async def run_coap_gateway(
    gateways: GatewayContext, addr: str, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve CoAP on ``addr`` (UDP) until cancelled; reports ``host:port`` once bound.

    Must run inside ``trio_asyncio.open_loop()``.
    """
    import aiocoap

    host, port = parse_addr(addr)
    loop = trio_asyncio.current_loop.get()
    run_callbacks_in_batches(loop)

    def run_trio(fn, *args, **kwargs):
        return trio_asyncio.trio_as_aio(partial(fn, **kwargs) if kwargs else fn, loop=loop)(*args)

    writer = KvWriter(loop.create_future)
    gateway = CoapGateway(gateways, run_trio, writer)
    # aiocoap sets SO_REUSEPORT by default, which would let a second agent bind
    # the same port silently and split the traffic; we want "address in use".
    os.environ.setdefault("AIOCOAP_REUSE_PORT", "0")
    try:
        context = await trio_asyncio.aio_as_trio(aiocoap.Context.create_server_context, loop=loop)(
            gateway.site, bind=(host, port), transports=["udp6"]
        )
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen for CoAP on {addr}: {exc.strerror or exc}") from None
    _drain_datagrams(context)
    _render_without_naming(context)
    for tokens in context.request_interfaces:
        manager = getattr(tokens, "token_interface", None)
        if manager is not None:
            compact_duplicates(manager)

    def on_change(scope_name: str, collection: str, keys: set[str]) -> None:
        if collection == "kv":
            loop.call_soon(gateway.kv.changed, scope_name, set(keys))

    scopes = [gateways.scope, gateways.global_scope]
    listeners = [partial(on_change, scope.name) for scope in scopes]
    for scope, listener in zip(scopes, listeners, strict=True):
        scope.listeners.append(listener)
    previous_notify = gateways.extras.get("notify_desired")

    def notify_desired(device_id: str) -> None:
        if previous_notify is not None:
            previous_notify(device_id)
        loop.call_soon(gateway.devices.notify_desired, device_id)

    gateways.extras["notify_desired"] = notify_desired
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            shown = f"[{host}]" if ":" in host else host
            task_status.started(f"{shown}:{_bound_port(context)}")
    finally:
        for scope, listener in zip(scopes, listeners, strict=True):
            scope.listeners.remove(listener)
        if gateways.extras.get("notify_desired") is notify_desired:
            if previous_notify is None:
                del gateways.extras["notify_desired"]
            else:
                gateways.extras["notify_desired"] = previous_notify
        gateway.close()
        with trio.CancelScope(shield=True):
            await trio_asyncio.aio_as_trio(context.shutdown, loop=loop)()
