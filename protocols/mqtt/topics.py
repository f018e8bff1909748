"""The MQTT topic contract (CONTRACT.md, "MQTT") and who may use which topic.

Every topic a device may touch is either one of its own device topics,
``konsul/v1/devices/<id>/{telemetry,reported,desired,status}``, or a KV topic,
``konsul/v1/kv/<key>``, or (to subscribe) a user event topic,
``konsul/v1/events/<name>``. Anything else is outside the contract and refused.

Access rules, applied by both the embedded broker and the external-broker
client:

- a device publishes its own telemetry, reported state and status, and KV keys
  its rights allow (``KVWrite`` prefixes, or with ACLs on its policies too);
  another device's topics only with ``device:write`` on it (a policy);
  ``desired`` is written by the agent only;
- user events (``/v1/event/fire``) reach devices on ``konsul/v1/events/<name>``,
  written by the agent only; with ACLs on a device subscribes to an event name
  it has ``event:read`` on (a wildcard needs ``event_prefix ""`` read), with
  ACLs off every admitted device may;
- a device subscribes under its own device topics (another device's with
  ``device:read`` on it) and under ``konsul/v1/kv/``;
  a KV filter must be able to match a key the device may read, and every KV
  message is checked again per key on delivery, because a prefix allowance
  (``conf``) does not line up with topic levels (``config/x``, ``conference``).

These are pure functions over strings, a :class:`DeviceRecord` and its rights
(``protocols/device_access.py``), so they are tested without a broker.
"""

from __future__ import annotations

from dataclasses import dataclass

from konsul.protocols.device_access import LegacyRights, Rights
from konsul.sync.devices import DeviceRecord, check_device_id
from konsul.sync.errors import KonsulError
from konsul.sync.limits import check_key

from .codec.filters import matches  # noqa: F401 - the one topic matcher; callers import it from here

ROOT = "konsul/v1/"
DEVICES = ROOT + "devices/"
KV = ROOT + "kv/"
EVENTS = ROOT + "events/"
DEVICE_LEAVES = ("telemetry", "reported", "desired", "status")
# What a device may publish on its own device topics; "desired" is the agent's.
DEVICE_PUBLISHES = ("telemetry", "reported", "status")
STATUS_VALUES = (b"online", b"offline")


@dataclass(frozen=True, slots=True)
class Topic:
    """A topic of the contract: ``kind`` is a device leaf or ``"kv"``."""

    kind: str
    device_id: str = ""
    key: str = ""


class TopicRefused(Exception):
    """A topic or filter this device may not use; ``reason`` labels the metric."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def device_topic(device_id: str, leaf: str) -> str:
    return f"{DEVICES}{device_id}/{leaf}"


def kv_topic(key: str) -> str | None:
    """The topic of a KV key, or None for keys MQTT cannot name (``+`` and ``#``)."""
    if "+" in key or "#" in key:
        return None
    return KV + key


def event_topic(name: str) -> str:
    """The topic a user event is published on (its name has no ``/``, ``+`` or ``#``)."""
    return EVENTS + name


def may_read_event(rights: Rights | None, name: str) -> bool:
    """``event:read`` on ``name``; with ACLs off (no policies to grant it) every device may."""
    return rights is None or isinstance(rights, LegacyRights) or rights.allows("event", name, "read")


def parse_topic(topic: str) -> Topic:
    """The contract topic ``topic`` names; raises :class:`TopicRefused` ("topic")."""
    if topic.startswith(KV):
        key = topic[len(KV):]
        try:
            check_key(key)
        except KonsulError as error:
            raise TopicRefused("topic", f"{topic!r} does not name a valid KV key: {error}") from None
        return Topic("kv", key=key)
    if topic.startswith(EVENTS):
        raise TopicRefused("forbidden", f"{topic!r} is written by the agent only (fire events with PUT /v1/event/fire)")
    if topic.startswith(DEVICES):
        device_id, sep, leaf = topic[len(DEVICES):].partition("/")
        if sep and leaf in DEVICE_LEAVES and _valid_id(device_id):
            return Topic(leaf, device_id=device_id)
    raise TopicRefused("topic", f"{topic!r} is outside the topic contract (konsul/v1/devices/<id>/..., konsul/v1/kv/<key>)")


def check_publish(record: DeviceRecord, topic: str, rights: Rights | None = None) -> Topic:
    """The topic if ``record``'s device may publish to it, else :class:`TopicRefused`.

    ``rights`` is what the device may do (``device_access.py``); without it,
    the record's ``KVWrite`` prefixes and its own device topics (ACLs off).
    """
    rights = rights if rights is not None else LegacyRights(record)
    parsed = parse_topic(topic)
    if parsed.kind == "kv":
        if not rights.allows("key", parsed.key, "write"):
            raise TopicRefused("forbidden", rights.denial("key", parsed.key, "write"))
    elif parsed.kind not in DEVICE_PUBLISHES:
        raise TopicRefused("forbidden", f"{topic!r} is written by the agent only")
    elif parsed.device_id != record.device_id and not rights.allows("device", parsed.device_id, "write"):
        raise TopicRefused(
            "forbidden",
            f"device {record.device_id!r} may not publish to another device's topic {topic!r}"
            + ("" if isinstance(rights, LegacyRights) else f" ({rights.denial('device', parsed.device_id, 'write')})"),
        )
    return parsed


def check_subscribe(record: DeviceRecord, topic_filter: str, rights: Rights | None = None) -> None:
    """Raise :class:`TopicRefused` unless ``record``'s device may subscribe to ``topic_filter``."""
    rights = rights if rights is not None else LegacyRights(record)
    if topic_filter.startswith(KV):
        literal = literal_prefix(topic_filter[len(KV):])
        if literal is None:  # no wildcard: one key
            key = parse_topic(topic_filter).key
            if not rights.allows("key", key, "read"):
                raise TopicRefused("forbidden", rights.denial("key", key, "read"))
            return
        if not rights.may_read_under(literal):
            raise TopicRefused(
                "forbidden", f"{topic_filter!r} matches no KV key device {record.device_id!r} may read (KVRead {list(record.kv_read)})"
            )
        return
    if topic_filter.startswith(EVENTS):
        name = topic_filter[len(EVENTS):]
        if not name or "/" in name or ("+" in name or "#" in name) and name not in ("+", "#"):
            raise TopicRefused("topic", f"{topic_filter!r}: subscribe to konsul/v1/events/<name>, /+ or /#")
        wanted = "" if name in ("+", "#") else name
        if not may_read_event(rights, wanted):
            raise TopicRefused(
                "forbidden", f"device {record.device_id!r} lacks permission 'event:read' on "
                + (f"event {name!r}" if wanted else 'every event (a wildcard needs event_prefix "" read)')
            )
        return
    if topic_filter.startswith(DEVICES):
        levels = topic_filter[len(DEVICES):].split("/")
        if levels[0] != record.device_id and (
            levels[0] in ("+", "#") or not _valid_id(levels[0]) or not rights.allows("device", levels[0], "read")
        ):  # "+" and "#": every device's topics
            raise TopicRefused("forbidden", f"device {record.device_id!r} may only subscribe to its own device topics")
        if len(levels) == 2 and (levels[1] in DEVICE_LEAVES or levels[1] in ("+", "#")):
            return
    raise TopicRefused(
        "topic", f"{topic_filter!r} is outside the topic contract (konsul/v1/devices/<own id>/..., konsul/v1/kv/..., "
        "konsul/v1/events/...)"
    )


def may_receive(record: DeviceRecord, topic: str, rights: Rights | None = None) -> bool:
    """Whether a message on ``topic`` may be delivered to ``record``'s device."""
    if topic.startswith(KV):
        if rights is None:
            return record.may_read(topic[len(KV):])
        return rights.allows("key", topic[len(KV):], "read")
    if topic.startswith(EVENTS):
        return may_read_event(rights, topic[len(EVENTS):])
    if topic.startswith(DEVICES):
        device_id = topic[len(DEVICES):].partition("/")[0]
        return device_id == record.device_id or (rights is not None and rights.allows("device", device_id, "read"))
    return False


def literal_prefix(topic_filter: str) -> str | None:
    """The part of a filter before its first wildcard level; None if it has none."""
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if level in ("+", "#"):
            return "/".join(levels[:index]) + ("/" if index else "")
    return None


def _valid_id(device_id: str) -> bool:
    try:
        check_device_id(device_id)
    except KonsulError:
        return False
    return True
