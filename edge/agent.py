"""`konsul edge`: one site's agent, wired together.

The agent owns a nursery; every component starts with ``nursery.start`` and
reports readiness; shutdown is cancellation (DESIGN.md, decision 1). Writes are
acknowledged only once durable, so a shutdown at any moment loses nothing that
was acknowledged.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from konsul.sync.checks import CheckTable
from konsul.sync.devices import PresenceTable
from konsul.sync.events import EventLog
from konsul.sync.replica import GLOBAL_SCOPE, Replica, check_scope_name
from konsul.sync.store import PENDING_RESTORE_NAME

from konsul.protocols.admission import NetworkLimits
from konsul.protocols.audit import DEFAULT_KEEP as DEFAULT_AUDIT_KEEP
from konsul.protocols.audit import DEFAULT_MAX_BYTES as DEFAULT_AUDIT_MAX_BYTES
from konsul.protocols.gateway import GatewayContext
from konsul.protocols.listen_addr import split_addr
from konsul.protocols.oscore_contexts import OscoreContexts
from konsul.protocols.tls import ServerTls, TlsCollector, TlsFiles, reload_on_sighup

from .check_runner import CheckRunner
from .connector import HubConnector, sync_url
from .device_bridge import DeviceBridge
from .telemetry_buffer import DEFAULT_LIMIT_BYTES, TelemetryBuffer

log = logging.getLogger("konsul.edge")


@dataclass
class EdgeConfig:
    site: str
    data_dir: Path
    node: str = field(default_factory=socket.gethostname)
    http_addr: str = "127.0.0.1:8500"
    mqtt_addr: str = "127.0.0.1:1883"
    mqtt_broker: str = ""  # mqtt://host:port: attach to that broker instead of embedding one
    coap_addr: str = "127.0.0.1:5683"
    hub_url: str = ""
    allow_anonymous: bool = False
    durability: str = "full"
    telemetry_buffer_bytes: int = DEFAULT_LIMIT_BYTES
    limits: NetworkLimits = field(default_factory=NetworkLimits)
    # Access control (docs/acl.md): off only for a closed test bench; with it off
    # anyone who reaches a port may read, write and delete everything.
    acl: bool = True
    # The audit log (protocols/audit.py): "" is <data_dir>/audit.log, "-" stdout, "off" none.
    audit_log: str = ""
    audit_max_bytes: int = DEFAULT_AUDIT_MAX_BYTES
    audit_keep: int = DEFAULT_AUDIT_KEEP
    # A management token's secret (a UUID) made at start if missing (Consul's
    # acl.tokens.initial_management); local to this edge's site.
    acl_initial_management: str = ""
    # TLS (docs/security.md): the HTTP API and a TLS MQTT listener serve with
    # these files when given; ``mqtts_addr`` "" means no TLS MQTT listener.
    tls: TlsFiles | None = None
    mqtts_addr: str = ""
    # The sync link: the CA the hub's certificate must chain to (pinning; the
    # system's CAs when empty), and this site's credential at the hub: a join
    # token (`konsul sites add`) or a client certificate for mutual TLS.
    hub_ca: str = ""
    site_token: str = ""
    site_cert: str = ""
    site_key: str = ""
    # With an mqtts:// --mqtt-broker: the CA its certificate must chain to (the system's CAs when empty).
    mqtt_broker_ca: str = ""
    # CoAP devices may prove themselves with tk=<token> in the URI (in clear on the
    # network); off: only OSCORE or anonymous devices (docs/coap.md).
    coap_uri_tokens: bool = False
    # The shortest session TTL allowed (Consul's session_ttl_min, docs/http-api.md).
    session_ttl_min_s: float = 10.0
    # The DNS interface (protocols/dns_server.py): HOST:PORT, UDP and TCP; "" serves none.
    dns_addr: str = ""


@dataclass
class EdgeInfo:
    """Where a running edge listens (port 0 resolved)."""

    http_url: str
    replica_id: str
    mqtt_addr: str | None = None
    coap_addr: str | None = None
    mqtts_addr: str | None = None
    dns_addr: str | None = None


async def run_edge(config: EdgeConfig, *, task_status: trio.TaskStatus[EdgeInfo] = trio.TASK_STATUS_IGNORED) -> None:
    """Run an edge agent until cancelled."""
    from konsul.protocols.access import ensure_initial_management, open_access_control
    from konsul.protocols.http import HttpContext, create_app
    from konsul.protocols.http.metrics import make_registry
    from konsul.protocols.http.server import serve_app

    host, port = split_addr(config.http_addr, "--http-addr")
    check_scope_name(config.site)
    if config.hub_url:
        sync_url(config.hub_url)  # a malformed URL stops start-up, not the connector
    # With a hub, the hub owns the epochs (compaction); standalone, we compact
    # into local epochs that can never be mistaken for the hub's.
    # Certificates are read before anything is opened: a wrong file stops start-up.
    server_tls = None if config.tls is None else ServerTls(config.tls)
    hub_tls = hub_client_context(config)
    # A snapshot restored over HTTP (PUT /v1/snapshot) is loaded before the store opens;
    # the snapshot code (tarfile) is imported only when one is staged.
    if (Path(config.data_dir) / PENDING_RESTORE_NAME).exists():
        from konsul.sync.snapshot_restore import apply_pending

        if (restored := apply_pending(Path(config.data_dir))) is not None:
            log.warning("restored snapshot of site %s (index %s)", restored.get("Site"), restored.get("Index"))
    replica = Replica.open(
        config.data_dir, config.durability, auto_compact=not config.hub_url, epoch_authority=False
    )
    ready = False
    buffer = None
    try:
        # Opened after the replica, which holds the data directory's lock.
        buffer = TelemetryBuffer(
            Path(config.data_dir) / "telemetry.db", config.telemetry_buffer_bytes, config.durability
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            await nursery.start(buffer.run)
            if server_tls is not None:
                await nursery.start(reload_on_sighup, server_tls)
            site = replica.scope(config.site)
            replica.scope(GLOBAL_SCOPE)
            bridge = DeviceBridge(site, buffer)
            checks = CheckTable(trio.current_time)
            presence = PresenceTable()
            for service in site.catalog.services():
                if service.node == config.node:
                    checks.sync_service(service)
            # The devices' OSCORE contexts: secrets on this edge's disk, loaded when used.
            oscore = OscoreContexts(Path(config.data_dir), site)
            await nursery.start(oscore.run)
            runner = CheckRunner(site, checks, config.node, address=host if host not in ("0.0.0.0", "::") else "127.0.0.1")
            await nursery.start(runner.run)
            # Sessions and KV locks: this edge is their arbiter for its site (sync/sessions.py).
            from konsul.sync.sessions import SessionTable

            sessions = SessionTable(site, config.node, checks, ttl_min_s=config.session_ttl_min_s)
            await nursery.start(sessions.run)
            events = EventLog(config.site)  # user events (/v1/event, sync/events.py)
            connector = None
            sync_status = None  # set below; the registry reads it lazily
            registry = make_registry(replica, lambda: sync_status())
            access = open_access_control(
                replica, config.site, config.data_dir, enabled=config.acl, audit_log=config.audit_log,
                audit_max_bytes=config.audit_max_bytes, audit_keep=config.audit_keep,
                limits=config.limits, registry=registry,
            )
            await nursery.start(access.run)
            if config.acl_initial_management:
                await ensure_initial_management(replica, config.site, config.acl_initial_management)
            if config.hub_url:
                connector = HubConnector(
                    config.hub_url, replica, config.site, checks, presence, buffer,
                    site_token=config.site_token, max_clock_skew_ms=int(config.limits.max_clock_skew_s * 1000),
                    ssl_context=hub_tls,
                    events=events,
                )
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
                    "Telemetry": buffer.status(),
                    "Quarantined": replica.quarantined(),
                },
                hub_url=config.hub_url,
                presence=presence,
                telemetry=bridge,
                limits=config.limits,
                registry=registry,
                acl=access.acl,
                audit=access.audit,
                rate_limits=access.http_rate,
                oscore=oscore,
                sessions=sessions,
                events=events,
            )
            sync_status = ctx.sync_status
            app = create_app(ctx)
            if server_tls is not None:
                ctx.registry.register(TlsCollector(server_tls))
            http_url = await nursery.start(partial(serve_app, app, host, port, tls=server_tls))
            ctx.advertise = http_url.split("://", 1)[1]
            gateways = GatewayContext(
                replica=replica,
                site=config.site,
                presence=presence,
                allow_anonymous=config.allow_anonymous,
                registry=ctx.registry,
                limits=config.limits,
                acl=access.acl,
                audit=access.audit,
            )
            bridge.install(gateways)
            from .event_delivery import deliver_events

            deliver_events(events, ctx, gateways)
            bound = await nursery.start(run_device_gateways, gateways, config, server_tls, oscore)
            if config.dns_addr:  # DNS (dnspython) is imported only when served
                from konsul.protocols.dns_server import catalog_view, run_dns

                view = catalog_view(replica, config.site, config.node,
                                    lambda: ctx.advertise.rsplit(":", 1)[0].strip("[]"), checks)
                bound["dns"] = await nursery.start(
                    run_dns, view, split_addr(config.dns_addr, "--dns-addr"), config.limits, ctx.registry
                )
                log.info("dns listening on %s (UDP and TCP)", bound["dns"])
            await nursery.start(bridge.run)
            ready = True
            log.info(
                "edge %s (node %s, replica %s, data %s): http listening on %s",
                config.site,
                config.node,
                replica.replica_id,
                Path(config.data_dir).resolve(),
                http_url,
            )
            task_status.started(
                EdgeInfo(http_url, replica.replica_id, bound.get("mqtt"), bound.get("coap"), bound.get("mqtts"),
                         bound.get("dns"))
            )
    finally:
        if buffer is not None:
            buffer.close()
        replica.close()


def hub_client_context(config: EdgeConfig):
    """The sync link's TLS client context: ``--hub-ca`` pinned, ``--site-cert`` presented; None for ws://."""
    from konsul.protocols.tls import client_context

    if not config.hub_url:
        return None
    if not sync_url(config.hub_url).startswith("wss:"):
        if config.hub_ca or config.site_cert:
            raise ValueError("--hub-ca and --site-cert need an https:// --hub-url")
        return None
    return client_context(
        Path(config.hub_ca) if config.hub_ca else None,
        Path(config.site_cert) if config.site_cert else None,
        Path(config.site_key) if config.site_key else None,
    )


async def run_device_gateways(
    gateways: GatewayContext, config: EdgeConfig, server_tls: ServerTls | None = None,
    oscore: OscoreContexts | None = None, *, task_status: trio.TaskStatus[dict[str, str]],
) -> None:
    """MQTT (our own broker, trio) and CoAP (aiocoap, behind one trio-asyncio loop only when served; DESIGN.md, 2)."""
    mqtt = config.mqtt_broker or config.mqtt_addr  # a URL attaches to an external broker
    # MQTT over TLS is a listener of the embedded broker; with an external one, devices connect there.
    mqtts = "" if config.mqtt_broker or server_tls is None else config.mqtts_addr
    if config.mqtt_broker and config.mqtts_addr:
        log.info("no MQTT TLS listener (%s): devices use the broker at %s", config.mqtts_addr, config.mqtt_broker)
    wanted = {name: addr for name, addr in (("mqtt", mqtt or mqtts), ("coap", config.coap_addr)) if addr}
    if not wanted:
        task_status.started({})
        await trio.sleep_forever()
    if "coap" in wanted:
        import trio_asyncio

        asyncio_loop = trio_asyncio.open_loop()
    else:
        asyncio_loop = contextlib.nullcontext()
    async with asyncio_loop:
        async with trio.open_nursery() as nursery:
            bound: dict[str, str] = {}
            if "mqtt" in wanted:
                from konsul.protocols.mqtt import run_mqtt_gateway

                bound.update(await nursery.start(
                    partial(run_mqtt_gateway, tls_addr=mqtts, server_tls=server_tls, broker_ca=config.mqtt_broker_ca),
                    gateways, mqtt,
                ))
                if "mqtt" in bound:
                    log.info("mqtt %s %s", "using the broker" if config.mqtt_broker else "listening on", bound["mqtt"])
                if "mqtts" in bound:
                    log.info("mqtts listening on %s (MQTT over TLS)", bound["mqtts"])
            if "coap" in wanted:
                from konsul.protocols.coap import run_coap_gateway

                serve = partial(run_coap_gateway, uri_tokens=config.coap_uri_tokens, oscore=oscore)
                bound["coap"] = await nursery.start(serve, gateways, wanted["coap"])
                log.info("coap listening on %s", bound["coap"])
            task_status.started(bound)
