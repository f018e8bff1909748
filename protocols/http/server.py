"""Serving an app with hypercorn under trio, the same way for the edge and the hub.

Theory of operation. hypercorn keeps its protocol core (``hypercorn.protocol``:
h11 and h2 state, ASGI HTTP and WebSocket streams) apart from its runtime
adapters (``hypercorn.trio``: sockets, tasks, timers). We use the core as it is
and drive it with our own, leaner trio adapter, ``Connection``. What hypercorn's
trio adapter does per request, and what this one does instead (each measured
on a bare ASGI app, docs/benchmarks.md, "HTTP KV"):

- the keep-alive timer is a task: every request stops it and every response
  restarts it, i.e. a lock, a ``nursery.start`` of a new task and the
  cancellation (a raised and caught ``Cancelled``) of the old one, twice per
  request. Here the timer is the deadline of the cancel scope the connection's
  only reader already waits in: idle moves the deadline, busy clears it;
- every send takes a trio lock with a checkpoint, opens a shielded cancel
  scope and calls ``send_all``, also for the empty chunk h11 produces for the
  end of a sized body. Here empty chunks are not sent and the lock is taken
  without a checkpoint when it is free;
- every read sits in a ``fail_after(inf)`` scope when no read timeout is set;
- every request opens a memory channel through ``open_memory_channel[...]``,
  whose generic-alias subscription alone is a measurable cost.

The protocol core itself, the app task per request, HTTP/2 and WebSockets are
hypercorn's own and unchanged; only plain TCP is served (konsul binds no TLS).

In front of the core sits an optional fast path (``kv_fast_path.KvFastPath``,
found in the app's config as ``KONSUL_FAST_PATH``): while the core has no
request in flight and nothing buffered, the connection first offers the bytes
it read to the fast path, which answers a plain KV read or write itself and
declines anything else; declined bytes go to the core untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from math import inf
from typing import Any

import h11
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, RawData, Updated
from hypercorn.protocol import ProtocolWrapper
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.task_group import _handle
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import parse_socket_addr, repr_socket_addr, wrap_app

from konsul.sync.wire import MAX_FRAME_BYTES

from .kv_fast_path import Incomplete

log = logging.getLogger(__name__)

MAX_RECV = 2**16


async def serve_app(app, host: str, port: int, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` on ``host:port`` until cancelled; reports the URL it bound (port 0 resolved)."""
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    # A logger object, not "-": hypercorn then adds no handler of its own and
    # our logging configuration decides (no duplicated start-up lines).
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 1.0
    # A sync diff or snapshot travels as one WebSocket message; hypercorn's
    # default (16 MiB) would cut a large reconciliation short.
    config.websocket_max_message_size = MAX_FRAME_BYTES
    fast_path = getattr(app, "config", {}).get("KONSUL_FAST_PATH")
    await serve(app, config, fast_path=fast_path, task_status=task_status)


async def serve(app, config, *, fast_path=None, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """hypercorn's ``worker_serve`` for plain TCP with ``Connection`` as the runtime adapter.

    Runs the ASGI lifespan, binds ``config.bind``, reports the first bound URL
    and serves until cancelled (cancellation is shutdown, as for every konsul
    component).
    """
    wrapped = wrap_app(app, config.wsgi_max_body_size, None)
    lifespan_state: dict = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        sockets = config.create_sockets()
        if sockets.secure_sockets or sockets.quic_sockets:
            raise ValueError("serve() binds plain TCP only")
        listeners = []
        binds = []
        for sock in sockets.insecure_sockets:
            sock.listen(config.backlog)
            listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
            binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
        for bind in binds:
            await config.log.info(f"Running on {bind} (CTRL + C to quit)")
        handler = partial(
            Connection, wrapped, config, context, ConnectionState(lifespan_state.copy()), fast_path=fast_path
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(trio.serve_listeners, _run_connection(handler), listeners))
            task_status.started(binds[0])


def _run_connection(handler: Callable[[trio.SocketStream], Connection]) -> Callable[[trio.SocketStream], Awaitable[None]]:
    async def run(stream: trio.SocketStream) -> None:
        await handler(stream).run()

    return run


class TaskGroup:
    """hypercorn's trio ``TaskGroup``: the app of each request runs in its own task."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    async def spawn_app(self, app, config, scope, send):
        # Not open_memory_channel[...]: subscripting the generic costs more
        # than the channel.
        app_send, app_receive = trio.open_memory_channel(config.max_app_queue_size)
        self._nursery.start_soon(
            _handle, app, config, scope, app_receive.receive, send, trio.to_thread.run_sync, trio.from_thread.run
        )
        return app_send.send

    def spawn(self, func: Callable, *args: Any) -> None:
        self._nursery.start_soon(func, *args)


class Connection:
    """One TCP connection: reads into hypercorn's protocol core and sends what it emits.

    The keep-alive timeout is the deadline of the read: while no request is in
    flight (the protocol reports ``Updated(idle=True)``) the read may wait
    ``keep_alive_timeout`` seconds, after which the connection closes; while a
    request is in flight (a blocking query may take minutes) it waits without
    a deadline, as hypercorn's own idle timer does.
    """

    def __init__(self, app, config, context, state, stream: trio.SocketStream, *, fast_path=None) -> None:
        self.app = app
        self.fast_path = fast_path
        self._pending = b""  # read, offered to the fast path, not yet answered
        self.config = config
        self.context = context
        self.state = state
        self.stream = stream
        self.protocol: Any = None
        self._send_lock = trio.Lock()
        self._idle_deadline = trio.current_time() + config.keep_alive_timeout
        self._read_scope: trio.CancelScope | None = None

    async def run(self) -> None:
        try:
            socket = self.stream.socket
            client = parse_socket_addr(socket.family, socket.getpeername())
            server = parse_socket_addr(socket.family, socket.getsockname())
            async with trio.open_nursery() as nursery:
                self.protocol = ProtocolWrapper(
                    self.app, self.config, self.context, TaskGroup(nursery), self.state,
                    False, client, server, self.protocol_send, "http/1.1",
                )
                await self.protocol.initiate()
                await self._read_data()
        except OSError:
            pass
        finally:
            await self._close()

    async def protocol_send(self, event) -> None:
        if type(event) is RawData:
            if not event.data:
                return  # h11's end of a sized body: nothing to put on the wire
            lock = self._send_lock
            if lock.locked():
                await lock.acquire()
            else:
                lock.acquire_nowait()
            try:
                with trio.CancelScope(shield=True):
                    await self.stream.send_all(event.data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self.protocol.handle(Closed())
            finally:
                lock.release()
        elif type(event) is Updated:
            self._idle_deadline = trio.current_time() + self.config.keep_alive_timeout if event.idle else inf
            if self._read_scope is not None:
                self._read_scope.deadline = self._read_deadline()
        elif type(event) is Closed:
            await self._close()
            await self.protocol.handle(Closed())

    def _read_deadline(self) -> float:
        if self.config.read_timeout is None:
            return self._idle_deadline
        return min(self._idle_deadline, trio.current_time() + self.config.read_timeout)

    async def _read_data(self) -> None:
        while True:
            with trio.CancelScope(deadline=self._read_deadline()) as scope:
                self._read_scope = scope
                try:
                    data = await self.stream.receive_some(MAX_RECV)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    break
                finally:
                    self._read_scope = None
            if scope.cancelled_caught:
                break  # idle for keep_alive_timeout, or a read took read_timeout
            if data and self.fast_path is not None and self._core_idle():
                data = await self._answer_fast(bytes(data))
                if data is None:
                    continue  # answered, or waiting for the rest of a request
            elif self._pending:
                data, self._pending = self._pending + data, b""
            await self.protocol.handle(RawData(bytes(data)))
            if not data:
                break
        await self.protocol.handle(Closed())

    def _core_idle(self) -> bool:
        """Whether the protocol core is between requests with nothing buffered."""
        core = self.protocol.protocol
        connection = getattr(core, "connection", None)
        return (
            type(connection) is h11.Connection
            and core.stream is None
            and connection.our_state is h11.IDLE
            and connection.their_state is h11.IDLE
            and not connection.trailing_data[0]
        )

    async def _answer_fast(self, data: bytes) -> bytes | None:
        """Answers what the fast path takes; returns the bytes the core must have, if any."""
        buffer = self._pending + data
        self._pending = b""
        while buffer:
            try:
                request = self.fast_path.parse(buffer)
            except Incomplete:
                self._pending = buffer
                if b"\r\n\r\n" in buffer:
                    # The head is in, the body is arriving: busy, as the core
                    # counts a request from its head on.
                    self._idle_deadline = inf
                return None
            if request is None:
                return buffer
            method, key, query, body, consumed = request
            self._idle_deadline = inf  # busy: a durable write may take a while
            response = await self.fast_path.respond(method, key, query, body)
            if response is None:
                return buffer
            buffer = buffer[consumed:]
            await self.protocol_send(RawData(data=response))
            self._idle_deadline = trio.current_time() + self.config.keep_alive_timeout
        return None

    async def _close(self) -> None:
        try:
            await self.stream.send_eof()
        except (trio.BrokenResourceError, trio.BusyResourceError, trio.ClosedResourceError):
            pass  # already gone
        await self.stream.aclose()
