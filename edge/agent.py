"""`konsul edge`: one site's agent, wired together.

The agent owns a nursery; every component starts with ``nursery.start`` and
reports readiness; shutdown is cancellation (DESIGN.md, decision 1). Writes are
acknowledged only once durable, so a shutdown at any moment loses nothing that
was acknowledged.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from konsul.sync.checks import CheckTable
from konsul.sync.devices import PresenceTable
from konsul.sync.replica import GLOBAL_SCOPE, Replica, check_scope_name

from .check_runner import CheckRunner
from .connector import HubConnector, sync_url

log = logging.getLogger("konsul.edge")


@dataclass
class EdgeConfig:
    site: str
    data_dir: Path
    node: str = field(default_factory=socket.gethostname)
    http_addr: str = "127.0.0.1:8500"
    mqtt_addr: str = "127.0.0.1:1883"
    coap_addr: str = "127.0.0.1:5683"
    hub_url: str = ""
    allow_anonymous: bool = False
    durability: str = "full"


@dataclass
class EdgeInfo:
    """Where a running edge listens (port 0 resolved)."""

    http_url: str
    replica_id: str


def split_addr(addr: str, what: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what} must be HOST:PORT, got {addr!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def run_edge(config: EdgeConfig, *, task_status: trio.TaskStatus[EdgeInfo] = trio.TASK_STATUS_IGNORED) -> None:
    """Run an edge agent until cancelled."""
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.trio import serve

    from konsul.protocols.http import HttpContext, create_app

    host, port = split_addr(config.http_addr, "--http-addr")
    check_scope_name(config.site)
    if config.hub_url:
        sync_url(config.hub_url)  # a malformed URL stops start-up, not the connector
    # With a hub, the hub owns the epochs (compaction); standalone, we compact
    # into local epochs that can never be mistaken for the hub's.
    replica = Replica.open(
        config.data_dir, config.durability, auto_compact=not config.hub_url, epoch_authority=False
    )
    ready = False
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            site = replica.scope(config.site)
            replica.scope(GLOBAL_SCOPE)
            checks = CheckTable(trio.current_time)
            presence = PresenceTable()
            for service in site.catalog.services():
                if service.node == config.node:
                    checks.sync_service(service)
            runner = CheckRunner(site, checks, config.node)
            await nursery.start(runner.run)
            connector = None
            if config.hub_url:
                connector = HubConnector(config.hub_url, replica, config.site, checks)
                await nursery.start(connector.run)
            ctx = HttpContext(
                replica=replica,
                site=config.site,
                node=config.node,
                checks=checks,
                advertise=f"{host}:{port}",
                on_service_change=runner.services_changed,
                ready=lambda: ready,
                sync_status=lambda: {
                    "Site": config.site,
                    "Replica": replica.replica_id,
                    "HubURL": config.hub_url or None,
                    "Peers": [] if connector is None else [connector.status()],
                },
                hub_url=config.hub_url,
                presence=presence,
            )
            app = create_app(ctx)
            hyper = HypercornConfig()
            hyper.bind = [f"{host}:{port}"]
            hyper.accesslog = None
            hyper.errorlog = logging.getLogger("hypercorn.error")
            hyper.graceful_timeout = 1.0
            binds = await nursery.start(partial(serve, app, hyper, shutdown_trigger=trio.sleep_forever))
            http_url = binds[0]
            ctx.advertise = http_url.split("://", 1)[1]
            ready = True
            log.info(
                "edge %s (node %s, replica %s, data %s): http listening on %s",
                config.site,
                config.node,
                replica.replica_id,
                Path(config.data_dir).resolve(),
                http_url,
            )
            task_status.started(EdgeInfo(http_url, replica.replica_id))
    finally:
        replica.close()
