"""What the hub's own routes share: the replica, the sites, the open sync links and their refusals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from konsul.protocols.http.request import request

if TYPE_CHECKING:
    from konsul.protocols.admission import NetworkLimits
    from konsul.sync.events import EventLog
    from konsul.sync.link import SyncLink
    from konsul.sync.replica import Replica

    from .site_credentials import SiteCredentials
    from .sites import SiteRegistry
    from .telemetry_store import TelemetryStore


class SyncRefusals:
    """Sessions the hub ended over what a peer sent, by reason (``konsul_sync_refused_total``);
    user events it dropped from a session it kept, by reason (``konsul_sync_events_dropped_total``)."""

    def __init__(self) -> None:
        self.by_code: dict[str, int] = {}
        self.events_dropped: dict[str, int] = {}

    def add(self, code: str) -> None:
        self.by_code[code] = self.by_code.get(code, 0) + 1

    def drop_event(self, reason: str, count: int = 1) -> None:
        self.events_dropped[reason] = self.events_dropped.get(reason, 0) + count


@dataclass
class HubState:
    """The hub's state beyond what every agent has (``HttpContext``), handed to its routes with the app.

    Args:
        replica: every site's state and the global scope.
        sites: each site's connection and reports (checks, presence).
        telemetry: the samples the sites forward.
        limits: the hub's bounds, for sync sessions.
        site_credentials: the sites' join tokens.
        links: the sync links open now, one per connected edge.
        sync_refusals: sessions ended over what the peer sent.
        events: user events, handed on to the edges; None: not kept.
    """

    replica: Replica
    sites: SiteRegistry
    telemetry: TelemetryStore
    limits: NetworkLimits
    site_credentials: SiteCredentials
    links: set[SyncLink] = field(default_factory=set)
    sync_refusals: SyncRefusals = field(default_factory=SyncRefusals)
    events: EventLog | None = None


def current_hub() -> HubState:
    """The hub state of the app serving the request being handled."""
    return request.app.hub
