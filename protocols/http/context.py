"""What the HTTP adapter needs from the agent that hosts it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import trio

from konsul.sync.checks import CheckTable
from konsul.sync.devices import Presence, PresenceTable
from konsul.sync.errors import NotFound
from konsul.sync.replica import GLOBAL_SCOPE, Replica
from konsul.sync.scope import Scope
from konsul.sync.telemetry import Sample

from ..admission import NetworkLimits

if TYPE_CHECKING:
    from konsul.sync.acl_resolver import AclResolver
    from konsul.sync.events import EventLog

    from ..audit import AuditLog
    from ..rate_limit import HttpRateLimits


class TelemetrySource(Protocol):
    """Where an agent keeps telemetry: the edge's buffer, the hub's store."""

    async def ingest(self, site: str, items: list[tuple[str, Any]]) -> None: ...

    async def samples(
        self, devices: list[tuple[str, str]], since_ms: int | None, until_ms: int | None, limit: int
    ) -> list[tuple[str, Sample]]: ...


class ChangeFeed:
    """Wakes blocking queries: one event per (scope, collection), renewed on change."""

    def __init__(self) -> None:
        self._events: dict[tuple[str, str], trio.Event] = {}
        self._watched: set[str] = set()

    def event(self, scope: str, collection: str) -> trio.Event:
        key = (scope, collection)
        found = self._events.get(key)
        if found is None:
            found = self._events[key] = trio.Event()
        return found

    def notify(self, scope: str, collection: str) -> None:
        # "any" is for readers that depend on more than one collection.
        for key in ((scope, collection), (scope, "any")):
            found = self._events.pop(key, None)
            if found is not None:
                found.set()

    def watch(self, scope: Scope) -> None:
        if scope.name in self._watched:
            return
        self._watched.add(scope.name)
        scope.listeners.append(lambda collection, keys: self.notify(scope.name, collection))


@dataclass
class HttpContext:
    """The agent's state and identity, as the HTTP routes see them.

    Args:
        replica: the durable state.
        site: this agent's own scope (Consul's datacenter).
        node: this agent's node name.
        checks: status of the checks of this agent's services.
        advertise: the address clients reach this agent at (``/v1/status/leader``).
        sync_status: returns the ``/v1/sync/status`` document.
        ready: returns whether the agent is ready to serve.
    """

    replica: Replica
    site: str
    node: str
    checks: CheckTable
    advertise: str = "127.0.0.1:8500"
    role: str = "edge"
    sync_status: Callable[[], dict[str, Any]] = lambda: {"peers": []}
    ready: Callable[[], bool] = lambda: True
    feed: ChangeFeed = field(default_factory=ChangeFeed)
    on_service_change: Callable[[], None] = lambda: None
    registry: Any = None  # prometheus CollectorRegistry
    # (site, check id) -> (status, output) as the site's edge last reported it
    remote_check_status: Callable[[str, str], tuple[str, str] | None] = lambda site, check: None
    # site -> a number that moves whenever remote_check_status may answer differently for it
    remote_checks_version: Callable[[str], int] = lambda site: 0
    hub_url: str = ""
    presence: PresenceTable = field(default_factory=PresenceTable)
    # (site, device id) -> presence; the edge's own table, the hub's per-site reports
    remote_presence: Callable[[str, str], Presence | None] = lambda site, device: None
    telemetry: TelemetrySource | None = None
    limits: NetworkLimits = field(default_factory=NetworkLimits)
    # Access control (docs/acl.md). None: made in __post_init__, enforcing.
    acl: AclResolver | None = None
    audit: AuditLog | None = None  # None: no audit log (--audit-log off)
    rate_limits: HttpRateLimits | None = None  # None: no rate limits
    oscore: Any = None  # an edge's OscoreContexts (protocols/oscore_contexts.py); None at the hub
    # /v1/agent/members beyond this agent itself (the hub: one member per site), Consul's shape
    members: Callable[[], list[dict[str, Any]]] = lambda: []
    sessions: Any = None  # an edge's SessionTable (sync/sessions.py); None at the hub: it grants no locks
    events: EventLog | None = None  # user events (/v1/event); None: not served

    def device_presence(self, site: str, device_id: str) -> Presence:
        if site == self.site and self.role == "edge":
            return self.presence.get(device_id)
        return self.remote_presence(site, device_id) or Presence()

    def __post_init__(self) -> None:
        if self.acl is None:
            from konsul.sync.acl_resolver import AclResolver

            self.acl = AclResolver(self.replica, self.site)
        for name in {self.site, GLOBAL_SCOPE}:
            self.feed.watch(self.replica.scope(name))
        self.checks.listeners.append(lambda: self.feed.notify(self.site, "checks"))

    def scope(self, dc: str | None) -> Scope:
        """The scope a request's ``?dc=`` names; the agent's own site by default."""
        name = dc or self.site
        if self.role == "edge" and name not in (self.site, GLOBAL_SCOPE):
            hub = f"the hub at {self.hub_url}" if self.hub_url else "the hub"
            raise NotFound(
                f"datacenter {name!r} is not replicated at this edge (it holds {self.site!r} "
                f"and {GLOBAL_SCOPE!r}); ask {hub} for other sites"
            )
        scope = self.replica.scopes.get(name)
        if scope is None:
            raise NotFound(f"no site {name!r} has synced with this hub yet")
        self.feed.watch(scope)
        return scope
