"""``/v1/sync``: the WebSocket edges connect to, one SyncLink per connection.

Who may sync (docs/security.md). With ACLs on, a connection must present a
live site credential before the WebSocket opens: the site's join token
(``X-Konsul-Site-Token``, or ``Authorization: Bearer``) or, over TLS with a
client CA, a client certificate naming a site the hub has added. Without one
the handshake is answered 401 and nothing is opened or created. The session
is then bound to that site: a hello for another site or for any scope but
the site's own and ``global`` is refused, and ``global`` is read-only unless
the site was added with ``--global write``. Replacing or revoking a site's
credential ends its open sessions at once.

Whatever a peer sends ends at most its own session: a frame the session or
the link refuses is answered with an ``error`` frame and the connection is
closed; any other failure of one session is logged (one line, rate-limited
per source address) and closes that connection only. Scopes are opened, and
on the hub created, only for a hello the session accepted as a whole (at most
``NetworkLimits.sync_scopes_per_session`` well-formed names).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from konsul.protocols.access import count_refusal
from konsul.protocols.admission import NetworkLimits, source_of
from konsul.protocols.http.authz import token_from
from konsul.protocols.http.request import request
from konsul.protocols.http.router import Routes
from konsul.protocols.http.websocket import websocket
from konsul.sync.errors import KonsulError
from konsul.sync.events import EventLog, UserEvent
from konsul.sync.hlc import system_wall_ms
from konsul.sync.link import LinkClosed, SyncLink
from konsul.sync.log_limits import peer_log
from konsul.sync.replica import GLOBAL_SCOPE, Replica
from konsul.sync.scope import COLLECTIONS
from konsul.sync.session import SyncSession

from .site_credentials import SiteCredentialRequired, SiteCredentials
from .sites import SiteRegistry
from .state import HubState, SyncRefusals, current_hub
from .telemetry_store import TelemetryIntake

log = logging.getLogger("konsul.hub")

sync_api = Routes("hub_sync")

# Anti-entropy: state vectors are exchanged again this often, so a frame lost
# inside a connection is repaired without waiting for a reconnect.
RESYNC_INTERVAL_S = 30.0
# An edge says hello at once; a connection that does not is not kept open.
HELLO_TIMEOUT_S = 10.0
# How long the error frame that ends a refused session may take to go out.
FAREWELL_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class SyncGrant:
    """What one sync connection may do, decided before its WebSocket opens."""

    site: str | None  # the only site it may sync; None: any (ACLs off)
    global_write: bool  # whether its changes to ``global`` are taken
    credential: str  # "join-token", "certificate" or "open" (ACLs off)


OPEN_GRANT = SyncGrant(None, True, "open")
SITE_TOKEN_HEADER = "X-Konsul-Site-Token"


def admit_sync(source: str) -> SyncGrant:
    """The grant of the connecting site, or the 401 that ends the handshake.

    With ACLs off (a closed test bench) anyone may sync any one site, as
    anyone may do anything else there.
    """
    ctx = request.ctx
    if not ctx.acl.enabled:
        return OPEN_GRANT
    hub = current_hub()
    credentials: SiteCredentials = hub.site_credentials
    try:
        if ctx.rate_limits is not None:  # the address first, as at every door
            refused = ctx.rate_limits.check_source(source)
            if refused is not None:
                raise refused
        secret = websocket.headers.get(SITE_TOKEN_HEADER) or token_from(websocket.headers.get, None)
        found = credentials.identify(secret.strip() if secret else None)
        how = "join-token"
        if found is None:
            named = certificate_site(websocket.scope)
            found = None if named is None else credentials.get(named)
            if found is not None and found.revoked is not None:
                found = None
            how = "certificate"
        if found is None:
            raise SiteCredentialRequired(
                "sync needs this site's credential: its join token (`konsul sites add SITE` at the hub prints it; "
                "`konsul edge --site-token`) or a client certificate for an added site; the one given is "
                "unknown, revoked or missing"
            )
    except KonsulError as error:
        hub.sync_refusals.add("unauthorized")
        count_refusal(ctx.registry, "sync", error.code)
        if ctx.audit is not None:
            ctx.audit.record(
                accessor=None, source=source, interface="sync", operation="sync:connect",
                resource="/v1/sync", result="denied", reason=f"{error.code}: {error}",
            )
        peer_log.log(log, logging.WARNING, ("sync-refused", source), "refused sync from %s: %s", source, error)
        raise
    return SyncGrant(found.site, found.global_access == "write", how)


def certificate_site(scope: dict) -> str | None:
    """The site a TLS client certificate names (its common name), if any.

    The server fills the TLS extension's client fields only for a
    certificate that verified against ``--tls-ca`` (protocols/http/server.py).
    """
    tls = (scope.get("extensions") or {}).get("tls") or {}
    name = tls.get("client_cert_common_name")
    return name if isinstance(name, str) and name else None


@sync_api.websocket("/v1/sync")
async def sync_socket() -> None:
    hub = current_hub()
    source = source_of(websocket.remote_addr)
    grant = admit_sync(source)
    refusals = hub.sync_refusals
    key = ("sync-frame", source)
    first = None
    with trio.move_on_after(HELLO_TIMEOUT_S):
        first = await websocket.receive()
    if first is None:
        refusals.add("no_hello")
        peer_log.log(log, logging.INFO, key, "sync connection from %s sent no hello in %.0f s", source, HELLO_TIMEOUT_S)
        await websocket.close(1008, "no hello")
        return
    if not isinstance(first, bytes):
        refusals.add("text_frame")
        await websocket.close(1003, "the sync protocol speaks binary CBOR frames")
        return
    try:
        await _serve(hub, first, source, refusals, grant)
    except Exception as error:  # noqa: BLE001 - one session's failure, never the hub's
        refusals.add("internal")
        peer_log.log(
            log, logging.WARNING, key, "sync session from %s failed: %s", source,
            _describe(error), exc_info=log.isEnabledFor(logging.DEBUG),
        )


async def _serve(hub: HubState, first: bytes, source: str, refusals: SyncRefusals, grant: SyncGrant) -> None:
    replica: Replica = hub.replica
    sites: SiteRegistry = hub.sites
    limits: NetworkLimits = hub.limits

    async def transmit(frame: bytes) -> None:
        await websocket.send(frame)

    session = SyncSession(
        "hub", "hub", replica.replica_id, [], max_scopes=limits.sync_scopes_per_session,
        bound_site=grant.site, wall_ms=system_wall_ms, max_peer_ahead_ms=int(limits.max_clock_skew_s * 1000),
    )

    def on_ephemeral(scope: str, kind: str, data) -> None:
        if kind == "events":
            take_events(hub, grant, source, scope, data)
        elif not intake.offer(kind, data):
            _on_ephemeral(sites, scope, kind, data)

    link = SyncLink(
        session, replica.scope, transmit, on_ephemeral=on_ephemeral, open_scopes=replica.open_scopes,
        # Fleet-wide ACL records (policies, global tokens) are made at the hub
        # only: an edge, however it came to hold some, never changes them here.
        # The rest of global only from a site allowed to write it.
        read_only=frozenset({(GLOBAL_SCOPE, "acl")}) if grant.global_write
        else frozenset((GLOBAL_SCOPE, collection) for collection in COLLECTIONS),
    )
    intake = TelemetryIntake(hub.telemetry, link, source, replica, int(limits.max_clock_skew_s * 1000))
    hub.links.add(link)
    site = None
    registered = False
    closed: LinkClosed | None = None
    ended = trio.CancelScope()  # cancelled when the site's credential is replaced or revoked
    revoked = False

    def on_credential_changed(changed: str) -> None:
        nonlocal revoked
        if grant.site is not None and changed == grant.site:
            revoked = True
            ended.cancel()

    credentials: SiteCredentials = hub.site_credentials
    credentials.listeners.append(on_credential_changed)
    try:
        with ended:
            async with trio.open_nursery() as nursery:
                await nursery.start(link.run)
                nursery.start_soon(intake.run)
                frame = first
                try:
                    while True:
                        await link.receive(frame)
                        if link.peer is not None and not registered:
                            registered = True
                            site = link.peer.site
                            sites.connected(site, link.peer.replica)
                            peer_log.log(
                                log, logging.INFO, ("sync-session", source),
                                "site %s connected from %s (replica %s)", site, source, link.peer.replica,
                            )
                            nursery.start_soon(_resync_forever, link)
                            replay_events(hub, link)
                        if registered:
                            sites.seen(site, session)
                        await link.drained()
                        frame = await websocket.receive()
                        if not isinstance(frame, bytes):
                            link.refuse("malformed", "text frame on the sync socket")
                except LinkClosed as error:
                    closed = error
                nursery.cancel_scope.cancel()
        if revoked and closed is None:
            try:
                link.refuse("site_revoked", f"the credential of site {grant.site} was replaced or revoked at the hub")
            except LinkClosed as error:
                closed = error
        if closed is not None:
            if not closed.by_peer:
                refusals.add(closed.code)
            level = logging.INFO if closed.by_peer else logging.WARNING
            peer_log.log(
                log, level, ("sync-frame", source), "sync session with %s from %s ended: %s",
                site or "an edge", source, closed,
            )
            with trio.move_on_after(FAREWELL_TIMEOUT_S):
                try:
                    await link.flush()  # the error frame that tells the peer why
                except Exception:  # noqa: BLE001 - the peer may be gone already
                    pass
    finally:
        credentials.listeners.remove(on_credential_changed)
        link.stop()
        hub.links.discard(link)
        if registered:
            sites.disconnected(site)
            peer_log.log(log, logging.INFO, ("sync-session", source), "site %s (%s) disconnected", site, source)


def _describe(error: BaseException) -> str:
    if isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        return _describe(error.exceptions[0])
    return f"{type(error).__name__}: {str(error)[:200]}"


async def _resync_forever(link: SyncLink) -> None:
    while True:
        await trio.sleep(RESYNC_INTERVAL_S)
        link.resync()


def _on_ephemeral(sites: SiteRegistry, scope: str, kind: str, data) -> None:
    if kind == "checks":
        sites.report_checks(scope, data)
    elif kind == "presence":
        sites.report_presence(scope, data)
    elif kind == "telemetry-status":
        sites.report_telemetry(scope, data)


# -- user events (sync/events.py) ------------------------------------------------------


def take_events(hub: HubState, grant: SyncGrant, source: str, scope: str, data) -> None:
    """An edge's events: kept, and handed on to every other edge holding the scope.

    A site allowed to read ``global`` only may not fire fleet-wide events:
    those are dropped, logged and counted (``konsul_sync_events_dropped_total{reason="global_read_only"}``);
    the session goes on.
    """
    events: EventLog | None = hub.events
    if events is None:
        return
    if scope == GLOBAL_SCOPE and not grant.global_write:
        # Counted per event (an edge replays its recent ones, none at first, on every connection).
        dropped = len(data) if isinstance(data, list) else 1
        if not dropped:
            return
        hub.sync_refusals.drop_event("global_read_only", dropped)
        peer_log.log(
            log, logging.INFO, ("sync-event", source), "events for %s from %s dropped: the site may only read %s "
            "(konsul sites add SITE --global write)", GLOBAL_SCOPE, source, GLOBAL_SCOPE,
        )
        return
    before = events.refused
    events.merge(scope, data)  # the listener below hands new ones on
    if events.refused != before:
        hub.sync_refusals.add("event_malformed")


def forward_event(hub: HubState, scope: str, event: UserEvent, local: bool) -> None:
    """Send a new event to every connected edge that holds ``scope`` (the one it came from drops it: seen)."""
    wire = [event.to_wire()]
    for link in list(hub.links):
        if link.peer is not None and scope in link.session.scopes:
            link.send_ephemeral(scope, "events", wire)


def replay_events(hub: HubState, link: SyncLink) -> None:
    """The recent events of a newly connected edge's scopes (those it missed while away)."""
    events: EventLog | None = hub.events
    if events is not None:
        for scope in link.session.scopes:
            link.send_ephemeral(scope, "events", events.replay(scope))
