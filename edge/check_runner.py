"""Runs the health checks of this agent's services.

HTTP and TCP checks are probed on their interval with their timeout; TTL checks
turn critical when their heartbeat is overdue; a service whose check stays
critical longer than ``DeregisterCriticalServiceAfter`` is deregistered.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
from urllib.parse import urlsplit

import h11
import trio

from konsul.sync.catalog import CheckDefinition
from konsul.sync.checks import CRITICAL, PASSING, WARNING, CheckTable, agent_node_record
from konsul.sync.scope import Scope

log = logging.getLogger(__name__)


async def probe_http(url: str, timeout_s: float) -> tuple[str, str]:
    """GET ``url``: 2xx passes, 429 warns, anything else is critical (Consul's rule)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return CRITICAL, f"not an http(s) URL: {url}"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    with trio.move_on_after(timeout_s) as scope:
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(parts.hostname, port)
            if parts.scheme == "https":
                stream = trio.SSLStream(stream, ssl.create_default_context(), server_hostname=parts.hostname)
            async with stream:
                status = await _get_status(stream, parts.netloc, target)
        except (OSError, trio.BrokenResourceError, h11.ProtocolError) as error:
            return CRITICAL, f"HTTP GET {url}: {error}"
    if scope.cancelled_caught:
        return CRITICAL, f"HTTP GET {url}: timed out after {timeout_s:g}s"
    output = f"HTTP GET {url}: {status}"
    if 200 <= status < 300:
        return PASSING, output
    if status == 429:
        return WARNING, output
    return CRITICAL, output


async def _get_status(stream: trio.abc.Stream, host: str, target: str) -> int:
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET", target=target, headers=[("Host", host), ("User-Agent", "konsul-check"), ("Connection", "close")]
    )
    await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Response):
            return event.status_code
        if isinstance(event, h11.ConnectionClosed):
            raise OSError("connection closed before a response")


async def probe_tcp(target: str, timeout_s: float) -> tuple[str, str]:
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return CRITICAL, f"not host:port: {target}"
    with trio.move_on_after(timeout_s):
        try:
            stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
        except OSError as error:
            return CRITICAL, f"TCP connect {target}: {error}"
        await stream.aclose()
        return PASSING, f"TCP connect {target}: Success"
    return CRITICAL, f"TCP connect {target}: timed out after {timeout_s:g}s"


class CheckRunner:
    """Keeps one probe task per HTTP/TCP check and enforces TTLs and deregistration."""

    def __init__(self, scope: Scope, checks: CheckTable, node: str, address: str = "127.0.0.1") -> None:
        self.scope = scope
        self.checks = checks
        self.node = node
        self.address = address
        self._changed = trio.Event()
        self._probes: dict[str, tuple[CheckDefinition, trio.CancelScope]] = {}
        checks.listeners.append(self.services_changed)

    def services_changed(self) -> None:
        self._changed.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.register_own_node()
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                self._changed = trio.Event()
                self._restart_probes(nursery)
                await self._deregister_overdue()
                self.checks.expire_ttls()
                deadline = self._next_deadline()
                with trio.move_on_at(deadline):
                    await self._changed.wait()

    async def register_own_node(self) -> None:
        """Keep this agent's node in its site's catalog (address, liveness check), writing only a change.

        The node record is how the hub and Consul's node endpoints know the
        agent's node; its ``serfHealth`` check is passing here and, at the hub,
        only while this edge's link is up.
        """
        existing = self.scope.catalog.node(self.node)
        wanted = agent_node_record(self.node, self.address, existing)
        if existing is None or existing.stamp is None or dataclasses.replace(existing, stamp=None) != wanted:
            existing = await self.scope.register_node(wanted)
        self.checks.sync_node(existing)

    def _next_deadline(self) -> float:
        ttl = self.checks.next_ttl_deadline()
        candidates = [ttl] if ttl is not None else []
        for check in self.checks.checks.values():
            after = check.definition.deregister_after_s
            if after is not None and check.critical_since is not None:
                candidates.append(check.critical_since + after)
        # Small slack so that a deadline is past, not equal, when we wake.
        return min(candidates, default=trio.current_time() + 3600) + 0.001

    def _restart_probes(self, nursery: trio.Nursery) -> None:
        wanted = {
            c.definition.check_id: c.definition
            for c in self.checks.checks.values()
            if c.definition.kind in ("http", "tcp")
        }
        for check_id, (definition, cancel) in list(self._probes.items()):
            if wanted.get(check_id) != definition:
                cancel.cancel()
                del self._probes[check_id]
        for check_id, definition in wanted.items():
            if check_id not in self._probes:
                cancel = trio.CancelScope()
                self._probes[check_id] = (definition, cancel)
                nursery.start_soon(self._probe_forever, definition, cancel)

    async def _probe_forever(self, definition: CheckDefinition, cancel: trio.CancelScope) -> None:
        with cancel:
            while True:
                if definition.kind == "http":
                    status, output = await probe_http(definition.target, definition.timeout_s)
                else:
                    status, output = await probe_tcp(definition.target, definition.timeout_s)
                if definition.check_id in self.checks.checks:
                    self.checks.report(definition.check_id, status, output)
                await trio.sleep(definition.interval_s)

    async def _deregister_overdue(self) -> None:
        for service_id in self.checks.overdue_critical():
            log.info("deregistering %s: critical longer than DeregisterCriticalServiceAfter", service_id)
            if self.scope.catalog.get(self.node, service_id) is not None:
                await self.scope.deregister_service(self.node, service_id)
            self.checks.drop_service(service_id)
