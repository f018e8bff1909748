"""User events (Consul's ``/v1/event``): a bounded ring of recent events per scope.

Theory of operation
-------------------
An event is a message, not state: "deploy now", "flush caches". Consul keeps
the last 256 an agent has seen in memory and gossips new ones; a node that was
partitioned simply misses them. An edge is partitioned as a matter of course,
so here each agent keeps, per scope it holds (its site and ``global``; the hub
every site's), a ring of the most recent :data:`DEFAULT_KEEP` events, and the
sync link carries them as ephemeral messages (DESIGN.md, decision 5: they never
enter the CRDT, whose history they would only grow):

- a new event travels at once to the peer (``events`` message, one item);
- when a link opens, each side sends its rings' events younger than
  :data:`REPLAY_WINDOW_S`, and the other side keeps the ones it has not seen
  (by ``ID``). So an event fired at the hub while a site was cut off reaches
  that site when the link is back, if it is still recent; an older one is
  not replayed, because acting on a stale "restart now" hours later is worse
  than missing it. Replay is bounded: one ring, at most ``DEFAULT_KEEP`` items.

Events stay in memory: a restart empties the rings (as Consul's agent does);
the peer's replay on reconnection brings back what is recent.

``LTime`` is a Lamport clock per agent: a fired event gets the next tick, a
received one moves the clock past its own ``LTime`` (Consul's serf does the
same with its event clock). The list's blocking-query index is Consul's: a
64-bit value derived from the ID of the newest event, not a counter, so a
client blocks until it differs (``uuid_index``).

This module is plain Python: no sockets, no clocks read but the one given.
"""

from __future__ import annotations

import base64
import re
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgument, KonsulError, ValueTooLarge

DEFAULT_KEEP = 256  # events kept per scope (Consul's agent keeps 256)
REPLAY_WINDOW_S = 3600.0  # events younger than this are replayed to a peer that (re)connects
MAX_PAYLOAD_BYTES = 4096  # Consul's default is 512 (serf's user event limit); devices may want a bit more
MAX_FILTER_CHARS = 256
MAX_NAME_CHARS = 128
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True, slots=True)
class UserEvent:
    """One event, in Consul's fields plus where and when it was fired."""

    id: str
    name: str
    payload: bytes | None
    node_filter: str = ""
    service_filter: str = ""
    tag_filter: str = ""
    ltime: int = 0
    origin: str = ""  # the site (or "hub") that fired it
    fired_ms: int = 0  # the origin's wall clock when fired

    def to_api(self, ltime: int | None = None) -> dict[str, Any]:
        """Consul's JSON shape (``Payload`` base64, or null)."""
        return {
            "ID": self.id,
            "Name": self.name,
            "Payload": None if self.payload is None else base64.b64encode(self.payload).decode(),
            "NodeFilter": self.node_filter,
            "ServiceFilter": self.service_filter,
            "TagFilter": self.tag_filter,
            "Version": 1,
            "LTime": self.ltime if ltime is None else ltime,
        }

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "payload": self.payload, "nf": self.node_filter,
            "sf": self.service_filter, "tf": self.tag_filter, "lt": self.ltime, "origin": self.origin,
            "ms": self.fired_ms,
        }

    @classmethod
    def from_wire(cls, item: Any) -> UserEvent:
        """An event a peer sent; raises :class:`KonsulError` for anything malformed."""
        if not isinstance(item, dict):
            raise InvalidArgument("an event is a map")
        text = {k: item.get(k) for k in ("id", "name", "nf", "sf", "tf", "origin")}
        if not all(isinstance(v, str) for v in text.values()):
            raise InvalidArgument("an event's id, name, filters and origin are strings")
        payload, ltime, fired = item.get("payload"), item.get("lt"), item.get("ms")
        if payload is not None and not isinstance(payload, bytes):
            raise InvalidArgument("an event's payload is bytes or null")
        if not (isinstance(ltime, int) and 0 <= ltime < 2**63 and isinstance(fired, int) and 0 <= fired < 2**63):
            raise InvalidArgument("an event's LTime and time are non-negative integers")
        if not _ID.fullmatch(text["id"]):
            raise InvalidArgument("an event's ID is a lower-case UUID")
        check_event_name(text["name"])
        check_filters(text["nf"], text["sf"], text["tf"])
        check_payload(payload)
        if len(text["origin"]) > 64:
            raise InvalidArgument("an event's origin is a site name")
        return cls(
            text["id"], text["name"], payload, text["nf"], text["sf"], text["tf"], ltime, text["origin"], fired
        )


def check_event_name(name: str) -> str:
    """Consul's rule (no leading underscore: reserved) plus a length and a character set."""
    if not name or name.startswith("_"):
        raise InvalidArgument("an event name must not be empty or start with '_' (reserved)")
    if len(name) > MAX_NAME_CHARS or not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"an event name is up to {MAX_NAME_CHARS} letters, digits and '_.:-', starting with a letter or digit"
        )
    return name


def check_payload(payload: bytes | None) -> None:
    if payload is not None and len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueTooLarge(f"an event payload is at most {MAX_PAYLOAD_BYTES} bytes, this one {len(payload)}")


def check_filters(node: str, service: str, tag: str) -> None:
    """Filters are Go regular expressions (RE2, as Consul's); a tag filter needs a service filter."""
    if tag and not service:
        raise InvalidArgument("a tag filter needs a service filter (as Consul's)")
    for what, pattern in (("node", node), ("service", service), ("tag", tag)):
        if len(pattern) > MAX_FILTER_CHARS:
            raise InvalidArgument(f"the {what} filter is at most {MAX_FILTER_CHARS} characters")
        if pattern:
            _compile(pattern, what)


def _compile(pattern: str, what: str):
    # RE2 matches in linear time: a hostile filter cannot stall the agent as a
    # backtracking engine would on, say, (a+)+$. Imported only when a filter is used.
    import re2

    try:
        return re2.compile(pattern)
    except Exception as error:  # re2.error
        raise InvalidArgument(f"the {what} filter is not a valid regular expression: {error}") from None


def list_filter(node: str, service: str, tag: str) -> Callable[[UserEvent], bool]:
    """``/v1/event/list``'s ``?node=``, ``?service=``, ``?tag=``: which listed events to keep.

    Each is a regular expression (RE2) searched in the event's own filter of
    that kind, the one it was fired with (``NodeFilter``, ``ServiceFilter``,
    ``TagFilter``), as py-consul and Consul's API reference describe them; an
    event fired without that filter is kept only when the parameter is absent.
    (Consul's agent documents them and applies none but ``name``.)
    """
    checks = []
    for what, pattern, field_of in (
        ("node", node, lambda e: e.node_filter),
        ("service", service, lambda e: e.service_filter),
        ("tag", tag, lambda e: e.tag_filter),
    ):
        if not pattern:
            continue
        if len(pattern) > MAX_FILTER_CHARS:
            raise InvalidArgument(f"the {what} parameter is at most {MAX_FILTER_CHARS} characters")
        compiled = _compile(pattern, what)
        checks.append(lambda event, compiled=compiled, field_of=field_of: bool(
            field_of(event) and compiled.search(field_of(event))))
    return lambda event: all(check(event) for check in checks)


def uuid_index(event_id: str) -> int:
    """Consul's event-list index: the two halves of the newest event's UUID XORed."""
    digits = event_id.replace("-", "")
    return (int(digits[:16], 16) ^ int(digits[16:], 16)) or 1


def matches_agent(event: UserEvent, node: str, services: list[tuple[str, tuple[str, ...]]]) -> bool:
    """Whether an agent with ``node`` and ``services`` (name, tags) takes ``event`` (Consul's rule)."""
    if event.node_filter and not _compile(event.node_filter, "node").search(node):
        return False
    if event.service_filter:
        service_re = _compile(event.service_filter, "service")
        tag_re = _compile(event.tag_filter, "tag") if event.tag_filter else None
        return any(
            service_re.search(name) and (tag_re is None or any(tag_re.search(tag) for tag in tags))
            for name, tags in services
        )
    return True


Listener = Callable[[str, UserEvent, bool], None]  # (scope, event, fired here)


class EventLog:
    """The rings of recent events of every scope an agent holds.

    Args:
        origin: this agent's name in the events it fires (its site, or "hub").
        keep: events kept per scope.
        wall_ms: the wall clock, milliseconds.
    """

    def __init__(
        self, origin: str, keep: int = DEFAULT_KEEP, wall_ms: Callable[[], int] = lambda: int(time.time() * 1000)
    ) -> None:
        self.origin = origin
        self.keep = keep
        self.wall_ms = wall_ms
        self.ltime = 0
        self._arrivals = 0
        self._rings: dict[str, deque[UserEvent]] = {}
        # IDs seen per scope (-> arrival number), a few rings' worth: an event
        # that left the ring is not taken again when a peer replays it.
        self._ids: dict[str, dict[str, int]] = {}
        self.listeners: list[Listener] = []
        self.refused = 0  # malformed events from peers, dropped

    def fire(
        self, scope: str, name: str, payload: bytes | None, node_filter: str = "", service_filter: str = "",
        tag_filter: str = "",
    ) -> UserEvent:
        """A new event in ``scope``; listeners hear it with ``fired here`` True."""
        check_event_name(name)
        check_filters(node_filter, service_filter, tag_filter)
        check_payload(payload)
        self.ltime += 1
        event = UserEvent(
            str(uuid.uuid4()), name, payload, node_filter, service_filter, tag_filter, self.ltime, self.origin,
            self.wall_ms(),
        )
        self._add(scope, event, True)
        return event

    def merge(self, scope: str, items: Any) -> list[UserEvent]:
        """Keep the events of a peer's ``events`` message not seen yet; returns them.

        Malformed items are dropped and counted (``refused``): a peer's bad
        event costs that event only.
        """
        if not isinstance(items, list):
            self.refused += 1
            return []
        added = []
        for item in items[: self.keep]:
            try:
                event = UserEvent.from_wire(item)
            except KonsulError:
                self.refused += 1
                continue
            if event.id in self._ids.get(scope, ()):
                continue
            self.ltime = max(self.ltime, event.ltime)
            self._add(scope, event, False)
            added.append(event)
        return added

    def events(self, scope: str | None = None) -> list[UserEvent]:
        """Oldest first; ``None``: every scope's, in the order they arrived (what the agent has seen)."""
        if scope is not None:
            return list(self._rings.get(scope, ()))
        arrived = [(self._ids[name][e.id], e) for name, ring in self._rings.items() for e in ring]
        return [e for _, e in sorted(arrived, key=lambda pair: pair[0])]

    def index(self, scope: str) -> int:
        ring = self._rings.get(scope)
        return uuid_index(ring[-1].id) if ring else 1

    def replay(self, scope: str) -> list[dict[str, Any]]:
        """The wire form of the events of ``scope`` recent enough to send to a peer that connects."""
        since = self.wall_ms() - int(REPLAY_WINDOW_S * 1000)
        return [e.to_wire() for e in self._rings.get(scope, ()) if e.fired_ms >= since]

    def _add(self, scope: str, event: UserEvent, local: bool) -> None:
        ring = self._rings.get(scope)
        if ring is None:
            ring = self._rings[scope] = deque()
            self._ids[scope] = {}
        ids = self._ids[scope]
        if len(ring) >= self.keep:
            ring.popleft()
        ring.append(event)
        self._arrivals += 1
        ids[event.id] = self._arrivals
        if len(ids) > 4 * self.keep:
            del ids[next(iter(ids))]
        for listener in list(self.listeners):
            listener(scope, event, local)
