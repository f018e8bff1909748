"""Topic filters (section 4.7): wildcards, matching, and MQTT 5 shared subscriptions (``$share/``).

A filter that breaks the wildcard rules is not a malformed packet: the
SUBSCRIBE is answered with a failure for that filter (0x80 in 3.1.1, 0x8F
"topic filter invalid" in 5.0), so :func:`parse_filter` raises
:class:`FilterError`, not :class:`ProtocolViolation`.
"""

from __future__ import annotations

from dataclasses import dataclass

SHARE_PREFIX = "$share/"


class FilterError(ValueError):
    """A topic filter that breaks the rules of section 4.7 (or 4.8.2 for a shared one)."""


@dataclass(frozen=True, slots=True)
class TopicFilter:
    """A checked filter: ``share`` is the share name of a ``$share/<name>/<filter>`` subscription, else None."""

    filter: str
    share: str | None = None

    @property
    def wildcard(self) -> bool:
        return "+" in self.filter or "#" in self.filter


def parse_filter(raw: str) -> TopicFilter:
    """The filter ``raw`` names, checked; :class:`FilterError` if it breaks the rules."""
    share = None
    topic_filter = raw
    if raw.startswith(SHARE_PREFIX):
        share, sep, topic_filter = raw[len(SHARE_PREFIX):].partition("/")
        if not share or not sep or not topic_filter or "+" in share or "#" in share:  # [MQTT-4.8.2-1], [MQTT-4.8.2-2]
            raise FilterError(f"{raw!r}: a shared subscription is $share/<name>/<filter>, the name without wildcards")
    check_filter(topic_filter)
    return TopicFilter(topic_filter, share)


def check_filter(topic_filter: str) -> None:
    if not topic_filter:
        raise FilterError("an empty topic filter")
    if "+" not in topic_filter and "#" not in topic_filter:
        return
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != last):  # [MQTT-4.7.1-2]
            raise FilterError(f"{topic_filter!r}: '#' must be a whole level, and the last")
        if "+" in level and level != "+":  # [MQTT-4.7.1-3]
            raise FilterError(f"{topic_filter!r}: '+' must be a whole level")


def matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` (not a shared one; see :func:`parse_filter`).

    A filter starting with a wildcard does not match a topic starting with
    ``$`` [MQTT-4.7.2-1]: ``#`` does not see ``$SYS/...``.
    """
    if "+" not in topic_filter and "#" not in topic_filter:
        return topic_filter == topic
    if topic.startswith("$") and topic_filter[0] in "+#":
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels) or level not in ("+", topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)
