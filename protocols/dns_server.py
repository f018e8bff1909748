"""The DNS interface (``--dns-addr``): trio UDP and TCP sockets around :mod:`dns_answers`.

One address, both transports, as Consul's agent (port 8600). What each
question answers is :mod:`konsul.protocols.dns_answers`' job; this module owns
the sockets and the bounds on what peers may cost (DESIGN.md, decision 8):

- every query, UDP or TCP, is charged to its source address's token bucket
  (``--dns-rate-per-source`` / ``--dns-burst-per-source``); one over the rate is
  dropped without an answer (answering would make the server a reflector for
  spoofed floods) and counted in ``konsul_rate_limited_total{interface="dns"}``;
- TCP connections are admitted per source and in total (``--dns-max-connections``,
  ``--dns-max-connections-per-source``), must send a whole query within
  :data:`TCP_IDLE_TIMEOUT_S`, and take answers one at a time;
- malformed packets (bad labels, compression-pointer loops, truncated
  sections) are FORMERR or dropped, counted in ``konsul_dns_queries_total``
  by outcome; nothing a peer sends ends more than its own TCP connection.

Imported only when DNS is on, so dnspython is not loaded otherwise.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable

import trio

from konsul.sync.catalog import CheckDefinition, NodeRecord
from konsul.sync.checks import CRITICAL, CheckTable
from konsul.sync.log_limits import peer_log
from konsul.sync.replica import Replica

from .admission import ConnectionLimit, NetworkLimits, source_of
from .dns_answers import AnswerCache, DnsView, Instance
from .rate_limit import TokenBuckets

log = logging.getLogger("konsul.dns")

TCP_IDLE_TIMEOUT_S = 10.0  # a TCP client sends its (next) query within this, or is closed
MAX_UDP_QUERY = 4096  # bytes read of a datagram; a longer one is cut, then FORMERR
OUTCOMES = ("service", "node", "addr", "apex", "nodata", "nxdomain", "refused", "truncated", "malformed",
            "notimp", "not_a_query", "rate_limited", "connections")


def catalog_view(replica: Replica, site: str, node: str, node_address: Callable[[], str], checks: CheckTable) -> DnsView:
    """The site's catalog as DNS reads it (through ``Scope.catalog``'s public methods).

    An instance is healthy when none of its checks, nor its node's, is
    critical, as ``/v1/health/service`` reports them here
    (protocols/http/catalog_routes.py): this agent's own from its check
    table; a node registered through ``/v1/catalog/register`` with the status
    registered with each check (nobody runs them, as Consul's catalog checks);
    another agent's checks as unknown, so critical. An instance without an
    address of its own answers with its node's, as Consul's DNS does.
    """

    def instances(name: str) -> list[Instance]:
        wanted = name.lower()
        catalog = replica.scope(site).catalog
        own_checks_expired = False
        found = []
        for entry in catalog.services():
            if entry.name.lower() != wanted:
                continue
            if entry.node == node:
                if not own_checks_expired:
                    checks.expire_ttls()
                    own_checks_expired = True
                statuses = [c.status for c in checks.for_service(entry.service_id)]
                statuses += [c.status for c in checks.checks.values() if not c.service_id]  # maintenance, ...
                address = entry.address or node_address()
            else:
                record = catalog.node(entry.node)
                statuses = [_registered_status(record, d) for d in entry.checks]
                statuses += [_registered_status(record, d) for d in (record.checks if record is not None else ())]
                address = entry.address or (record.address if record is not None else "")
            healthy = all(status != CRITICAL for status in statuses)
            found.append(Instance(entry.node, address, entry.port, entry.tags, healthy))
        return found

    def address_of(name: str) -> str | None:
        if name == node.lower():
            return node_address()
        catalog = replica.scope(site).catalog
        record = catalog.node(name)
        if record is None:  # DNS names are case-insensitive, catalog node names are not
            record = next((r for r in catalog.nodes() if r.node.lower() == name), None)
        return record.address or None if record is not None else None

    def generation() -> tuple[int, int, int]:
        scope = replica.scope(site)
        return (scope.catalog.last_index, checks.version, id(scope))

    return DnsView(site.lower(), instances, address_of, generation)


def _registered_status(record: NodeRecord | None, definition: CheckDefinition) -> str:
    """A check of another node: its registered status on a node registered through the catalog, else unknown."""
    if record is not None and not record.agent:
        return definition.status or CRITICAL
    return CRITICAL  # an agent's check whose status is not reported to this one


class DnsMetrics:
    def __init__(self, registry) -> None:
        from prometheus_client import CollectorRegistry, Counter

        registry = registry if registry is not None else CollectorRegistry(auto_describe=False)
        self.queries = Counter(
            "konsul_dns_queries", "DNS queries, by transport and outcome", ["transport", "outcome"], registry=registry
        )
        for transport in ("udp", "tcp"):
            for outcome in OUTCOMES:
                self.queries.labels(transport, outcome)


class DnsServer:
    """Serves one view on one address, UDP and TCP."""

    def __init__(self, view: DnsView, limits: NetworkLimits, registry=None) -> None:
        self.view = view
        self.cache = AnswerCache(view)
        self.metrics = DnsMetrics(registry)
        self.rate = TokenBuckets(
            limits.dns_rate_per_source, limits.dns_burst_per_source, interface="dns", kind="source", registry=registry
        )
        self.connections = ConnectionLimit(limits.dns_connections, limits.dns_connections_per_source)

    async def run(self, host: str, port: int, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; reports ``host:port`` (port 0: the one picked, the same for both)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        udp, tcp = await _bind_pair(family, host, port)
        tcp_listeners = None
        try:
            bound_port = udp.getsockname()[1]
            tcp_listeners = [trio.SocketListener(tcp)]
            where = f"[{host}]:{bound_port}" if family == socket.AF_INET6 else f"{host}:{bound_port}"
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve_udp, udp)
                nursery.start_soon(self._serve_tcp, tcp_listeners)
                task_status.started(where)
        finally:
            udp.close()
            for listener in tcp_listeners or ():
                await trio.aclose_forcefully(listener)

    # -- UDP -----------------------------------------------------------------------------

    async def _serve_udp(self, udp: trio.socket.SocketType) -> None:
        while True:
            try:
                wire, peer = await udp.recvfrom(MAX_UDP_QUERY)
            except OSError as error:
                # ICMP port unreachable from an earlier answer's peer, and the like:
                # that peer's problem, never the server's.
                if error.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    peer_log.log(log, logging.WARNING, ("dns-udp", "recv"), "DNS UDP receive failed: %s", error)
                continue
            out = self._respond(wire, peer, "udp")
            if out is not None:
                try:
                    await udp.sendto(out, peer)
                except OSError as error:
                    peer_log.log(log, logging.DEBUG, ("dns-udp", source_of(peer)), "DNS answer not sent: %s", error)

    # -- TCP -----------------------------------------------------------------------------

    async def _serve_tcp(self, listeners: list[trio.SocketListener]) -> None:
        await trio.serve_listeners(self._tcp_connection, listeners)

    async def _tcp_connection(self, stream: trio.SocketStream) -> None:
        try:
            peer = stream.socket.getpeername()
        except OSError:
            await stream.aclose()
            return
        source = source_of(peer)
        with self.connections.admitted(source) as refused:
            if refused is not None:
                self.metrics.queries.labels("tcp", "connections").inc()
                peer_log.log(log, logging.WARNING, ("dns-tcp", source), "DNS TCP connection from %s refused: %s "
                             "connection limit", source, refused)
                await trio.aclose_forcefully(stream)
                return
            try:
                await self._tcp_queries(stream, peer)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # the peer went away
            finally:
                await trio.aclose_forcefully(stream)

    async def _tcp_queries(self, stream: trio.SocketStream, peer) -> None:
        buffer = bytearray()
        while True:
            with trio.move_on_after(TCP_IDLE_TIMEOUT_S):
                while True:
                    if len(buffer) >= 2 and len(buffer) >= 2 + int.from_bytes(buffer[:2], "big"):
                        break
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return  # closed by the peer
                    buffer += chunk
            if len(buffer) < 2 or len(buffer) < 2 + int.from_bytes(buffer[:2], "big"):
                return  # idle or too slow: the connection's place goes to someone else
            size = int.from_bytes(buffer[:2], "big")
            wire = bytes(buffer[2:2 + size])
            del buffer[:2 + size]
            out = self._respond(wire, peer, "tcp")
            if out is not None:
                await stream.send_all(len(out).to_bytes(2, "big") + out)

    # -- both ----------------------------------------------------------------------------

    def _respond(self, wire: bytes, peer, transport: str) -> bytes | None:
        if self.rate.take(source_of(peer)) is not None:
            self.metrics.queries.labels(transport, "rate_limited").inc()
            return None
        try:
            out, outcome = self.cache.answer(wire, udp=transport == "udp")
        except Exception:  # noqa: BLE001 - a bug on one query must not stop the listener
            peer_log.log(log, logging.ERROR, ("dns-bug", source_of(peer)), "DNS query from %s failed",
                         source_of(peer), exc_info=True)
            return None
        self.metrics.queries.labels(transport, outcome).inc()
        return out


async def _bind_pair(family: int, host: str, port: int) -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    """A UDP and a listening TCP socket on one port; with port 0, one free for both.

    The port the system picks for UDP may be taken for TCP by someone else: then
    another is tried (a given port that is taken is an error, as for any listener).
    """
    for attempt in range(50):
        udp = trio.socket.socket(family, socket.SOCK_DGRAM)
        tcp = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            await udp.bind((host, port))
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await tcp.bind((host, udp.getsockname()[1]))
            tcp.listen(128)
            return udp, tcp
        except OSError as error:
            udp.close()
            tcp.close()
            if port != 0 or error.errno != errno.EADDRINUSE or attempt == 49:
                raise OSError(error.errno, f"DNS cannot listen on {host}:{port} (--dns-addr): {error.strerror}; "
                              "give another address, or --dns-addr '' to serve no DNS") from None
        except BaseException:
            udp.close()
            tcp.close()
            raise
    raise AssertionError("unreachable")


async def run_dns(
    view: DnsView, addr: tuple[str, int], limits: NetworkLimits, registry=None,
    *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve DNS on ``addr`` until cancelled; reports where."""
    await DnsServer(view, limits, registry).run(*addr, task_status=task_status)
