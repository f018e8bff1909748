"""The broker's listening sockets, on trio: accept, connection caps, TLS handshakes.

Each accepted connection counts against the per-source and total caps
(``protocols/admission.py``) before anything is read from it; one over a cap
is closed at once and counted (``konsul_mqtt_refused_total{reason="connections"}``).
An accept that fails for want of file descriptors backs off and tries again
instead of ending the agent. On a TLS listener the handshake runs under
``HANDSHAKE_TIMEOUT_S``: a plaintext client, a client that does not trust our
certificate, one without the certificate ``--tls-verify-client on`` asks for,
or one that stalls, ends only its own connection and is counted
(``ServerTls.count_handshake_failure``, with HTTPS's failures).
"""

from __future__ import annotations

import errno
import logging
import resource
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from konsul.protocols.admission import ConnectionLimit, source_of
from konsul.protocols.tls import HANDSHAKE_TIMEOUT_S, handshake_failure
from konsul.sync.log_limits import peer_log

log = logging.getLogger("konsul.mqtt")

# Accept failing for want of descriptors or memory: wait, doubling, then try again.
ACCEPT_RETRY_MIN, ACCEPT_RETRY_MAX = 0.05, 1.0
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
FD_SHARE = 0.75  # of the open-files limit, MQTT connections may hold at most this share


@dataclass(frozen=True)
class Listener:
    """One listening address of the broker; with ``tls`` (a ``protocols.tls.ServerTls``) MQTT over TLS."""

    host: str
    port: int
    tls: Any = None


Serve = Callable[[trio.abc.Stream, str], Awaitable[None]]  # (stream, "host:port" of the peer)


async def listen(host: str, port: int) -> list[trio.SocketListener]:
    """Listening sockets on every address ``host`` names, all on one port (port 0: one picked for all)."""
    infos = await trio.socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[trio.socket.SocketType] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = trio.socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:  # one port for every address
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            await sock.bind(address)
            sock.listen(1024)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return [trio.SocketListener(sock) for sock in sockets]


class Acceptor:
    """Accepts connections on the broker's listeners and hands each admitted one to ``serve``."""

    def __init__(self, refusals: Any, limits: Any, serve: Serve) -> None:
        self.refusals = refusals
        self.serve = serve
        self.admission = ConnectionLimit(min(limits.mqtt_connections, fd_budget()), limits.mqtt_connections_per_source)
        if self.admission.total < limits.mqtt_connections:
            log.warning(
                "at most %d MQTT connections (%d%% of the open-files limit, not --mqtt-connections %d); "
                "raise the limit (ulimit -n, LimitNOFILE=) for more",
                self.admission.total, int(FD_SHARE * 100), limits.mqtt_connections,
            )

    async def accept_loop(self, listener: trio.SocketListener, tls: Any, nursery: trio.Nursery) -> None:
        """Accept until cancelled; never ends on an error a peer or the system causes."""
        retry = ACCEPT_RETRY_MIN
        while True:
            try:
                stream = await listener.accept()
            except OSError as error:
                # Out of descriptors (or buffers): the connection waits in the
                # backlog while others end. Never fatal, and logged rate-limited.
                self.refusals.count("accept")
                peer_log.log(log, logging.WARNING, ("mqtt-accept", error.errno),
                             "MQTT accept failed (%s); retrying in %.2fs", error.strerror or error, retry)
                if error.errno not in _OUT_OF_RESOURCES:
                    log.debug("unexpected accept error", exc_info=True)
                await trio.sleep(retry)
                retry = min(retry * 2, ACCEPT_RETRY_MAX)
                continue
            retry = ACCEPT_RETRY_MIN
            try:
                address = stream.socket.getpeername()
            except OSError:
                await trio.aclose_forcefully(stream)  # gone already
                continue
            source = source_of(address)
            bound = self.admission.try_admit(source)
            if bound is not None:
                await trio.aclose_forcefully(stream)  # closed before anything is read or allocated for it
                self.refusals.count("connections")
                held = self.admission.count if bound == "total" else self.admission.held_by(source)
                cap = self.admission.total if bound == "total" else self.admission.per_source
                peer_log.log(log, logging.WARNING, ("mqtt-connections", source),
                             "refused an MQTT connection from %s: %d connections held %s (at most %d)",
                             source, held, "in total" if bound == "total" else "by this address", cap)
                continue
            peer = f"{address[0]}:{address[1]}"
            # The context is taken now: a SIGHUP reload (protocols/tls.py) serves every connection accepted after it.
            nursery.start_soon(self._connection, stream, peer, source, tls, None if tls is None else tls.context)

    async def _connection(self, stream: trio.SocketStream, peer: str, source: str, tls: Any,
                          context: ssl.SSLContext | None) -> None:
        served: trio.abc.Stream = stream
        try:
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if context is not None:
                secured = await self._handshake(stream, peer, source, tls, context)
                if secured is None:
                    return
                served = secured
            await self.serve(served, peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the peer went away; nothing else to do for it
        except Exception:
            # Contained to this connection: one client's bad luck must not end the agent.
            peer_log.log(log, logging.ERROR, ("mqtt-failed", source), "MQTT connection from %s failed", source, exc_info=True)
        finally:
            self.admission.release(source)
            await trio.aclose_forcefully(served)

    async def _handshake(self, stream: trio.SocketStream, peer: str, source: str, tls: Any,
                         context: ssl.SSLContext) -> trio.SSLStream | None:
        secured = trio.SSLStream(stream, context, server_side=True)
        error: BaseException | None = None
        with trio.move_on_after(HANDSHAKE_TIMEOUT_S) as scope:
            try:
                await secured.do_handshake()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as failed:
                error = failed
        if scope.cancelled_caught:
            reason, detail = "timeout", f"not finished within {HANDSHAKE_TIMEOUT_S:g}s"
        elif error is not None:
            reason, detail = handshake_failure(error, "MQTT")
        else:
            return secured
        tls.count_handshake_failure("mqtt", reason)  # konsul_tls_handshake_failures_total, with HTTPS's
        self.refusals.tls_failed(peer, source, detail)
        return None


def fd_budget() -> int:
    """The MQTT connections the open-files limit leaves room for (the rest: HTTP, SQLite, CoAP)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(1, int(soft * FD_SHARE))
