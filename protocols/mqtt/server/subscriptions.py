"""Who is subscribed to what: an index of topic filters, with wildcards and shared subscriptions.

Filters are kept in a tree of topic levels (a trie), so finding the
subscribers of a topic costs one step per level and wildcard branch, not one
match per filter held. A shared subscription (``$share/<group>/<filter>``)
is one entry per group and filter whose members take turns: each message
goes to one member of each group [MQTT-4.8.2], the next one after the last
that got one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..codec import Subscription


@dataclass(slots=True)
class Subscribed:
    """One session's subscription to one filter."""

    client_id: str
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    identifier: int | None = None  # the v5 subscription identifier, sent back with each match


@dataclass(slots=True)
class _Group:
    members: dict[str, Subscribed] = field(default_factory=dict)
    turn: int = 0


class _Node:
    __slots__ = ("children", "plain", "groups")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.plain: dict[str, Subscribed] = {}  # client id -> subscription ending at this level
        self.groups: dict[str, _Group] = {}  # share name -> members


class SubscriptionIndex:
    """Every session's filters, found by topic."""

    __slots__ = ("_root", "count")

    def __init__(self) -> None:
        self._root = _Node()
        self.count = 0

    def add(self, topic_filter: str, share: str | None, entry: Subscribed) -> bool:
        """Add or replace ``entry``'s subscription; True if it is new."""
        node = self._root
        for level in topic_filter.split("/"):
            node = node.children.setdefault(level, _Node())
        if share is None:
            table = node.plain
        else:
            table = node.groups.setdefault(share, _Group()).members
        new = entry.client_id not in table
        table[entry.client_id] = entry
        self.count += new
        return new

    def remove(self, topic_filter: str, share: str | None, client_id: str) -> bool:
        """Remove one subscription; True if there was one."""
        path = [self._root]
        for level in topic_filter.split("/"):
            child = path[-1].children.get(level)
            if child is None:
                return False
            path.append(child)
        node = path[-1]
        if share is None:
            found = node.plain.pop(client_id, None) is not None
        else:
            group = node.groups.get(share)
            found = group is not None and group.members.pop(client_id, None) is not None
            if group is not None and not group.members:
                del node.groups[share]
        self.count -= found
        # Prune empty branches so that a churn of filters does not leave a growing tree.
        levels = topic_filter.split("/")
        for depth in range(len(levels), 0, -1):
            child = path[depth]
            if child.children or child.plain or child.groups:
                break
            del path[depth - 1].children[levels[depth - 1]]
        return found

    def match(self, topic: str, connected: Callable[[str], bool] | None = None) -> list[Subscribed]:
        """The subscriptions a message on ``topic`` goes to: every plain one, one member per shared group.

        A client with several matching filters appears once per filter; the
        caller keeps the highest QoS [MQTT-3.3.4-2] and every subscription
        identifier. Walked with a stack, not recursion: this runs once per
        message the agent publishes. ``connected`` tells which client ids are
        connected: a shared group's turn passes over members away while one is.
        """
        found: list[Subscribed] = []
        levels = topic.split("/")
        count = len(levels)
        dollar = topic.startswith("$")
        stack = [(self._root, 0)]
        pop, push = stack.pop, stack.append
        while stack:
            node, depth = pop()
            children = node.children
            if children:
                if depth or not dollar:  # no wildcard at the first level matches a '$' topic [MQTT-4.7.2-1]
                    rest = children.get("#")
                    if rest is not None:  # '#' matches the parent level too ("a/#" matches "a")
                        _collect(rest, found, connected)
                    if depth < count:
                        plus = children.get("+")
                        if plus is not None:
                            push((plus, depth + 1))
                if depth < count:
                    child = children.get(levels[depth])
                    if child is not None:
                        push((child, depth + 1))
            if depth == count:
                _collect(node, found, connected)
        return found


def _collect(node: _Node, found: list[Subscribed], connected: Callable[[str], bool] | None) -> None:
    if node.plain:
        found.extend(node.plain.values())
    for group in node.groups.values():
        members = list(group.members.values())
        count = len(members)
        turn = (group.turn + 1) % count
        if connected is not None:
            # The next member in turn that is connected; if none is, the next in turn
            # (a persistent session away queues it).
            for step in range(count):
                if connected(members[(turn + step) % count].client_id):
                    turn = (turn + step) % count
                    break
        group.turn = turn
        found.append(members[turn])


def subscribed_from(client_id: str, subscription: Subscription, identifier: int | None) -> Subscribed:
    return Subscribed(client_id, subscription.qos, subscription.no_local, subscription.retain_as_published, identifier)
