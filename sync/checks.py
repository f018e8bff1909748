"""Health check status: churning state, kept in memory and out of the CRDT.

Check *definitions* are part of a service entry in the replicated catalog.
Their *status* changes on every probe and TTL heartbeat, so it lives here
(DESIGN.md, decision 5) and reaches the hub as ephemeral messages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .catalog import CheckDefinition, NodeRecord, ServiceEntry
from .errors import InvalidArgument, NotFound

PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
STATES = (PASSING, WARNING, CRITICAL)
NODE_HEALTH_ID = "serfHealth"  # Consul's name for the node-level "the agent is alive" check


@dataclass(slots=True)
class CheckStatus:
    definition: CheckDefinition
    service_id: str
    service_name: str
    service_tags: tuple[str, ...]
    status: str = CRITICAL
    output: str = ""
    updated_at: float = 0.0  # monotonic seconds of the last status report
    critical_since: float | None = None


class CheckTable:
    """Status of every check of this agent's services.

    Args:
        now: monotonic seconds; trio.current_time in the agent, so tests can
            drive TTLs with a MockClock.
    """

    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        self.checks: dict[str, CheckStatus] = {}
        self.version = 0  # rises on every status change, for blocking queries
        self.listeners: list[Callable[[], None]] = []

    def sync_service(self, service: ServiceEntry) -> None:
        """Track the checks of a (re-)registered service, keeping known status."""
        self._sync(service.service_id, service.name, service.tags, service.checks)

    def sync_node(self, record: NodeRecord) -> None:
        """Track the node-level checks of this agent's node (service id "")."""
        self._sync("", "", (), record.checks)

    def _sync(self, service_id: str, name: str, tags: tuple[str, ...], checks: tuple[CheckDefinition, ...]) -> None:
        wanted = {c.check_id for c in checks}
        for check_id in [k for k, v in self.checks.items() if v.service_id == service_id]:
            if check_id not in wanted:
                del self.checks[check_id]
        now = self.now()
        for definition in checks:
            known = self.checks.get(definition.check_id)
            if known is not None and known.definition == definition and known.service_id == service_id:
                continue
            status = definition.status if definition.kind == "static" and definition.status else CRITICAL
            self.checks[definition.check_id] = CheckStatus(
                definition,
                service_id,
                name,
                tags,
                status=status,
                output=definition.output if definition.kind == "static" else "",
                updated_at=now,
                critical_since=now if status == CRITICAL else None,
            )
        self._changed()

    def drop_service(self, service_id: str) -> None:
        for check_id in [k for k, v in self.checks.items() if v.service_id == service_id]:
            del self.checks[check_id]
        self._changed()

    def report(self, check_id: str, status: str, output: str = "") -> None:
        if status not in STATES:
            raise InvalidArgument(f"status is one of {', '.join(STATES)}")
        check = self.checks.get(check_id)
        if check is None:
            raise NotFound(f"no check {check_id!r} is registered with this agent")
        now = self.now()
        check.updated_at = now
        if check.status != status or check.output != output:
            if status == CRITICAL and check.status != CRITICAL:
                check.critical_since = now
            elif status != CRITICAL:
                check.critical_since = None
            check.status, check.output = status, output
            self._changed()

    def expire_ttls(self) -> None:
        """Turn TTL checks critical whose heartbeat is overdue."""
        now = self.now()
        for check in self.checks.values():
            ttl = check.definition.ttl_s
            if check.definition.kind == "ttl" and check.status != CRITICAL:
                if now - check.updated_at > ttl:
                    check.status = CRITICAL
                    check.output = f"TTL expired (no update for {ttl:g}s)"
                    check.critical_since = now
                    self._changed()

    def next_ttl_deadline(self) -> float | None:
        deadlines = [
            c.updated_at + c.definition.ttl_s
            for c in self.checks.values()
            if c.definition.kind == "ttl" and c.status != CRITICAL
        ]
        return min(deadlines, default=None)

    def for_service(self, service_id: str) -> list[CheckStatus]:
        return [c for c in self.checks.values() if c.service_id == service_id]

    def overdue_critical(self) -> set[str]:
        """Service ids with a check critical for longer than its deregister-after."""
        now = self.now()
        doomed = set()
        for check in self.checks.values():
            after = check.definition.deregister_after_s
            if after is not None and check.critical_since is not None and check.service_id:
                if now - check.critical_since >= after:
                    doomed.add(check.service_id)
        return doomed

    def _changed(self) -> None:
        self.version += 1
        for listener in list(self.listeners):
            listener()


def node_health_definition() -> CheckDefinition:
    """Consul's ``serfHealth``: the agent of the node is alive.

    Static and passing at the agent itself (it answers, so it is alive);
    elsewhere (at the hub) its status is the one the agent last reported over
    a live link, and critical once the link is down.
    """
    return CheckDefinition(
        NODE_HEALTH_ID, "Serf Health Status", "static", status=PASSING, output="Agent alive and reachable"
    )


def agent_node_record(node: str, address: str, existing: NodeRecord | None) -> NodeRecord:
    """The node record an agent keeps for itself: its address and liveness check, other checks kept."""
    others = tuple(c for c in (existing.checks if existing else ()) if c.check_id != NODE_HEALTH_ID)
    tagged = {"lan": address, "wan": address}
    if existing is not None and existing.tagged_addresses != {"lan": existing.address, "wan": existing.address}:
        tagged = dict(existing.tagged_addresses)  # set by the operator: kept
    return NodeRecord(
        node,
        address=address,
        meta=dict(existing.meta) if existing else {},
        tagged_addresses=tagged,
        checks=(node_health_definition(), *others),
        agent=True,
    )
