"""`konsul hub`: the central replica of every site and of the fleet-wide scope.

Each scope lives in its own store under ``<data-dir>/scopes/<name>``. The hub
owns the epochs: its scopes compact on their own, and connected edges adopt
the new epoch from the snapshot it sends.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from konsul.sync.checks import CheckTable
from konsul.sync.replica import GLOBAL_SCOPE, Replica
from konsul.sync.store import PENDING_RESTORE_NAME

from konsul.protocols.admission import NetworkLimits
from konsul.protocols.tls import ServerTls, TlsCollector, TlsFiles, reload_on_sighup
from konsul.protocols.audit import DEFAULT_KEEP as DEFAULT_AUDIT_KEEP
from konsul.protocols.audit import DEFAULT_MAX_BYTES as DEFAULT_AUDIT_MAX_BYTES

log = logging.getLogger("konsul.hub")


@dataclass
class HubConfig:
    data_dir: Path
    http_addr: str = "127.0.0.1:8700"
    durability: str = "full"
    limits: NetworkLimits = field(default_factory=NetworkLimits)
    # Access control (docs/acl.md): off only for a closed test bench; with it off
    # anyone who reaches a port may read, write and delete everything.
    acl: bool = True
    # The audit log (protocols/audit.py): "" is <data_dir>/audit.log, "-" stdout, "off" none.
    audit_log: str = ""
    audit_max_bytes: int = DEFAULT_AUDIT_MAX_BYTES
    audit_keep: int = DEFAULT_AUDIT_KEEP
    # A management token's secret (a UUID) made at start if missing (Consul's
    # acl.tokens.initial_management); global, so it reaches every edge.
    acl_initial_management: str = ""
    # TLS for the HTTP API and /v1/sync (docs/security.md); with ``verify_client``
    # and a CA, sites may authenticate with a client certificate instead of a join token.
    tls: TlsFiles | None = None
    # site -> join token made at start if missing, allowed to write global (`konsul dev`).
    initial_site_tokens: dict[str, str] = field(default_factory=dict)


@dataclass
class HubInfo:
    http_url: str
    replica_id: str


async def run_hub(config: HubConfig, *, task_status: trio.TaskStatus[HubInfo] = trio.TASK_STATUS_IGNORED) -> None:
    from konsul.protocols.access import ensure_initial_management, open_access_control
    from konsul.protocols.http import HttpContext, create_app
    from konsul.protocols.http.metrics import make_registry
    from konsul.protocols.http.server import serve_app
    from konsul.protocols.listen_addr import split_addr

    from .fleet_routes import fleet_api, site_summaries
    from .sites import SiteRegistry
    from .sync_endpoint import sync_api
    from .telemetry_store import TelemetryStore

    from .site_credentials import SiteCredentials
    from .state import HubState
    from .sync_metrics import HubRefusalCollector

    host, port = split_addr(config.http_addr, "--http-addr")
    limits = config.limits
    # Certificates are read before anything is opened: a wrong file stops start-up.
    server_tls = None if config.tls is None else ServerTls(config.tls)
    # A snapshot restored over HTTP (PUT /v1/snapshot) is loaded before the stores open;
    # the snapshot code (tarfile) is imported only when one is staged.
    if (Path(config.data_dir) / PENDING_RESTORE_NAME).exists():
        from konsul.sync.snapshot_restore import apply_pending

        if (restored := apply_pending(Path(config.data_dir))) is not None:
            log.warning("restored hub snapshot (%d scopes)", len(restored.get("ScopeIndexes", {})))
    replica = Replica.open(
        config.data_dir, config.durability, per_scope_stores=True,
        max_scopes=_scopes_that_fit(limits.sync_scopes_total),
        max_clock_skew_ms=int(limits.max_clock_skew_s * 1000),
    )
    telemetry = None
    try:
        # Opened after the replica, which holds the data directory's lock.
        telemetry = TelemetryStore(Path(config.data_dir) / "telemetry.db", config.durability)
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            await nursery.start(telemetry.run)
            if server_tls is not None:
                await nursery.start(reload_on_sighup, server_tls)
            await replica.open_scope(GLOBAL_SCOPE)
            sites = SiteRegistry()
            sync_status = None  # set below; the registry reads it lazily
            registry = make_registry(replica, lambda: sync_status())
            access = open_access_control(
                replica, GLOBAL_SCOPE, config.data_dir, enabled=config.acl, audit_log=config.audit_log,
                audit_max_bytes=config.audit_max_bytes, audit_keep=config.audit_keep,
                limits=config.limits, registry=registry,
            )
            await nursery.start(access.run)
            if config.acl_initial_management:
                await ensure_initial_management(replica, GLOBAL_SCOPE, config.acl_initial_management)
            site_credentials = SiteCredentials(replica.store)
            for site, secret in config.initial_site_tokens.items():
                await site_credentials.ensure(site, secret, "write", "made at start")
            hub_state = HubState(replica, sites, telemetry, config.limits, site_credentials)
            # User events (/v1/event): kept per scope, handed on to the edges (sync/events.py).
            from konsul.sync.events import EventLog

            from .sync_endpoint import forward_event

            events = hub_state.events = EventLog("hub")
            events.listeners.append(lambda scope, event, local: forward_event(hub_state, scope, event, local))
            ctx = HttpContext(
                replica=replica,
                site=GLOBAL_SCOPE,
                node="hub",
                checks=CheckTable(trio.current_time),
                role="hub",
                remote_check_status=sites.check_status,
                remote_checks_version=sites.checks_version,
                remote_presence=sites.device_presence,
                members=lambda: sites.members(replica),
                telemetry=telemetry,
                limits=config.limits,
                registry=registry,
                acl=access.acl,
                audit=access.audit,
                rate_limits=access.http_rate,
                events=events,
            )
            from konsul.protocols.http.event_routes import notify_event

            events.listeners.append(lambda scope, event, local: notify_event(ctx, scope))
            # A site's reported check status wakes blocking health reads of its scope.
            sites.on_checks_changed = lambda site: ctx.feed.notify(site, "checks")
            sync_status = ctx.sync_status = lambda: {
                "Peers": [_peer_status(summary) for summary in site_summaries(hub_state)],
                "Telemetry": telemetry.status(),
                "Quarantined": replica.quarantined(),
            }
            app = create_app(ctx, extra_routes=[sync_api, fleet_api], hub=hub_state)
            ctx.registry.register(HubRefusalCollector(hub_state))
            if server_tls is not None:
                ctx.registry.register(TlsCollector(server_tls))
            http_url = await nursery.start(partial(serve_app, app, host, port, tls=server_tls))
            ctx.advertise = http_url.split("://", 1)[1]
            log.info(
                "hub (replica %s, data %s): http listening on %s",
                replica.replica_id,
                Path(config.data_dir).resolve(),
                http_url,
            )
            task_status.started(HubInfo(http_url, replica.replica_id))
    finally:
        if telemetry is not None:
            telemetry.close()
        replica.close()


# Measured: each scope's store holds 6 file descriptors (database, WAL and
# shared memory, for its writer and its checkpointer; and the directory lock)
# and 2 threads, about 0.4 MB of memory. Descriptors kept for everything else:
# HTTP and sync connections, telemetry, the data directory's own store.
FDS_PER_SCOPE = 7
FDS_KEPT_FREE = 256


def _scopes_that_fit(configured: int) -> int:
    """``configured``, or fewer if the process's descriptor limit cannot hold that many stores."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    fitting = max(1, (soft - FDS_KEPT_FREE) // FDS_PER_SCOPE)
    if fitting < configured:
        log.warning(
            "the file descriptor limit (%d) holds %d scopes, not the %d configured: new sites past %d are "
            "refused; raise the limit (ulimit -n, LimitNOFILE) to about %d",
            soft, fitting, configured, fitting, configured * FDS_PER_SCOPE + FDS_KEPT_FREE,
        )
    return min(configured, fitting)


def _peer_status(site: dict) -> dict:
    """A /v1/sites row in the shape of an edge's /v1/sync/status peer."""
    return {
        "Peer": site["Site"],
        "Connected": site["Connected"],
        "LastContact": site["LastSeen"],
        "PendingChanges": site["PendingToEdge"],
        "BytesSent": site["BytesSent"],
        "BytesReceived": site["BytesReceived"],
        "Conflicts": site["Conflicts"],
    }
