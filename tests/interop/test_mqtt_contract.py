"""The topic contract and access rules alone (``protocols/mqtt/topics.py``), without a broker."""

from __future__ import annotations

import pytest

from konsul.protocols.mqtt.topics import TopicRefused, check_publish, check_subscribe, matches, may_receive, parse_topic
from konsul.sync.devices import DeviceRecord

SENSOR = DeviceRecord("s1", kv_read=("conf",), kv_write=("s1/",))


@pytest.mark.parametrize(
    "topic, kind",
    [
        ("konsul/v1/devices/s1/telemetry", "telemetry"),
        ("konsul/v1/devices/s1/status", "status"),
        ("konsul/v1/kv/a/b/c", "kv"),
    ],
)
def test_contract_topics(topic, kind):
    assert parse_topic(topic).kind == kind


@pytest.mark.parametrize(
    "topic",
    ["konsul/v1/devices/s1/firmware", "konsul/v1/devices/s1", "konsul/v1/kv/", "konsul/v1/kv/a/../b", "konsul/v2/kv/a", "x"],
)
def test_topics_outside_the_contract(topic):
    with pytest.raises(TopicRefused) as refused:
        parse_topic(topic)
    assert refused.value.reason == "topic"


def test_publish_rules():
    assert check_publish(SENSOR, "konsul/v1/kv/s1/setpoint").key == "s1/setpoint"
    assert check_publish(SENSOR, "konsul/v1/devices/s1/reported").kind == "reported"
    for topic in ("konsul/v1/kv/conf/x", "konsul/v1/devices/s2/telemetry", "konsul/v1/devices/s1/desired"):
        with pytest.raises(TopicRefused) as refused:
            check_publish(SENSOR, topic)
        assert refused.value.reason == "forbidden"


def test_subscribe_rules_and_per_key_delivery():
    # A KV filter is allowed if it can match a readable key ...
    for allowed in ("konsul/v1/kv/#", "konsul/v1/kv/config/#", "konsul/v1/kv/+/x", "konsul/v1/kv/s1/a",
                    "konsul/v1/devices/s1/#", "konsul/v1/devices/s1/+", "konsul/v1/devices/s1/desired"):
        check_subscribe(SENSOR, allowed)
    for refused in ("konsul/v1/kv/other/#", "konsul/v1/kv/secret", "konsul/v1/devices/+/desired", "konsul/#", "#"):
        with pytest.raises(TopicRefused):
            check_subscribe(SENSOR, refused)
    # ... and each message is checked per key, since prefixes do not follow topic levels.
    assert may_receive(SENSOR, "konsul/v1/kv/config/x") and may_receive(SENSOR, "konsul/v1/kv/conference")
    assert not may_receive(SENSOR, "konsul/v1/kv/other/x")
    assert may_receive(SENSOR, "konsul/v1/kv/s1/own")  # what a device may write, it may read
    assert not may_receive(SENSOR, "konsul/v1/devices/s2/desired")


@pytest.mark.parametrize(
    "topic_filter, topic, expected",
    [
        ("a/#", "a", True),  # '#' also matches the parent level
        ("a/#", "a/b/c", True),
        ("a/+", "a/b/c", False),
        ("a/+/c", "a/b/c", True),
        ("+", "a/b", False),
        ("a/b", "a/b", True),
    ],
)
def test_matching(topic_filter, topic, expected):
    assert matches(topic_filter, topic) is expected
