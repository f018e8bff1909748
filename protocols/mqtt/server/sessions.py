"""A client's session: what outlives one connection of it (section 4.1).

A session holds the client's subscriptions, the QoS 1 and 2 messages sent to
it and not yet acknowledged (QoS 2: until its PUBCOMP) (resent, with DUP, when it reconnects
[MQTT-4.4.0-1]), and the messages queued for it while it is away or while
its receive window (MQTT 5 receive maximum) is full. A session with an
expiry of 0 (3.1.1 clean session, v5 default) ends with its connection.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..codec import Properties

# A session left away longer than this is forgotten, whatever the client asked (v5 allows the server to cut it).
MAX_SESSION_EXPIRY = 7 * 24 * 3600
NEVER = 0xFFFFFFFF  # v5: a session expiry interval of 0xFFFFFFFF never expires


@dataclass(slots=True)
class OutMessage:
    """A message on its way to one client; ``expires`` is a monotonic time or None."""

    topic: str
    payload: bytes
    qos: int
    retain: bool = False
    properties: Properties | None = None
    expires: float | None = None


class Session:
    """One client id's session; the live connection is attached while there is one."""

    __slots__ = (
        "client_id", "expiry", "filters", "inflight", "released", "queue", "_next_id", "connection", "away_since", "version",
        "persisted",
    )

    def __init__(self, client_id: str, expiry: int, version: int) -> None:
        self.client_id = client_id
        self.expiry = expiry  # seconds the session outlives its connection
        self.version = version
        # filter as subscribed (with any $share/ prefix) -> (qos, options, identifier): to resubscribe, list, persist
        self.filters: dict[str, tuple[int, int, int | None]] = {}
        self.inflight: dict[int, OutMessage] = {}  # packet id -> sent, awaiting PUBACK (QoS 1) or PUBCOMP (QoS 2)
        # QoS 2 packet ids the client has PUBREC'd: PUBREL sent, awaiting PUBCOMP; on a
        # reconnect these are resent as PUBREL, not as the PUBLISH again [MQTT-4.4.0-1].
        self.released: set[int] = set()
        self.queue: deque[OutMessage] = deque()  # not sent yet: away, or the window full
        self._next_id = 0
        self.connection: object | None = None  # the ServerConnection while connected
        self.away_since: float | None = None
        self.persisted = False  # its queue and filters are in the session store (persistence.py)

    @property
    def persistent(self) -> bool:
        return self.expiry > 0

    def next_packet_id(self) -> int:
        """A packet id not in flight [MQTT-2.3.1-2]."""
        inflight = self.inflight
        if len(inflight) >= 65535:
            raise RuntimeError("every packet id is in flight")
        while True:
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in inflight:
                return self._next_id

    def expired(self, now: float) -> bool:
        return (
            self.connection is None and self.away_since is not None and self.expiry != NEVER
            and now >= self.away_since + self.expiry
        )
