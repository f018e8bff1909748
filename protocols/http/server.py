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

The protocol core itself, the app task per request and WebSockets are
hypercorn's own and unchanged; only plain TCP is served (konsul binds no TLS),
and only HTTP/1.1: the Consul API is HTTP/1.1, and an HTTP/2 connection (an
``h2c`` upgrade or the prior-knowledge preface) would carry a hundred
requests past the per-connection bounds and the body timeout below.

In front of the core sits an optional fast path (``kv_fast_path.KvFastPath``,
found in the app's config as ``KONSUL_FAST_PATH``): while the core has no
request in flight and nothing buffered, the connection first offers the bytes
it read to the fast path, which answers a plain KV read or write itself and
declines anything else; declined bytes go to the core untouched.

Hostile clients (DESIGN.md, decision 8). Every connection is admitted against
``NetworkLimits.http_connections`` (all together) and
``http_connections_per_source`` (one client address) before it costs more than
its socket; past either bound it gets a 503 with ``Retry-After`` and is closed.
Nothing a client does can hold a connection without a deadline except a
request the app is working on (a blocking query, a sync WebSocket): a request
head must arrive within the keep-alive timeout, a body within
``http_body_timeout_s`` of its head (else 408 and close), and every send must
make progress within ``http_send_timeout_s`` (else the connection is dropped).
``accept`` failing for lack of file descriptors (EMFILE, ENFILE) backs off
and retries instead of ending the server.
"""

from __future__ import annotations

import errno
import logging
import resource
from collections.abc import Callable
from functools import partial
from math import inf
from typing import Any

import h11
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, RawData, Updated
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.task_group import _handle
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import parse_socket_addr, repr_socket_addr, wrap_app

from konsul.sync.log_limits import peer_log
from konsul.sync.wire import MAX_FRAME_BYTES

from ..admission import ConnectionLimit, NetworkLimits, source_of
from .kv_fast_path import Incomplete

log = logging.getLogger(__name__)

MAX_RECV = 2**16
SEND_CHUNK = 2**16  # a send must make progress chunk by chunk, not finish a large body in one deadline
# accept(2) failing for want of resources: wait and retry (trio.serve_listeners
# does too, but logs a traceback every 100 ms while it lasts).
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF_S = (0.01, 1.0)  # first and longest wait after such a failure
REFUSED_RETRY_AFTER_S = 1


class ConnectionAdmission:
    """The HTTP listener's bounds on open connections, and what it refused."""

    def __init__(self, limits: NetworkLimits) -> None:
        self.limits = limits
        total = limits.http_connections
        descriptors = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if descriptors != resource.RLIM_INFINITY and total > descriptors // 2:
            # HTTP alone must not take the descriptors that MQTT, CoAP, the
            # databases and the sync link need: at most half of them.
            total = max(1, descriptors // 2)
            log.info(
                "at most %d HTTP connections (half of the %d file descriptors this process may open; "
                "raise its limit, e.g. LimitNOFILE=, for more)", total, descriptors,
            )
        self.connections = ConnectionLimit(total, min(limits.http_connections_per_source, total))
        self.accept_errors = 0  # accept(2) failures for want of file descriptors or memory
        self.body_bytes = 0  # of request bodies being received, all connections together
        self.bodies_refused = 0  # requests refused because body_bytes would pass its bound
        self.timeouts = {"idle": 0, "body": 0, "send": 0}  # connections closed by each deadline


def _refusal(reason: str) -> bytes:
    body = (
        b'{"error":"too_many_connections","detail":"this agent holds too many connections '
        + (b"from your address" if reason == "per_source" else b"already")
        + b'; close idle ones and retry later"}'
    )
    return b"".join((
        b"HTTP/1.1 503 \r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % len(body),
        b"retry-after: %d\r\nconnection: close\r\n\r\n" % REFUSED_RETRY_AFTER_S, body,
    ))


_BUSY_BODY = b'{"error":"too_many_requests","detail":"the agent is receiving too many request bodies; retry later"}'
_BUSY_RESPONSE = (
    b"HTTP/1.1 503 \r\ncontent-type: application/json\r\ncontent-length: %d\r\nretry-after: %d\r\n"
    b"connection: close\r\n\r\n" % (len(_BUSY_BODY), REFUSED_RETRY_AFTER_S) + _BUSY_BODY
)
_TIMEOUT_BODY = b'{"error":"request_timeout","detail":"the request body did not arrive in time; send it whole"}'
TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 \r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
    % len(_TIMEOUT_BODY) + _TIMEOUT_BODY
)


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
    app_config = getattr(app, "config", {})
    fast_path = app_config.get("KONSUL_FAST_PATH")
    admission = app_config.get("KONSUL_ADMISSION")
    await serve(app, config, fast_path=fast_path, admission=admission, task_status=task_status)


async def serve(
    app,
    config,
    *,
    fast_path=None,
    admission: ConnectionAdmission | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
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
        admission = admission or ConnectionAdmission(NetworkLimits())
        handler = partial(
            Connection, wrapped, config, context, ConnectionState(lifespan_state.copy()),
            fast_path=fast_path, admission=admission,
        )
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept_loop, listener, nursery, handler, admission)
            task_status.started(binds[0])


async def _accept_loop(
    listener: trio.SocketListener,
    nursery: trio.Nursery,
    handler: Callable[..., Connection],
    admission: ConnectionAdmission,
) -> None:
    """Accept connections for ever: admit each, or refuse it; back off while out of descriptors."""
    backoff = ACCEPT_BACKOFF_S[0]
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as error:
                if error.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                # Out of file descriptors (or memory): the connections we hold
                # must finish or time out first. Serving on is the point.
                admission.accept_errors += 1
                peer_log.log(
                    log, logging.WARNING, ("http-accept", error.errno),
                    "cannot accept HTTP connections: %s; retrying in %.2fs", error.strerror, backoff,
                )
                await trio.sleep(backoff)
                backoff = min(backoff * 2, ACCEPT_BACKOFF_S[1])
                continue
            backoff = ACCEPT_BACKOFF_S[0]
            try:
                source = source_of(stream.socket.getpeername())
            except OSError:
                await trio.aclose_forcefully(stream)  # gone already
                continue
            refused = admission.connections.try_admit(source)
            if refused is not None:
                await _refuse(stream, source, refused)
                continue
            nursery.start_soon(_run_connection, handler, stream, admission, source)


async def _refuse(stream: trio.SocketStream, source: str, reason: str) -> None:
    """Answer 503 and close, without a task: a fresh socket's send buffer takes it at once."""
    peer_log.log(
        log, logging.WARNING, ("http-refused", source),
        "refused an HTTP connection from %s: %s connection limit reached", source, reason.replace("_", " "),
    )
    with trio.move_on_after(0.1):
        try:
            await stream.send_all(_refusal(reason))
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    await trio.aclose_forcefully(stream)


async def _run_connection(handler: Callable[..., Connection], stream: trio.SocketStream, admission, source: str) -> None:
    try:
        await handler(stream).run()
    finally:
        admission.connections.release(source)
        await trio.aclose_forcefully(stream)


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


class Http11Only(H11Protocol):
    """hypercorn's HTTP/1.1 protocol without its switch to HTTP/2.

    An ``Upgrade: h2c`` header is ignored (RFC 9110 lets a server), and
    ``PRI * HTTP/2.0`` is an HTTP/1.1 request like any other, which the app
    answers 404.
    """

    async def _check_protocol(self, event: h11.Request) -> None:
        return None


class Connection:
    """One TCP connection: reads into hypercorn's protocol core and sends what it emits.

    The keep-alive timeout is the deadline of the read: while no request is in
    flight (the protocol reports ``Updated(idle=True)``) the read may wait
    ``keep_alive_timeout`` seconds, after which the connection closes; a
    request head that is not whole by then is dropped the same way. Once a
    head is in, its body must arrive within ``http_body_timeout_s`` (else
    408). While a request is being answered (a blocking query may take
    minutes) the read waits without a deadline, as hypercorn's own idle timer
    does.
    """

    def __init__(
        self, app, config, context, state, stream: trio.SocketStream, *, fast_path=None,
        admission: ConnectionAdmission | None = None,
    ) -> None:
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
        self.admission = admission or ConnectionAdmission(NetworkLimits())
        self._body_timeout = self.admission.limits.http_body_timeout_s
        self._send_timeout = self.admission.limits.http_send_timeout_s
        self._body_deadline = inf  # set while a request's head is in and its body is not
        self._need = 0  # bytes the fast path's pending request needs before it is worth parsing again
        self._body_bytes = 0  # of the body being received, counted in admission.body_bytes
        self._closed = False
        self._source = ""  # the client's address, for the fast path's rate limits and audit

    async def run(self) -> None:
        try:
            socket = self.stream.socket
            client = parse_socket_addr(socket.family, socket.getpeername())
            server = parse_socket_addr(socket.family, socket.getsockname())
            self._source = source_of(client)
            async with trio.open_nursery() as nursery:
                task_group = TaskGroup(nursery)
                self.protocol = ProtocolWrapper(
                    self.app, self.config, self.context, task_group, self.state,
                    False, client, server, self.protocol_send, "http/1.1",
                )
                self.protocol.protocol = Http11Only(
                    self.app, self.config, self.context, task_group, self.state,
                    False, client, server, self.protocol_send,
                )
                await self.protocol.initiate()
                await self._read_data()
        except OSError:
            pass
        finally:
            self._release_body_bytes()
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
                sent = not self._closed and await self._send_with_progress(event.data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                sent = False
            finally:
                lock.release()
            if not sent:
                await self.protocol.handle(Closed())
                await self._close()
        elif type(event) is Updated:
            self._idle_deadline = trio.current_time() + self.config.keep_alive_timeout if event.idle else inf
            if self._read_scope is not None:
                self._read_scope.deadline = self._read_deadline()
        elif type(event) is Closed:
            await self._close()
            await self.protocol.handle(Closed())

    async def _send_with_progress(self, data: bytes) -> bool:
        """Send all of ``data``; False when the peer took no chunk within the send timeout.

        Shielded: a response goes out whole even while its request's task is
        being cancelled; the deadline is what bounds a peer that stops reading.
        """
        if len(data) <= SEND_CHUNK:  # the usual response: one deadline, no slicing
            with trio.CancelScope(shield=True, deadline=trio.current_time() + self._send_timeout) as scope:
                await self.stream.send_all(data)
            if scope.cancelled_caught:
                self.admission.timeouts["send"] += 1
                return False
            return True
        view = memoryview(data)
        for start in range(0, len(view), SEND_CHUNK):
            with trio.CancelScope(shield=True, deadline=trio.current_time() + self._send_timeout) as scope:
                await self.stream.send_all(view[start:start + SEND_CHUNK])
            if scope.cancelled_caught:
                self.admission.timeouts["send"] += 1
                return False
        return True

    def _read_deadline(self) -> float:
        deadline = min(self._idle_deadline, self._body_deadline)
        if self.config.read_timeout is None:
            return deadline
        return min(deadline, trio.current_time() + self.config.read_timeout)

    def _watch_body(self, receiving_body: bool) -> None:
        """Start the body deadline when a head is in and its body is not, clear it after."""
        if not receiving_body:
            self._body_deadline = inf
            if self._body_bytes:
                self._release_body_bytes()
        elif self._body_deadline == inf:
            self._body_deadline = trio.current_time() + self._body_timeout

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
                # Idle for keep_alive_timeout (a head not whole by then
                # included), a body slower than its timeout, or a read that
                # took read_timeout.
                await self._timed_out()
                break
            if self._body_deadline != inf and not self._take_body_bytes(len(data)):
                # Bodies are held whole in memory until their request is
                # answered: all connections together may not hold more than
                # the budget, whatever the per-connection bound allows.
                peer_log.log(
                    log, logging.WARNING, ("http-body-budget",),
                    "refused a request body: %d bytes of bodies are being received already",
                    self.admission.body_bytes,
                )
                await self._answer_instead(_BUSY_RESPONSE)
                break
            if self._pending and len(self._pending) + len(data) < self._need:
                self._pending += data  # the fast path's request is still short of its body
                continue
            if data and self.fast_path is not None and self._core_idle():
                data = await self._answer_fast(bytes(data))
                if data is None:
                    continue  # answered, or waiting for the rest of a request
            elif self._pending:
                data, self._pending = bytes(self._pending + data), b""
                self._need = 0
            await self.protocol.handle(RawData(bytes(data)))
            if not data:
                break
            connection = getattr(self.protocol.protocol, "connection", None)
            self._watch_body(type(connection) is h11.Connection and connection.their_state is h11.SEND_BODY)
        await self.protocol.handle(Closed())

    async def _timed_out(self) -> None:
        """Say 408 when a body was late and no response has started; the caller closes."""
        if self._body_deadline > trio.current_time():
            self.admission.timeouts["idle"] += 1
            return
        self.admission.timeouts["body"] += 1
        await self._answer_instead(TIMEOUT_RESPONSE)

    def _take_body_bytes(self, size: int) -> bool:
        """Count ``size`` more bytes of a body being received; False past the agent's budget."""
        admission = self.admission
        if admission.body_bytes + size > admission.limits.http_body_bytes:
            admission.bodies_refused += 1
            return False
        admission.body_bytes += size
        self._body_bytes += size
        return True

    def _release_body_bytes(self) -> None:
        self.admission.body_bytes -= self._body_bytes
        self._body_bytes = 0

    async def _answer_instead(self, response: bytes) -> None:
        """Send ``response`` in place of the app's, if none has started; the caller closes."""
        connection = getattr(self.protocol.protocol, "connection", None)
        if self._pending or (type(connection) is h11.Connection and connection.our_state is h11.SEND_RESPONSE):
            # The app (if it has the request) gets a disconnect and no response
            # of its own goes out after this one.
            await self.protocol.handle(Closed())
            if not self._closed:
                with trio.move_on_after(1):
                    try:
                        await self.stream.send_all(response)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass

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
        buffer = bytes(self._pending) + data if self._pending else data
        self._pending = b""
        while buffer:
            try:
                request = self.fast_path.parse(buffer)
            except Incomplete as incomplete:
                self._pending = bytearray(buffer)  # grows in place while the body arrives
                self._need = incomplete.need
                if incomplete.need:
                    # The head is in, the body is arriving: busy, as the core
                    # counts a request from its head on, until the body timeout.
                    self._idle_deadline = inf
                    self._watch_body(True)
                return None
            if request is None:
                return buffer
            method, key, query, body, consumed, token = request
            self._need = 0
            self._watch_body(False)
            self._idle_deadline = inf  # busy: a durable write may take a while
            response = await self.fast_path.respond(method, key, query, body, token, self._source)
            if response is None:
                return buffer
            buffer = buffer[consumed:]
            await self.protocol_send(RawData(data=response))
            self._idle_deadline = trio.current_time() + self.config.keep_alive_timeout
        return None

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Shielded: the close is often asked for from a request's task that is
        # being cancelled (its response is done), and an unclosed socket would
        # hold the connection, and its descriptor, until the peer leaves.
        with trio.CancelScope(shield=True):
            try:
                self.stream.socket.shutdown(trio.socket.SHUT_WR)
            except OSError:
                pass  # already gone
            await self.stream.aclose()
