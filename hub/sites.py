"""What the hub knows about each site beyond its replicated state.

Connection state, last contact and the ephemeral check status an edge reports
are not replicated (DESIGN.md, decision 5): they live here, in memory, and are
rebuilt as edges reconnect.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from konsul.sync.devices import Presence

TELEMETRY_STATUS_FIELDS = ("buffered", "buffered_bytes", "dropped", "forwarded")


@dataclass
class SiteState:
    site: str
    connections: int = 0
    last_seen: float | None = None  # wall-clock seconds
    replica: str | None = None
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    presence: dict[str, dict[str, Any]] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    pending_to_edge: int = 0
    session_received: int = 0  # counters of the current session, already added
    session_sent: int = 0
    # The edge's telemetry buffer counters (ephemeral "telemetry-status"); None until it reports.
    telemetry: dict[str, int] | None = None
    # Moves whenever the check status the hub shows for the site may have changed (a report,
    # a connection or its end): part of the index of health reads at the hub.
    checks_version: int = 0


class SiteRegistry:
    def __init__(self) -> None:
        self.sites: dict[str, SiteState] = {}
        # Told the site whose shown check status changed (wakes blocking health queries).
        self.on_checks_changed: Callable[[str], None] = lambda site: None

    def get(self, site: str) -> SiteState:
        found = self.sites.get(site)
        if found is None:
            found = self.sites[site] = SiteState(site)
        return found

    def connected(self, site: str, replica: str) -> None:
        state = self.get(site)
        state.connections += 1
        state.session_received = state.session_sent = 0
        state.replica = replica
        state.last_seen = time.time()
        self._checks_changed(state)

    def disconnected(self, site: str) -> None:
        state = self.get(site)
        state.connections = max(0, state.connections - 1)
        state.last_seen = time.time()
        if not state.connections:  # its checks read "not known here" from now on
            self._checks_changed(state)

    def seen(self, site: str, session: Any) -> None:
        """A frame arrived from the site: note the time and the session's counters."""
        state = self.get(site)
        state.last_seen = time.time()
        state.bytes_received += session.bytes_received - state.session_received
        state.bytes_sent += session.bytes_sent - state.session_sent
        state.session_received, state.session_sent = session.bytes_received, session.bytes_sent
        state.pending_to_edge = session.pending_acks

    def report_checks(self, site: str, checks: Any) -> None:
        if isinstance(checks, dict):
            state = self.get(site)
            reported = {str(k): v for k, v in checks.items() if isinstance(v, dict)}
            if reported != state.checks:
                state.checks = reported
                self._checks_changed(state)

    def checks_version(self, site: str) -> int:
        state = self.sites.get(site)
        return 0 if state is None else state.checks_version

    def _checks_changed(self, state: SiteState) -> None:
        state.checks_version += 1
        self.on_checks_changed(state.site)

    def report_presence(self, site: str, devices: Any) -> None:
        if isinstance(devices, dict):
            self.get(site).presence = {str(k): v for k, v in devices.items() if isinstance(v, dict)}

    def report_telemetry(self, site: str, status: Any) -> None:
        """An edge's telemetry buffer counters; anything but counts is ignored."""
        if not isinstance(status, dict):
            return
        counts = {
            name: status[name] for name in TELEMETRY_STATUS_FIELDS
            if type(status.get(name)) is int and status[name] >= 0
        }
        if counts:
            self.get(site).telemetry = counts

    def device_presence(self, site: str, device_id: str) -> Presence | None:
        """A device's presence as its edge last reported it; offline once the edge is gone."""
        state = self.sites.get(site)
        found = None if state is None else state.presence.get(device_id)
        if found is None:
            return None
        online = bool(found.get("online")) and state.connections > 0
        last_seen = found.get("last_seen")
        # A peer's number: JSON has no infinity or NaN to show it with.
        usable = isinstance(last_seen, (int, float)) and not isinstance(last_seen, bool) and math.isfinite(last_seen)
        return Presence(
            online,
            last_seen if usable else None,
            str(found.get("protocol", "")),
            str(found.get("address", "")),
        )

    def check_status(self, site: str, check_id: str) -> tuple[str, str] | None:
        """The last status an edge reported for one of its checks, if connected."""
        state = self.sites.get(site)
        if state is None or not state.connections:
            return None
        found = state.checks.get(check_id)
        if found is None:
            return None
        return str(found.get("status", "critical")), str(found.get("output", ""))

    def members(self, replica: Any) -> list[dict[str, Any]]:
        """Each site as a Consul member (``/v1/agent/members`` at the hub): alive while its edge is connected.

        A member is named after the site's agent node, as that edge registered
        it in its site's catalog, or after the site until it has.
        """
        from konsul.protocols.http.agent_self import MEMBER_ALIVE, MEMBER_FAILED, member_json

        found = []
        for site in sorted((set(replica.scopes) | set(self.sites)) - {"global"}):
            scope = replica.scopes.get(site)
            nodes = [r for r in scope.catalog.nodes() if r.agent] if scope is not None else []
            state = self.sites.get(site)
            alive = state is not None and state.connections > 0
            extra = {"konsul_role": "edge", "site": site}
            if state is not None and state.replica:
                extra["replica"] = state.replica
            for name, address in [(r.node, r.address) for r in nodes] or [(site, "")]:
                found.append(member_json(name, address, site, "node", MEMBER_ALIVE if alive else MEMBER_FAILED, extra))
        return found
