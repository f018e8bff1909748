"""Health check status: churning state, kept in memory and out of the CRDT.

Check *definitions* are part of a service entry in the replicated catalog.
Their *status* changes on every probe and TTL heartbeat, so it lives here
(DESIGN.md, decision 5) and reaches the hub as ephemeral messages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .catalog import CheckDefinition, ServiceEntry
from .errors import InvalidArgument, NotFound

PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
STATES = (PASSING, WARNING, CRITICAL)


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
        wanted = {c.check_id for c in service.checks}
        for check_id in [k for k, v in self.checks.items() if v.service_id == service.service_id]:
            if check_id not in wanted:
                del self.checks[check_id]
        now = self.now()
        for definition in service.checks:
            known = self.checks.get(definition.check_id)
            if known is not None and known.definition == definition:
                continue
            self.checks[definition.check_id] = CheckStatus(
                definition,
                service.service_id,
                service.name,
                service.tags,
                updated_at=now,
                critical_since=now,
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
            if after is not None and check.critical_since is not None:
                if now - check.critical_since >= after:
                    doomed.add(check.service_id)
        return doomed

    def _changed(self) -> None:
        self.version += 1
        for listener in list(self.listeners):
            listener()
