"""Drives a :class:`SyncSession` against local scopes: the replication logic.

A link is one side of one connection. It turns session events into scope
operations (apply an update durably, then acknowledge; answer a state vector
with a diff; adopt the hub's epoch) and turns durable local changes into
messages. It knows nothing of sockets: frames go out through ``send``, an
async callable the transport provides, and come in through :meth:`receive`.

Who owns epochs: the hub. Its scopes compact on their own and announce the
new epoch with a snapshot; an edge never compacts a synced scope itself, and
when its epoch differs from the hub's it adopts the hub's snapshot and re-
applies its own writes the hub has not yet confirmed (see Scope.adopt_epoch).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio
from pycrdt import get_update as missing_from

from .hlc import Stamp
from .log_limits import peer_log
from .scope import COLLECTIONS, Scope
from .update_check import UpdateRefused, check_update_soon, is_panic
from .session import (
    Covered,
    EphemeralReceived,
    PeerClosed,
    PeerHello,
    RemoteProtocolError,
    State,
    StateVectorReceived,
    SyncSession,
    UpdateReceived,
)
from .wire import WireError, decode_state_vector

log = logging.getLogger(__name__)

Transmit = Callable[[bytes], Awaitable[None]]
OpenScopes = Callable[[tuple[str, ...]], Awaitable[None]]

# Frames queued for the peer: past the first bound this side stops reading the
# peer's frames until they drain (see drained()); past the second, the session
# ends. A session needs a few diffs in flight at most.
OUTBOX_PAUSE_BYTES = 64 * 1024 * 1024
MAX_OUTBOX_BYTES = 512 * 1024 * 1024


@dataclass
class _Marker:
    """What this side had when it sent a message: settled once the peer holds it."""

    own_stamp: Stamp | None
    local_changes: int


class LinkClosed(Exception):
    """The session ended; ``code`` says why, ``by_peer`` whether the peer ended it."""

    def __init__(self, code: str, detail: str, by_peer: bool = False) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.by_peer = by_peer


class SyncLink:
    """Replicates scopes with one peer.

    Args:
        session: a fresh session of this side's role.
        scope_for: returns the local scope of a name (the hub creates on demand).
        transmit: writes one frame to the peer (the transport's send).
        on_ephemeral: called with ``(scope, kind, data)`` for ephemeral messages.
        on_covered: called with ``(scope, collection, own_stamp)`` when the peer
            is known to hold everything up to that own-write stamp.
        open_scopes: awaited with the scopes of a hello the session accepted,
            before any of them is used (the hub opens or creates their stores
            there, so a refused hello never creates anything). It may raise
            :class:`LinkClosed` to refuse the session.
        read_only: ``(scope, collection)`` pairs this side never takes the
            peer's changes to (the hub: ``("global", "acl")``, fleet-wide ACL
            records, which only the hub makes). Such updates are acknowledged,
            dropped and counted in ``refused_read_only``; the session goes on.
    """

    def __init__(
        self,
        session: SyncSession,
        scope_for: Callable[[str], Scope],
        transmit: Transmit,
        on_ephemeral: Callable[[str, str, Any], None] | None = None,
        on_covered: Callable[[str, str, Stamp | None], None] | None = None,
        rebase_after: Callable[[str, str], Stamp | None] = lambda scope, collection: None,
        open_scopes: OpenScopes | None = None,
        read_only: frozenset[tuple[str, str]] = frozenset(),
    ) -> None:
        self.session = session
        self.read_only = read_only
        self.refused_read_only = 0
        self.scope_for = scope_for
        self._transmit = transmit
        # Frames wait here for run(): local writes never wait for the uplink.
        self._outbox: deque[bytes] = deque()
        self._outbox_bytes = 0
        self._outbox_ready = trio.Event()
        self._drained = trio.Event()
        self.overflowed = False
        self.on_ephemeral = on_ephemeral or (lambda scope, kind, data: None)
        self.on_covered = on_covered or (lambda scope, collection, stamp: None)
        self.rebase_after = rebase_after
        self.open_scopes = open_scopes
        self.peer: PeerHello | None = None
        self._peer_epoch: dict[tuple[str, str], int] = {}
        self._snapshot_sent: dict[tuple[str, str], int] = {}  # the epoch last sent whole, per collection
        # The epoch and state vector of the document when it was last sent as a
        # diff or snapshot: it may have held updates not yet durable, which the
        # update listener then forwards once they are (see _unsent_part).
        self._answered: dict[tuple[str, str], tuple[int, bytes]] = {}
        self._listening: list[tuple[Scope, Any, Any]] = []
        self.local_changes: dict[tuple[str, str], int] = {}
        self.unconfirmed: dict[tuple[str, str], int] = {}

    @property
    def is_hub(self) -> bool:
        return self.session.role == "hub"

    # -- lifecycle -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send queued frames in order until cancelled (or the transport fails).

        Raises :class:`LinkClosed` (``too_slow``) once more than
        :data:`MAX_OUTBOX_BYTES` wait for a peer that does not read.
        """
        task_status.started()
        while True:
            while self._outbox:
                await self._transmit(self._pop())
            if self.overflowed:
                raise LinkClosed("too_slow", f"more than {MAX_OUTBOX_BYTES} bytes waited for the peer to read them")
            self._outbox_ready = trio.Event()
            await self._outbox_ready.wait()

    async def flush(self) -> None:
        """Send what is still queued (the error frame that ends a session, say)."""
        while self._outbox:
            await self._transmit(self._pop())

    async def drained(self) -> None:
        """Return once at most :data:`OUTBOX_PAUSE_BYTES` wait to be sent.

        The transport awaits this before it reads the peer's next frame: a
        peer that asks for diffs (state vectors) faster than it reads them
        then waits for them, instead of making this side queue copies.
        """
        while self._outbox_bytes > OUTBOX_PAUSE_BYTES:
            self._drained = trio.Event()
            await self._drained.wait()

    def _pop(self) -> bytes:
        frame = self._outbox.popleft()
        self._outbox_bytes -= len(frame)
        if self._outbox_bytes <= OUTBOX_PAUSE_BYTES:
            self._drained.set()
        return frame

    def _send(self, frame: bytes) -> None:
        if self.overflowed:
            return
        self._outbox.append(frame)
        self._outbox_bytes += len(frame)
        if self._outbox_bytes > MAX_OUTBOX_BYTES:
            # Local writes keep coming for a peer that reads nothing: end the
            # session (run() raises) rather than hold them all in memory. A
            # new session resyncs from state vectors, so nothing is lost.
            self.overflowed = True
            self._outbox.clear()
            self._outbox_bytes = 0
        self._outbox_ready.set()

    @property
    def queued_frames(self) -> int:
        return len(self._outbox)

    def start(self) -> None:
        """The edge opens; the hub waits for the edge's hello."""
        if not self.is_hub:
            self._send(self.session.start())

    def stop(self) -> None:
        for scope, on_update, on_epoch in self._listening:
            scope.update_listeners.remove(on_update)
            scope.epoch_listeners.remove(on_epoch)
        self._listening = []

    async def receive(self, frame: bytes) -> None:
        """Handle one frame from the peer; raises :class:`LinkClosed` when the session ends."""
        try:
            events = self.session.receive(frame)
        except RemoteProtocolError as error:
            if error.reply is not None:
                self._send(error.reply)
            raise LinkClosed(error.code, error.detail) from None
        for event in events:
            try:
                await self._handle(event)
            except LinkClosed:
                raise
            except BaseException as error:
                # What a peer's frame made fail here ends this session, never
                # the process (a Rust panic in pycrdt included); the peer hears
                # why, and the transport logs the reason in one line.
                if not (isinstance(error, Exception) or is_panic(error)):
                    raise  # cancellation: this side is stopping
                peer_log.log(
                    log, logging.DEBUG, ("sync-apply", self.peer.replica if self.peer else ""), "could not apply a %s",
                    type(event).__name__, exc_info=True,
                )
                self.refuse("bad_frame", f"could not apply a {type(event).__name__}: {type(error).__name__}: {error}")

    @property
    def closed(self) -> bool:
        return self.session.state is State.CLOSED

    def resync(self) -> None:
        """Exchange state vectors again (after a suspected loss, or periodically)."""
        if self.peer is None or self.closed:
            return
        self.session.resync()
        for name in self.session.scopes:
            for collection in COLLECTIONS:
                self._send_state_vector(self.scope_for(name), collection)

    def send_ephemeral(self, scope: str, kind: str, data: Any) -> None:
        if self.peer is not None and not self.closed:
            self._send(self.session.send_ephemeral(scope, kind, data))

    # -- events ----------------------------------------------------------------

    def refuse(self, code: str, detail: str) -> None:
        """End the session over a frame this side will not act on; the peer is told why."""
        if not self.closed:
            self._send(self.session.close(code, detail[:200]))
        raise LinkClosed(code, detail)

    def _check_collection(self, collection: str) -> None:
        if collection not in COLLECTIONS:
            self.refuse("unknown_collection", f"no collection {collection[:60]!r}; there are {list(COLLECTIONS)}")

    async def _handle(self, event) -> None:
        if isinstance(event, PeerHello):
            await self._on_hello(event)
        elif isinstance(event, StateVectorReceived):
            await self._on_state_vector(event)
        elif isinstance(event, UpdateReceived):
            await self._on_update(event)
        elif isinstance(event, Covered):
            self._on_covered(event)
        elif isinstance(event, EphemeralReceived):
            self.on_ephemeral(event.scope, event.kind, event.data)
        elif isinstance(event, PeerClosed):
            raise LinkClosed(event.code, event.detail, by_peer=True)

    async def _on_hello(self, hello: PeerHello) -> None:
        if self.open_scopes is not None:
            try:
                await self.open_scopes(hello.scopes)
            except Exception as error:  # noqa: BLE001 - a scope this side cannot open (or create)
                self.refuse("scope_unavailable", str(error))
        if self.is_hub:
            self._send(self.session.start())
        self.peer = hello
        for name in self.session.scopes:
            scope = self.scope_for(name)
            on_update = self._make_update_listener(scope)
            on_epoch = self._make_epoch_listener(scope)
            scope.update_listeners.append(on_update)
            scope.epoch_listeners.append(on_epoch)
            self._listening.append((scope, on_update, on_epoch))
            for collection in COLLECTIONS:
                self._send_state_vector(scope, collection)

    async def _on_state_vector(self, event: StateVectorReceived) -> None:
        self._check_collection(event.collection)
        try:
            decode_state_vector(event.state_vector)
        except WireError as error:
            self.refuse("malformed", f"state vector: {error}")
        scope = self.scope_for(event.scope)
        key = (event.scope, event.collection)
        self._peer_epoch[key] = event.epoch
        mine = scope.epoch(event.collection)
        if event.epoch == mine:
            document = scope.doc(event.collection)
            diff = document.get_update(event.state_vector)
            state = document.get_state()
            self._answered[key] = (mine, state)
            self._send_update(scope, event.collection, diff, state)
        elif self.is_hub:
            self._send_snapshot(scope, event.collection)
        # An edge at another epoch than the hub waits for the hub's snapshot.

    async def _on_update(self, event: UpdateReceived) -> None:
        self._check_collection(event.collection)
        if (event.scope, event.collection) in self.read_only:
            self._drop_read_only(event)
            return
        try:
            await self._merge(event)
        except UpdateRefused as error:
            self.refuse("bad_update", str(error))

    def _drop_read_only(self, event: UpdateReceived) -> None:
        # Acknowledged with what this side holds, so the peer's session does
        # not resend it forever; the peer keeps its own copy (an edge that
        # made such records while standalone), which never comes here.
        self.refused_read_only += 1
        peer_log.log(
            log, logging.WARNING, ("sync-read-only", event.scope, event.collection),
            "refused a peer's change to %s/%s: that collection is written only here", event.scope, event.collection,
        )
        held = self.scope_for(event.scope).doc(event.collection).get_state()
        self._send(self.session.send_ack(event.scope, event.collection, event.epoch, event.seq, held))

    async def _merge(self, event: UpdateReceived) -> None:
        """Adopt or merge the update of ``event`` and acknowledge it.

        Raises :class:`UpdateRefused`, with nothing changed, for an update no
        replica of ours could have written.
        """
        scope = self.scope_for(event.scope)
        key = (event.scope, event.collection)
        if event.snapshot and event.epoch != scope.epoch(event.collection):
            await check_update_soon(event.update, event.collection)  # Scope.apply_remote checks its own
            # The hub is at this epoch from now on: the own writes the adoption
            # re-applies go out to it at once (the update listener sends only to
            # a peer at the scope's epoch). Left unsent, a later acknowledged
            # frame would mark them as held by the hub, and the next adoption
            # would not re-apply them.
            self._peer_epoch[key] = event.epoch
            await scope.adopt_epoch(
                event.collection, event.epoch, event.update, self.rebase_after(event.scope, event.collection)
            )
            document = scope.doc(event.collection)
        elif event.epoch == scope.epoch(event.collection):
            # Data of this epoch, or another snapshot of the epoch adopted
            # already (the hub answers frames that crossed its compaction with
            # one): the same document's state, so merge it; adopting again would
            # rebase and resend every own write each time.
            document = scope.doc(event.collection)
            await scope.apply_remote(event.collection, event.update, origin=self)
        else:
            # The peer writes into another epoch: the hub answers with its own
            # (once per epoch for data frames: a burst of them would otherwise
            # bring a snapshot each), the edge asks for it by stating where it is.
            if self.is_hub:
                if self._snapshot_sent.get(key) != scope.epoch(event.collection):
                    self._send_snapshot(scope, event.collection)
            else:
                self._send_state_vector(scope, event.collection)
            return
        # Applying can compact the hub's scope into a new epoch, whose snapshot
        # went to the peer meanwhile: the peer is then at the new epoch (going
        # back to this one would stop live updates to it), and the ack states
        # what this message's epoch holds, so that the peer's writes count as
        # confirmed.
        if scope.epoch(event.collection) == event.epoch:
            self._peer_epoch[key] = event.epoch
        held = document.get_state()
        self._send(self.session.send_ack(event.scope, event.collection, event.epoch, event.seq, held))

    def _on_covered(self, event: Covered) -> None:
        key = (event.scope, event.collection)
        marker: _Marker = event.marker
        self.unconfirmed[key] = max(0, self.local_changes.get(key, 0) - marker.local_changes)
        self.on_covered(event.scope, event.collection, marker.own_stamp)

    # -- sending -------------------------------------------------------------------

    def _make_update_listener(self, scope: Scope):
        def on_update(collection: str, update: bytes, origin: object) -> None:
            key = (scope.name, collection)
            if origin is None:
                self.local_changes[key] = self.local_changes.get(key, 0) + 1
            # Closed: the transport has yet to stop the link (it flushes the
            # error frame first); the writer calling here must not fail for it.
            if origin is self or self.closed or self._peer_epoch.get(key) != scope.epoch(collection):
                return
            self._send_update(scope, collection, self._unsent_part(key, scope.epoch(collection), update))

        return on_update

    def _unsent_part(self, key: tuple[str, str], epoch: int, update: bytes) -> bytes:
        """What of a durable update the last diff or snapshot sent to the peer did not carry.

        Those are built from the document in memory, which holds updates
        applied but not yet durable; each is forwarded again once durable.
        Durable updates arrive in the order they were applied, so once one
        comes that the answer did not hold at all, neither did any after it.
        """
        answered = self._answered.get(key)
        if answered is None:
            return update
        answered_epoch, state = answered
        if answered_epoch != epoch:
            del self._answered[key]
            return update
        unsent = missing_from(update, state)
        if unsent == update:
            del self._answered[key]
        return unsent

    def _make_epoch_listener(self, scope: Scope):
        def on_epoch(collection: str) -> None:
            if self.is_hub and not self.closed:
                self._send_snapshot(scope, collection)

        return on_epoch

    def _send_state_vector(self, scope: Scope, collection: str) -> None:
        frame = self.session.send_state_vector(
            scope.name, collection, scope.epoch(collection), scope.doc(collection).get_state()
        )
        self._send(frame)

    def _send_update(
        self, scope: Scope, collection: str, update: bytes, state_vector: bytes | None = None
    ) -> None:
        """Send ``update``; ``state_vector`` is the document's, if the caller has it already."""
        if update == b"\x00\x00" or self.peer is None:
            return  # nothing the peer lacks
        if state_vector is None:
            state_vector = scope.doc(collection).get_state()
        frame = self.session.send_update(
            scope.name, collection, scope.epoch(collection), update, state_vector,
            self._marker(scope, collection),
        )
        self._send(frame)

    def _send_snapshot(self, scope: Scope, collection: str) -> None:
        key, epoch = (scope.name, collection), scope.epoch(collection)
        document = scope.doc(collection)
        state_vector = document.get_state()
        self._snapshot_sent[key] = epoch
        self._answered[key] = (epoch, state_vector)
        self._peer_epoch[key] = epoch
        frame = self.session.send_update(
            scope.name, collection, epoch, document.get_update(), state_vector,
            self._marker(scope, collection), snapshot=True,
        )
        self._send(frame)

    def _marker(self, scope: Scope, collection: str) -> _Marker:
        """What an update frame tells of this side's own writes (see _Marker)."""
        return _Marker(scope.durable_own_stamp(collection), self.local_changes.get((scope.name, collection), 0))
