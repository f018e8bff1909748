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
hypercorn's own and unchanged; only HTTP/1.1 is served: the Consul API is
HTTP/1.1, and an HTTP/2 connection (an ``h2c`` upgrade, the prior-knowledge
preface, or ALPN ``h2``) would carry a hundred requests past the
per-connection bounds and the body timeout below.

TLS (docs/tls.md). With a ``ServerTls`` the one port speaks only TLS: each
connection is admitted first (a refused one costs no handshake), then wrapped
in a ``trio.SSLStream`` with the context current at that moment (so a reload
on SIGHUP applies to new connections only) and must finish its handshake
within ``HANDSHAKE_TIMEOUT_S``. A handshake that fails (a plaintext client, a
client that stops half-way, a client certificate that does not verify) ends
that connection only, is counted (``konsul_tls_handshake_failures_total``)
and logged once per source and window. Everything after the handshake (the
fast path, the core) sees the decrypted bytes, and the scope says ``https`` /
``wss`` and carries the verified client certificate as the ASGI TLS
extension (``tls_extension``).

In front of the core sits an optional fast path (``kv_fast_path.KvFastPath``,
the app's ``fast_path``): while the core has no
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
import ssl
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
from ..tls import HANDSHAKE_TIMEOUT_S, ServerTls, handshake_failure
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


async def serve_app(
    app, host: str, port: int, *, tls: ServerTls | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` until cancelled; reports the URL it bound (port 0 resolved).

    With ``tls`` the port serves HTTPS only and the URL is ``https://``.
    """
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
    fast_path = getattr(app, "fast_path", None)
    admission = getattr(app, "admission", None)
    await serve(app, config, fast_path=fast_path, admission=admission, tls=tls, task_status=task_status)


async def serve(
    app,
    config,
    *,
    fast_path=None,
    admission: ConnectionAdmission | None = None,
    tls: ServerTls | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """hypercorn's ``worker_serve`` with ``Connection`` as the runtime adapter.

    The sockets are plain TCP; with ``tls`` each connection is wrapped here
    (``_run_connection``), not by hypercorn.

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
            raise ValueError("serve() binds plain TCP sockets; give TLS as tls=ServerTls")
        listeners = []
        binds = []
        for sock in sockets.insecure_sockets:
            sock.listen(config.backlog)
            listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
            binds.append(f"{'https' if tls else 'http'}://{repr_socket_addr(sock.family, sock.getsockname())}")
        for bind in binds:
            await config.log.info(f"Running on {bind} (CTRL + C to quit)")
        admission = admission or ConnectionAdmission(NetworkLimits())
        handler = partial(
            Connection, wrapped, config, context, ConnectionState(lifespan_state.copy()),
            fast_path=fast_path, admission=admission, secure=tls is not None,
        )
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept_loop, listener, nursery, handler, admission, tls)
            task_status.started(binds[0])


async def _accept_loop(
    listener: trio.SocketListener,
    nursery: trio.Nursery,
    handler: Callable[..., Connection],
    admission: ConnectionAdmission,
    tls: ServerTls | None = None,
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
                await _refuse(stream, source, refused, tls is not None)
                continue
            nursery.start_soon(_run_connection, handler, stream, admission, source, tls)


async def _refuse(stream: trio.SocketStream, source: str, reason: str, secure: bool = False) -> None:
    """Answer 503 and close, without a task: a fresh socket's send buffer takes it at once.

    A TLS port just closes: a TLS client could not read a plaintext answer,
    and a handshake is what the bound is there to spare.
    """
    peer_log.log(
        log, logging.WARNING, ("http-refused", source),
        "refused an HTTP connection from %s: %s connection limit reached", source, reason.replace("_", " "),
    )
    if secure:
        await trio.aclose_forcefully(stream)
        return
    with trio.move_on_after(0.1):
        try:
            await stream.send_all(_refusal(reason))
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    await trio.aclose_forcefully(stream)


async def _run_connection(
    handler: Callable[..., Connection], stream: trio.SocketStream, admission, source: str,
    tls: ServerTls | None = None,
) -> None:
    served: trio.abc.Stream = stream
    try:
        if tls is not None:
            secured = await _handshake(stream, tls, source)
            if secured is None:
                return
            served = secured
        await handler(served).run()
    finally:
        admission.connections.release(source)
        await trio.aclose_forcefully(served)


_TLS_REQUIRED_BODY = (
    b'{"error":"tls_required","detail":"this port serves HTTPS only: use https:// '
    b'(and --cacert / CONSUL_CACERT with the CA that signed the agent\'s certificate)"}'
)
TLS_REQUIRED_RESPONSE = (
    b"HTTP/1.1 400 \r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
    % len(_TLS_REQUIRED_BODY) + _TLS_REQUIRED_BODY
)


async def _handshake(stream: trio.SocketStream, tls: ServerTls, source: str) -> trio.SSLStream | None:
    """The TLS handshake with a new client, within ``HANDSHAKE_TIMEOUT_S``; None when it failed.

    The context is ``tls.context`` as it is now: a reload changes what new
    connections get, never one being served. ``https_compatible``: HTTP
    clients commonly close without a ``close_notify``, and do not expect one.
    """
    secured = trio.SSLStream(stream, tls.context, server_side=True, https_compatible=True)
    reason = detail = ""
    with trio.move_on_after(HANDSHAKE_TIMEOUT_S) as scope:
        try:
            await secured.do_handshake()
        except trio.BrokenResourceError as error:
            reason, detail = handshake_failure(error, "HTTP")
            if isinstance(error.__cause__, ssl.SSLError) and error.__cause__.reason == "HTTP_REQUEST":
                # A plaintext HTTP request: say so in plain HTTP, as the
                # client is waiting for an answer it can read.
                await _answer_plain(stream, TLS_REQUIRED_RESPONSE)
            else:
                await _send_alert(stream, secured)
    if scope.cancelled_caught:
        reason, detail = "timeout", f"the handshake did not finish within {HANDSHAKE_TIMEOUT_S:g}s"
    if not reason:
        return secured
    tls.count_handshake_failure("http", reason)
    peer_log.log(log, logging.WARNING, ("http-tls", source), "TLS handshake with %s failed: %s", source, detail)
    return None


async def _send_alert(stream: trio.SocketStream, secured: trio.SSLStream) -> None:
    """Send the TLS alert OpenSSL wrote for a failed handshake, which trio leaves unsent.

    It tells the client why (``certificate required``, ``unknown ca``)
    instead of a bare reset; an edge's sync link puts it in LastError.
    """
    outgoing = getattr(secured, "_outgoing", None)  # trio.SSLStream's memory BIO
    if isinstance(outgoing, ssl.MemoryBIO) and outgoing.pending:
        await _answer_plain(stream, outgoing.read())


async def _answer_plain(stream: trio.SocketStream, response: bytes) -> None:
    with trio.move_on_after(0.1):
        try:
            await stream.send_all(response)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


def _rfc4514(name: tuple) -> str:
    """``getpeercert()``'s subject as an RFC 4514 string (most specific first, as ASGI's TLS extension has it)."""
    short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
             "localityName": "L", "stateOrProvinceName": "ST", "domainComponent": "DC", "userId": "UID",
             "streetAddress": "STREET", "serialNumber": "serialNumber", "emailAddress": "emailAddress"}

    def escape(value: str) -> str:
        value = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
        if value[:1] in ("#", " "):
            value = "\\" + value
        if value.endswith(" "):
            value = value[:-1] + "\\ "
        return value

    return ",".join(
        "+".join(f"{short.get(key, key)}={escape(str(value))}" for key, value in rdn) for rdn in reversed(name)
    )


_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


def tls_extension(stream: trio.SSLStream) -> dict[str, Any]:
    """The ASGI TLS extension (``scope["extensions"]["tls"]``) of a handshaken connection.

    The spec's keys, plus what konsul reads to map a client certificate to a
    site: ``client_cert_subject`` (attribute name -> value, e.g.
    ``{"commonName": "plant-7"}``), ``client_cert_common_name`` and
    ``client_cert_san`` (``[("DNS", "plant-7"), ("URI", ...)]``). The client
    fields are set only for a certificate that verified against ``--tls-ca``;
    without a CA the server asks for none and they are empty.
    """
    cert = stream.getpeercert() or {}
    der = stream.getpeercert(binary_form=True) if cert else None
    subject = cert.get("subject", ())
    flat = {key: value for rdn in subject for key, value in rdn}
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": _rfc4514(subject) if cert else None,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(stream.version() or ""),
        "cipher_suite": None,
        "client_cert_subject": flat,
        "client_cert_common_name": flat.get("commonName"),
        "client_cert_san": [tuple(entry) for entry in cert.get("subjectAltName", ())],
    }


class TaskGroup:
    """hypercorn's trio ``TaskGroup``: the app of each request runs in its own task.

    ``tls``: the connection's ASGI TLS extension, put in every request's scope
    here (hypercorn's core builds the scope and knows nothing of it).
    """

    def __init__(self, nursery: trio.Nursery, tls: dict[str, Any] | None = None) -> None:
        self._nursery = nursery
        self._tls = tls

    async def spawn_app(self, app, config, scope, send):
        if self._tls is not None:
            scope["extensions"]["tls"] = self._tls
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

    # A response's head is held until its body's first chunk, which hypercorn
    # sends right after it, so that a small answer leaves in one write (one
    # syscall and one scheduling step instead of two: bench/blocking_fanout.py).
    _held_head = b""

    async def _send_h11_event(self, event) -> None:
        try:
            data = self.connection.send(event)
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            return
        if type(event) is h11.Response:
            self._held_head = data
            return
        if self._held_head:
            head, self._held_head = self._held_head, b""
            if len(data) <= SEND_CHUNK:
                data = head + data
            else:
                await self.send(RawData(data=head))
        await self.send(RawData(data=data))


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
        self, app, config, context, state, stream: trio.abc.Stream, *, fast_path=None,
        admission: ConnectionAdmission | None = None, secure: bool = False,
    ) -> None:
        self.app = app
        self.secure = secure  # ``stream`` is a handshaken trio.SSLStream
        self.fast_path = fast_path
        self._pending = b""  # read, offered to the fast path, not yet answered
        self.config = config
        self.context = context
        self.state = state
        self.stream = stream
        # The TCP socket under a TLS stream too: addresses, and the shutdown at close.
        self.socket = (stream.transport_stream if secure else stream).socket
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
            socket = self.socket
            client = parse_socket_addr(socket.family, socket.getpeername())
            server = parse_socket_addr(socket.family, socket.getsockname())
            self._source = source_of(client)
            async with trio.open_nursery() as nursery:
                task_group = TaskGroup(nursery, tls_extension(self.stream) if self.secure else None)
                # ``secure``: the scope's scheme is https / wss.
                self.protocol = ProtocolWrapper(
                    self.app, self.config, self.context, task_group, self.state,
                    self.secure, client, server, self.protocol_send, "http/1.1",
                )
                self.protocol.protocol = Http11Only(
                    self.app, self.config, self.context, task_group, self.state,
                    self.secure, client, server, self.protocol_send,
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
                self.socket.shutdown(trio.socket.SHUT_WR)
            except OSError:
                pass  # already gone
            await self.stream.aclose()
