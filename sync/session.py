"""The sync session: one connection between an edge and the hub, sans-IO.

Theory of operation
-------------------
Bytes in, events out; bytes to send come back from the calls that make them.
No sockets, no clocks, no documents: the driver (:mod:`konsul.sync.link`) owns
those and tells the session what to say.

1. Both sides send ``hello`` (protocol version, site, replica, role, scopes,
   wall clock). A version or role mismatch is an ``error`` to the peer and a
   :class:`RemoteProtocolError` here; both sides then close. The hub admits
   only the scopes an edge may sync: its own site's (the one its credential
   names, when the driver bound one) and ``global``. A peer whose clock runs
   further ahead of this side's than ``max_peer_ahead_ms`` is refused
   (``clock_skew``): its stamps would win every conflict for that long.
2. Per scope and collection, each side sends its state vector (``sv``,
   pycrdt's sync step 1). A side that gets a state vector of its own epoch
   answers with the diff (``data``, step 2); the hub answers a state vector
   of another epoch with a snapshot of its own (``snap``) that the edge adopts.
3. After that, every durable change goes out as ``data``. Each ``data`` and
   ``snap`` carries a sequence number; the receiver answers, once it has
   stored the message durably, with ``ack`` and its state vector.
4. An ``ack`` tells the sender exactly what the peer holds durably: when the
   acknowledged state vector covers the sender's state vector at the time it
   sent that message, everything the sender had then is safe at the peer.
   The session reports that as :class:`Covered`, with the marker the driver
   attached when sending. Lost, duplicated or reordered messages never make
   a false claim; they only delay one.

Messages can be lost (a dropped connection, or the fault-injecting transport
of the tests); the driver re-sends state vectors (:meth:`SyncSession.resync`)
to fill any gap, since a diff against a state vector is always complete.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

from collections.abc import Callable

from .wire import GLOBAL_SCOPE, PROTOCOL_VERSION, SCOPE_NAME, WireError, covers, decode, decode_state_vector, encode

ROLES = ("edge", "hub")
# The scopes one hello may name unless the driver says otherwise: an edge names
# two (its site and ``global``); each named scope costs the hub a store.
DEFAULT_MAX_SCOPES = 16
_REPLICA_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class LocalProtocolError(Exception):
    """This side tried something the protocol does not allow (a bug here)."""


class RemoteProtocolError(Exception):
    """The peer broke the protocol; ``reply`` is the error frame to send it."""

    def __init__(self, code: str, detail: str, reply: bytes | None) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.reply = reply


class State(Enum):
    IDLE = "idle"
    HELLO_SENT = "hello-sent"  # the edge, waiting for the hub's answer
    HELLO_RECEIVED = "hello-received"  # the hub, about to answer
    OPEN = "open"
    CLOSED = "closed"


# What each (role, state) accepts from the peer (h11-style transition table).
# The edge speaks first; the hub answers its hello with the scopes agreed.
_ACCEPTS: dict[tuple[str, State], frozenset[str]] = {
    ("edge", State.IDLE): frozenset(),
    ("edge", State.HELLO_SENT): frozenset({"hello", "error"}),
    ("hub", State.IDLE): frozenset({"hello", "error"}),
    ("hub", State.HELLO_RECEIVED): frozenset({"error"}),
}
_OPEN_ACCEPTS = frozenset({"sv", "data", "snap", "ack", "eph", "error"})


# -- events ------------------------------------------------------------------


@dataclass(frozen=True)
class PeerHello:
    site: str
    replica: str
    role: str
    scopes: tuple[str, ...]
    now_ms: int  # the peer's wall clock when it said hello


@dataclass(frozen=True)
class StateVectorReceived:
    scope: str
    collection: str
    epoch: int
    state_vector: bytes


@dataclass(frozen=True)
class UpdateReceived:
    """A diff or live update (``snapshot`` False), or an epoch to adopt (True)."""

    scope: str
    collection: str
    epoch: int
    seq: int
    update: bytes
    snapshot: bool


@dataclass(frozen=True)
class Covered:
    """The peer durably holds all this side had when it sent message ``seq``."""

    scope: str
    collection: str
    epoch: int
    seq: int
    marker: Any


@dataclass(frozen=True)
class EphemeralReceived:
    scope: str
    kind: str
    data: Any


@dataclass(frozen=True)
class PeerClosed:
    code: str
    detail: str


Event = PeerHello | StateVectorReceived | UpdateReceived | Covered | EphemeralReceived | PeerClosed


@dataclass
class _Sent:
    scope: str
    collection: str
    epoch: int
    state_vector: dict[int, int]
    marker: Any


class SyncSession:
    """One side of one sync connection.

    Args:
        role: ``edge`` or ``hub``.
        site: the edge's site (an edge) or the hub's name (the hub).
        replica: this replica's id.
        scopes: the scopes this side offers; the edge proposes, the hub echoes.
        max_scopes: the most scopes a peer's hello may name; a hello naming
            more is refused before anything acts on it.
        bound_site: (the hub) the site this connection's credential names: a
            hello for any other site is refused (``site_not_allowed``).
        wall_ms: this side's wall clock, sent in the hello and compared with
            the peer's.
        max_peer_ahead_ms: how far the peer's clock may run ahead of
            ``wall_ms``; None does not check.
    """

    def __init__(
        self, role: str, site: str, replica: str, scopes: list[str], max_scopes: int = DEFAULT_MAX_SCOPES,
        *, bound_site: str | None = None, wall_ms: Callable[[], int] = lambda: 0,
        max_peer_ahead_ms: int | None = None,
    ) -> None:
        if role not in ROLES:
            raise LocalProtocolError(f"role is one of {ROLES}")
        self.role = role
        self.site = site
        self.replica = replica
        self.scopes = tuple(scopes)
        self.max_scopes = max_scopes
        self.bound_site = bound_site
        self.wall_ms = wall_ms
        self.max_peer_ahead_ms = max_peer_ahead_ms
        self.state = State.IDLE
        self.peer: PeerHello | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self._next_seq = 1
        self._unacked: dict[int, _Sent] = {}

    # -- sending -------------------------------------------------------------

    def start(self) -> bytes:
        """The hello: the edge's opening, or the hub's answer to the edge's hello."""
        if self.role == "edge" and self.state is State.IDLE:
            self.state = State.HELLO_SENT
        elif self.role == "hub" and self.state is State.HELLO_RECEIVED:
            self.state = State.OPEN
        else:
            raise LocalProtocolError(f"a {self.role} cannot say hello in state {self.state.value}")
        return self._frame(
            {"t": "hello", "v": PROTOCOL_VERSION, "site": self.site, "replica": self.replica,
             "role": self.role, "scopes": list(self.scopes), "now": self.wall_ms()}
        )

    def send_state_vector(self, scope: str, collection: str, epoch: int, state_vector: bytes) -> bytes:
        self._require_open()
        return self._frame({"t": "sv", "s": scope, "c": collection, "e": epoch, "sv": state_vector})

    def send_update(
        self, scope: str, collection: str, epoch: int, update: bytes, state_vector: bytes,
        marker: Any = None, snapshot: bool = False,
    ) -> bytes:
        """A diff, live update or snapshot; ``state_vector`` is this side's state after it."""
        self._require_open()
        if snapshot and self.role != "hub":
            raise LocalProtocolError("only the hub sends snapshots: it owns the epochs")
        seq = self._next_seq
        self._next_seq += 1
        self._unacked[seq] = _Sent(scope, collection, epoch, decode_state_vector(state_vector), marker)
        kind = "snap" if snapshot else "data"
        return self._frame({"t": kind, "n": seq, "s": scope, "c": collection, "e": epoch, "u": update})

    def send_ack(self, scope: str, collection: str, epoch: int, seq: int, state_vector: bytes) -> bytes:
        self._require_open()
        return self._frame({"t": "ack", "n": seq, "s": scope, "c": collection, "e": epoch, "sv": state_vector})

    def send_ephemeral(self, scope: str, kind: str, data: Any) -> bytes:
        self._require_open()
        return self._frame({"t": "eph", "s": scope, "k": kind, "d": data})

    def close(self, code: str, detail: str) -> bytes:
        """Say why this side ends the session."""
        self.state = State.CLOSED
        return self._frame({"t": "error", "code": code, "detail": detail})

    @property
    def pending_acks(self) -> int:
        return len(self._unacked)

    # -- receiving -------------------------------------------------------------

    def receive(self, frame: bytes) -> list[Event]:
        """Take one frame from the peer; raises :class:`RemoteProtocolError`."""
        self.bytes_received += len(frame)
        try:
            message = decode(frame)
        except WireError as error:
            raise self._violation("malformed", str(error)) from None
        kind = message["t"]
        accepted = _OPEN_ACCEPTS if self.state is State.OPEN else _ACCEPTS.get((self.role, self.state), ())
        if kind not in accepted:
            raise self._violation("unexpected", f"{kind} is not allowed in state {self.state.value}")
        if kind == "error":
            self.state = State.CLOSED
            return [PeerClosed(message["code"], message["detail"])]
        if kind == "hello":
            return [self._on_hello(message)]
        scope = message["s"]
        if scope not in self.scopes:
            raise self._violation("unknown_scope", f"scope {scope!r} is not part of this session")
        if kind == "eph":
            return [EphemeralReceived(scope, message["k"], message["d"])]
        if kind == "sv":
            return [StateVectorReceived(scope, message["c"], message["e"], message["sv"])]
        if kind in ("data", "snap"):
            if kind == "snap" and self.role == "hub":
                raise self._violation("unexpected", "an edge cannot send snapshots")
            return [UpdateReceived(scope, message["c"], message["e"], message["n"], message["u"], kind == "snap")]
        return self._on_ack(message)

    def resync(self) -> None:
        """Forget unacknowledged sends (a fresh state-vector exchange supersedes them)."""
        self._unacked.clear()

    # -- internals ---------------------------------------------------------------

    def _on_hello(self, message: dict[str, Any]) -> PeerHello:
        if message["v"] != PROTOCOL_VERSION:
            raise self._violation(
                "version_mismatch",
                f"this {self.role} speaks sync protocol {PROTOCOL_VERSION}, the peer {message['v']}; "
                "upgrade the older side",
            )
        expected = "hub" if self.role == "edge" else "edge"
        if message["role"] != expected:
            raise self._violation("role_mismatch", f"a {self.role} syncs with a {expected}, not a {message['role']}")
        scopes = message["scopes"]
        # The whole hello is judged here, before the driver opens (on the hub:
        # creates) a store for any scope it names.
        if len(scopes) > self.max_scopes:
            raise self._violation(
                "too_many_scopes", f"a hello names at most {self.max_scopes} scopes, this one {len(scopes)}"
            )
        if not all(isinstance(s, str) and SCOPE_NAME.fullmatch(s) for s in scopes) or len(set(scopes)) != len(scopes):
            raise self._violation(
                "malformed",
                "scopes is a list of distinct names of 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit",
            )
        if not SCOPE_NAME.fullmatch(message["site"]):
            raise self._violation("malformed", "site is 1-64 letters, digits, '.', '_' or '-'")
        if not _REPLICA_ID.fullmatch(message["replica"]):
            raise self._violation("malformed", "replica is 1-64 letters, digits, '_' or '-'")
        ahead = message["now"] - self.wall_ms()
        if self.max_peer_ahead_ms is not None and ahead > self.max_peer_ahead_ms:
            raise self._violation(
                "clock_skew",
                f"the {message['role']}'s clock is {ahead / 1000:.0f} s ahead of this {self.role}'s "
                f"(at most {self.max_peer_ahead_ms / 1000:.0f} s is accepted); set the clocks right (NTP)",
            )
        if self.role == "hub":
            if message["site"] not in scopes:
                raise self._violation("malformed", "an edge offers its own site's scope")
            if self.bound_site is not None and message["site"] != self.bound_site:
                raise self._violation(
                    "site_not_allowed", f"this connection's credential is for site {self.bound_site!r}, "
                    f"not {message['site']!r}",
                )
            others = [s for s in scopes if s not in (message["site"], GLOBAL_SCOPE)]
            if others:
                raise self._violation(
                    "scope_not_allowed",
                    f"an edge syncs its own site's scope and {GLOBAL_SCOPE!r}, not {others[:4]}",
                )
            self.scopes = tuple(scopes)
            self.state = State.HELLO_RECEIVED
        elif set(scopes) != set(self.scopes):
            raise self._violation("scope_mismatch", f"the hub offers {scopes}, this edge {list(self.scopes)}")
        else:
            self.state = State.OPEN
        self.peer = PeerHello(message["site"], message["replica"], message["role"], tuple(scopes), message["now"])
        return self.peer

    def _on_ack(self, message: dict[str, Any]) -> list[Event]:
        sent = self._unacked.pop(message["n"], None)
        if sent is None:
            return []  # a duplicate, or one that resync() forgot
        try:
            held = decode_state_vector(message["sv"])
        except WireError as error:
            raise self._violation("malformed", str(error)) from None
        if (sent.scope, sent.collection, sent.epoch) != (message["s"], message["c"], message["e"]):
            return []
        if not covers(held, sent.state_vector):
            return []  # the peer still misses something sent before; a resync fills it
        # Everything sent earlier for the same document is covered as well.
        for seq in [n for n, s in self._unacked.items() if n < message["n"] and
                    (s.scope, s.collection, s.epoch) == (sent.scope, sent.collection, sent.epoch)]:
            del self._unacked[seq]
        return [Covered(sent.scope, sent.collection, sent.epoch, message["n"], sent.marker)]

    def _violation(self, code: str, detail: str) -> RemoteProtocolError:
        reply = None if self.state is State.CLOSED else self.close(code, detail)
        return RemoteProtocolError(code, detail, reply)

    def _require_open(self) -> None:
        if self.state is not State.OPEN:
            raise LocalProtocolError(f"cannot send in state {self.state.value}")

    def _frame(self, message: dict[str, Any]) -> bytes:
        frame = encode(message)
        self.bytes_sent += len(frame)
        return frame
