"""``/v1/sync``: the WebSocket edges connect to, one SyncLink per connection."""

from __future__ import annotations

import logging

import trio
from quart import Blueprint, current_app, websocket

from konsul.sync.errors import KonsulError
from konsul.sync.link import LinkClosed, SyncLink
from konsul.sync.replica import Replica
from konsul.sync.session import SyncSession
from konsul.sync.wire import WireError, decode

from .sites import SiteRegistry
from .telemetry_store import TelemetryIntake

log = logging.getLogger("konsul.hub")

sync_api = Blueprint("hub_sync", __name__)

# Anti-entropy: state vectors are exchanged again this often, so a frame lost
# inside a connection is repaired without waiting for a reconnect.
RESYNC_INTERVAL_S = 30.0


@sync_api.websocket("/v1/sync")
async def sync_socket() -> None:
    hub = current_app.config["KONSUL_HUB"]
    replica: Replica = hub["replica"]
    sites: SiteRegistry = hub["sites"]
    first = await websocket.receive()
    if not isinstance(first, bytes):
        await websocket.close(1003, "the sync protocol speaks binary CBOR frames")
        return
    site = None
    try:
        # The scopes an edge names must be open before its session starts.
        hello = decode(first)
        if hello.get("t") == "hello" and isinstance(hello.get("scopes"), list):
            for name in hello["scopes"]:
                await replica.open_scope(str(name))
    except WireError as error:  # the session below answers it to the edge
        log.debug("hello not usable before the session judges it: %s", error)
    except KonsulError as error:
        log.warning("refusing a sync connection: %s", error)
        await websocket.close(1008, str(error)[:120])
        return

    async def transmit(frame: bytes) -> None:
        await websocket.send(frame)

    session = SyncSession("hub", "hub", replica.replica_id, [])

    def on_ephemeral(scope: str, kind: str, data) -> None:
        if not intake.offer(kind, data):
            _on_ephemeral(sites, scope, kind, data)

    link = SyncLink(session, replica.scope, transmit, on_ephemeral=on_ephemeral)
    intake = TelemetryIntake(hub["telemetry"], link)
    hub["links"].add(link)
    registered = False
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(link.run)
            nursery.start_soon(intake.run)
            frame = first
            while True:
                await link.receive(frame)
                if link.peer is not None and not registered:
                    registered = True
                    site = link.peer.site
                    sites.connected(site, link.peer.replica)
                    log.info("site %s connected (replica %s)", site, link.peer.replica)
                    nursery.start_soon(_resync_forever, link)
                if registered:
                    sites.seen(site, session)
                frame = await websocket.receive()
                if not isinstance(frame, bytes):
                    raise LinkClosed("malformed", "text frame on the sync socket")
    except LinkClosed as closed:
        log.info("sync session with %s ended: %s", site or "an edge", closed)
    finally:
        link.stop()
        hub["links"].discard(link)
        if registered:
            sites.disconnected(site)
            log.info("site %s disconnected", site)


async def _resync_forever(link: SyncLink) -> None:
    while True:
        await trio.sleep(RESYNC_INTERVAL_S)
        link.resync()


def _on_ephemeral(sites: SiteRegistry, scope: str, kind: str, data) -> None:
    if kind == "checks":
        sites.report_checks(scope, data)
    elif kind == "presence":
        sites.report_presence(scope, data)
