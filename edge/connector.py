"""The edge's connection to the hub: reconnects forever, syncs while it can.

Local reads and writes never wait for it. It connects, exchanges state vectors
(so a reconnect sends only what the other side lacks), streams changes both
ways, reports check status as ephemeral messages, and after a failure retries
with exponential backoff and jitter.

What the hub has confirmed is remembered in the store (``acked_stamp/<scope>``):
after a restart the edge still knows which of its writes the hub may lack,
which matters when it must adopt a new epoch from the hub.
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import trio

from konsul.sync.batch import WriteBatch
from konsul.sync.checks import CheckTable
from konsul.sync.devices import PresenceTable
from konsul.sync.events import EventLog, UserEvent
from konsul.sync.hlc import Stamp, system_wall_ms
from konsul.sync.link import LinkClosed, SyncLink, is_panic
from konsul.sync.log_limits import peer_log
from konsul.sync.replica import GLOBAL_SCOPE, Replica
from konsul.sync.session import SyncSession
from konsul.sync.wire import MAX_FRAME_BYTES

from .telemetry_buffer import TelemetryBuffer
from .telemetry_forwarder import TelemetryForwarder

log = logging.getLogger("konsul.edge.sync")

BACKOFF_START_S = 0.2
BACKOFF_MAX_S = 15.0
RESYNC_INTERVAL_S = 30.0
HANDSHAKE_TIMEOUT_S = 10.0
# How often the telemetry buffer's counters are looked at; sent to the hub
# (ephemeral "telemetry-status") only when they changed.
TELEMETRY_STATUS_INTERVAL_S = 1.0
TELEMETRY_STATUS_KIND = "telemetry-status"


def _first_of(error: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """``error`` itself, or the first of ``kinds`` inside a (nested) exception group."""
    if isinstance(error, kinds):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _first_of(inner, kinds)
            if found is not None:
                return found
    return None


def _holds_panic(error: BaseException) -> bool:
    """Whether ``error`` is, or a group holding only such errors holds, a pyo3 panic or an Exception."""
    if is_panic(error):
        return True
    if isinstance(error, BaseExceptionGroup):
        return all(isinstance(inner, Exception) or _holds_panic(inner) for inner in error.exceptions)
    return False


def _describe(error: BaseException) -> str:
    """Why the link failed, for LastError; a failed TLS handshake says what to check."""
    cause = error.__cause__ if isinstance(error, trio.BrokenResourceError) else error
    if isinstance(cause, ssl.SSLCertVerificationError):
        return (
            f"TLS: the hub's certificate was refused ({cause.verify_message}); "
            "is --hub-ca the CA that signed it, and does it name the host in --hub-url?"
        )
    if isinstance(cause, ssl.SSLError):
        reason = cause.reason or str(cause)
        if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
            return "TLS: the hub requires a client certificate (it runs with --tls-verify-client on); give --site-cert and --site-key"
        if reason in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN"):
            return (
                f"TLS: the hub refused this site's certificate ({reason}); is --site-cert signed by the CA "
                "the hub trusts (its --tls-ca)?"
            )
        return f"TLS handshake with the hub failed ({reason}); check --hub-url, --hub-ca, --site-cert"
    return str(error) or type(error).__name__


class _FirstStreamError(trio.abc.Stream):
    """``stream``, remembering the first error a read or a send raised and calling ``on_error``.

    Lets the sync link's opening see why the hub closed a TLS connection
    (``_open_tls_websocket``): trio_websocket's reader task takes such an
    error for a closed connection and leaves the opening to its timeout.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.error: BaseException | None = None
        self.on_error: Callable[[], None] | None = None

    def _failed(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
            if self.on_error is not None:
                self.on_error()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            data = await self.stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
            self._failed(error)
            raise
        if not data and self.on_error is not None:  # closed while the WebSocket was opening
            self._failed(trio.BrokenResourceError(
                "the hub closed the TLS connection before the sync WebSocket opened; "
                "does it require a client certificate (--site-cert)?"
            ))
        return data

    async def send_all(self, data) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
            self._failed(error)
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


def sync_url(hub_url: str) -> str:
    """``http://hub:8700`` -> ``ws://hub:8700/v1/sync``."""
    parts = urlsplit(hub_url if "://" in hub_url else f"http://{hub_url}")
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"--hub-url must be http(s)://HOST:PORT, got {hub_url!r}")
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/v1/sync", "", ""))


class HubConnector:
    """Keeps one edge in sync with its hub."""

    def __init__(
        self,
        hub_url: str,
        replica: Replica,
        site: str,
        checks: CheckTable,
        presence: PresenceTable | None = None,
        telemetry: TelemetryBuffer | None = None,
        site_token: str = "",
        max_clock_skew_ms: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        events: EventLog | None = None,
    ) -> None:
        self.hub_url = hub_url
        # The hub admits a sync link with this site's join token (docs/security.md).
        self._headers = [(b"x-konsul-site-token", site_token.encode())] if site_token else []
        self.max_clock_skew_ms = max_clock_skew_ms
        self.url = sync_url(hub_url)
        # For a wss:// URL: the CA the hub's certificate must chain to and this
        # site's client certificate (tls.client_context); None: the system's CAs.
        self.ssl_context = ssl_context
        self.replica = replica
        self.site = site
        self.checks = checks
        self.scopes = [site, GLOBAL_SCOPE]
        self.connected = False
        self.last_contact: float | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.connects = 0
        self.last_error: str | None = None
        self.acked: dict[str, Stamp | None] = {}
        for name in self.scopes:
            raw = replica.store.meta(f"acked_stamp/{name}")
            self.acked[name] = Stamp.decode(raw) if raw else None
        self._link: SyncLink | None = None
        self._acked_dirty = trio.Event()
        checks.listeners.append(self._push_checks)
        self.forwarder = None if telemetry is None else TelemetryForwarder(telemetry, site)
        self.presence = presence
        if presence is not None:
            presence.listeners.append(lambda device_id, state: self._push_presence())
        # User events fired here go to the hub as they happen; on (re)connection
        # both sides replay their recent ones (sync/events.py).
        self.events = events
        if events is not None:
            events.listeners.append(self._push_event)

    # -- status ------------------------------------------------------------------

    def pending_changes(self) -> int:
        """Own writes the hub has not confirmed yet (live versions stamped after the last ack)."""
        me = self.replica.replica_id
        total = 0
        for name in self.scopes:
            scope = self.replica.scope(name)
            after = self.acked.get(name)
            for versions in (scope.kv.versions, scope.catalog.versions, scope.devices.versions):
                total += sum(
                    1 for v in versions.all_versions()
                    if v.stamp.replica == me and (after is None or v.stamp > after)
                )
        return total

    def status(self) -> dict[str, Any]:
        conflicts = sum(self.replica.scope(n).conflicts() for n in self.scopes)
        return {
            "Peer": self.hub_url,
            "Connected": self.connected,
            "LastContact": None if self.last_contact is None
            else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.last_contact)),
            "PendingChanges": self.pending_changes(),
            "BytesSent": self.bytes_sent,
            "BytesReceived": self.bytes_received,
            "Conflicts": conflicts,
            "Connects": self.connects,
            "LastError": self.last_error,
        }

    # -- running -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._persist_acked_forever)
            task_status.started()
            backoff = BACKOFF_START_S
            while True:
                disconnects = (
                    OSError, HandshakeError, ConnectionClosed, LinkClosed, trio.TooSlowError, trio.BrokenResourceError,
                )
                try:
                    if self.url.startswith("wss:"):
                        opened = self._open_tls_websocket()
                    else:
                        opened = open_websocket_url(
                            self.url, connect_timeout=HANDSHAKE_TIMEOUT_S, max_message_size=MAX_FRAME_BYTES,
                            extra_headers=self._headers,
                        )
                    async with opened as ws:
                        await self._session(ws)
                except BaseException as error:
                    if not isinstance(error, Exception) and not _holds_panic(error):
                        raise  # cancellation, KeyboardInterrupt: the edge is stopping
                    reason = _first_of(error, disconnects)
                    if reason is not None:
                        self.last_error = _describe(reason)[:300]
                        peer_log.log(
                            log, logging.INFO, ("sync-hub", self.hub_url),
                            "hub %s unreachable or gone: %s", self.hub_url, self.last_error,
                        )
                    else:
                        # Whatever the hub sent, or a bug in syncing, must not
                        # stop the edge serving locally (a Rust panic in pycrdt
                        # included: pyo3 raises it as a BaseException).
                        self.last_error = f"internal error: {error!r}"[:300]
                        peer_log.log(
                            log, logging.ERROR, ("sync-hub", self.hub_url),
                            "sync with hub %s failed; retrying", self.hub_url, exc_info=True,
                        )
                finally:
                    was_open, self.connected, self._link = self.connected, False, None
                if was_open:
                    backoff = BACKOFF_START_S
                delay = backoff * random.uniform(0.5, 1.5)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                await trio.sleep(delay)

    @asynccontextmanager
    async def _open_tls_websocket(self) -> AsyncIterator[Any]:
        """The sync WebSocket over TLS, the TLS handshake done first.

        trio_websocket would do the handshake inside its reader task, where a
        refused certificate is swallowed and the connect waits for its
        timeout; done here, it fails at once with the reason (for LastError).
        """
        from trio_websocket import wrap_client_stream

        parts = urlsplit(self.url)
        host, port = parts.hostname or "", parts.port or 443
        context = self.ssl_context or ssl.create_default_context()
        with trio.fail_after(HANDSHAKE_TIMEOUT_S):
            tcp = await trio.open_tcp_stream(host, port)
            stream = trio.SSLStream(tcp, context, server_hostname=host, https_compatible=True)
            try:
                await stream.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        watched = _FirstStreamError(stream)
        try:
            async with trio.open_nursery() as nursery:
                with trio.CancelScope() as opening:
                    watched.on_error = opening.cancel
                    with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                        ws = await wrap_client_stream(
                            nursery, watched, parts.netloc, parts.path or "/", extra_headers=self._headers,
                            max_message_size=MAX_FRAME_BYTES,
                        )
                watched.on_error = None
                if opening.cancelled_caught:
                    # With TLS 1.3 the hub's verdict on our certificate comes
                    # after our side of the handshake is done, as an alert on
                    # the first read, in trio_websocket's reader task, which
                    # would swallow it and leave the connect to its timeout.
                    raise watched.error or trio.BrokenResourceError("the hub closed the connection")
                try:
                    yield ws
                finally:
                    with trio.move_on_after(1):
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
        finally:
            await trio.aclose_forcefully(stream)

    async def _session(self, ws) -> None:
        """One connection's life, until it fails."""
        session = SyncSession(
            "edge", self.site, self.replica.replica_id, self.scopes,
            wall_ms=system_wall_ms, max_peer_ahead_ms=self.max_clock_skew_ms,
        )
        link = SyncLink(
            session,
            self.replica.scope,
            ws.send_message,
            on_covered=self._covered,
            rebase_after=lambda scope, collection: self.acked.get(scope),
            on_ephemeral=self._on_ephemeral,
        )
        sent_before, received_before = 0, 0
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(link.run)
                link.start()
                with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                    while link.peer is None:
                        await link.receive(await ws.get_message())
                self._opened(link)
                nursery.start_soon(self._resync_forever, link)
                if self.forwarder is not None:
                    nursery.start_soon(self.forwarder.run, link)
                    nursery.start_soon(self._telemetry_status_forever, link)
                while True:
                    await link.drained()
                    frame = await ws.get_message()
                    if not isinstance(frame, bytes):
                        raise LinkClosed("malformed", "text frame on the sync socket")
                    self.last_contact = time.time()
                    await link.receive(frame)
                    self.bytes_sent += session.bytes_sent - sent_before
                    self.bytes_received += session.bytes_received - received_before
                    sent_before, received_before = session.bytes_sent, session.bytes_received
        finally:
            link.stop()
            self.bytes_sent += session.bytes_sent - sent_before
            self.bytes_received += session.bytes_received - received_before

    def _opened(self, link: SyncLink) -> None:
        self._link = link
        self.connected = True
        self.connects += 1
        self.last_contact = time.time()
        self.last_error = None
        log.info("synced with hub %s (hub replica %s)", self.hub_url, link.peer.replica)
        self._push_checks()
        self._push_presence()
        if self.events is not None:
            for name in self.scopes:
                link.send_ephemeral(name, "events", self.events.replay(name))

    async def _resync_forever(self, link: SyncLink) -> None:
        while True:
            await trio.sleep(RESYNC_INTERVAL_S)
            link.resync()

    # -- acknowledgements and ephemeral state -------------------------------------

    def _covered(self, scope: str, collection: str, stamp: Stamp | None) -> None:
        known = self.acked.get(scope)
        if stamp is not None and (known is None or stamp > known):
            self.acked[scope] = stamp
            self._acked_dirty.set()

    async def _persist_acked_forever(self) -> None:
        while True:
            await self._acked_dirty.wait()
            self._acked_dirty = trio.Event()
            batch = WriteBatch()
            for name, stamp in self.acked.items():
                if stamp is not None:
                    batch.meta[f"acked_stamp/{name}"] = stamp.encode()
            try:
                await self.replica.store.commit(batch)
            except Exception as error:  # the next ack tries again
                log.warning("could not store the hub's acknowledgement: %s", error)

    def _on_ephemeral(self, scope: str, kind: str, data: Any) -> None:
        if kind == "events" and self.events is not None:
            self.events.merge(scope, data)
            return
        if self.forwarder is not None and self.forwarder.on_ephemeral(kind, data):
            return
        log.debug("ignoring an ephemeral %r message from the hub", kind)

    def _push_presence(self) -> None:
        """Device presence as an ephemeral snapshot: it churns, so it never enters the CRDT."""
        if self._link is None or self._link.peer is None or self.presence is None:
            return
        snapshot = {
            device_id: {"online": p.online, "last_seen": p.last_seen, "protocol": p.protocol, "address": p.address}
            for device_id, p in self.presence.devices.items()
        }
        self._link.send_ephemeral(self.site, "presence", snapshot)

    def _push_event(self, scope: str, event: UserEvent, local: bool) -> None:
        if local and self._link is not None and self._link.peer is not None:
            self._link.send_ephemeral(scope, "events", [event.to_wire()])

    async def _telemetry_status_forever(self, link: SyncLink) -> None:
        """The buffer's counters as ephemeral status for the hub's fleet view.

        They churn with every sample, so they never enter the CRDT (DESIGN.md,
        decision 5). A hub that does not know the kind ignores it.
        """
        assert self.forwarder is not None
        buffer = self.forwarder.buffer
        sent = None
        while True:
            status = {"buffered": buffer.count, "buffered_bytes": buffer.bytes,
                      "dropped": buffer.dropped, "forwarded": buffer.forwarded}
            if status != sent:
                link.send_ephemeral(self.site, TELEMETRY_STATUS_KIND, status)
                sent = status
            await trio.sleep(TELEMETRY_STATUS_INTERVAL_S)

    def _push_checks(self) -> None:
        if self._link is None or self._link.peer is None:
            return
        snapshot = {
            check_id: {"status": c.status, "output": c.output, "service": c.service_id}
            for check_id, c in self.checks.checks.items()
        }
        self._link.send_ephemeral(self.site, "checks", snapshot)
