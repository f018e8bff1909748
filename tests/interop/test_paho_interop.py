"""The Eclipse Paho interoperability suites, unmodified, against a real edge (and mosquitto).

``../shared/peers/paho.mqtt.testing/interoperability`` (seen from the project
root) holds ``client_test.py`` (MQTT 3.1.1) and ``client_test5.py`` (MQTT 5.0).
``paho_suites.py`` runs one in a child process with its topics moved under
``konsul/v1/kv/<prefix>/`` and its clients logged in as registered devices
(see there), each suite against an edge of its own.

Every case the topic contract (docs/mqtt.md) allows must pass against the
edge. A case the contract forbids is listed in ``FORBIDDEN`` with the reason;
the suite does not run it against the edge, and the test checks instead that
the edge refuses it (or behaves) the way docs/mqtt.md says. ``BROKER_GAPS``
lists what the broker gets wrong today, as strict xfails.

With ``KONSUL_PAHO_MOSQUITTO=1`` each suite also runs, whole, against
mosquitto with the same topic mapping and an ACL file granting the prefix: the
reference that shows the wrapper right. Cases where mosquitto itself departs
from what the suite expects (also with the suite's own topics) are in
``MOSQUITTO_DIFFERS``. That takes about 4 minutes (the 5.0 suite's waits);
the edge runs alone about a minute. The runs start together when the module
starts and run side by side (they wait mostly on ``time.sleep``).

    .venv/bin/python -m pytest tests/interop/test_paho_interop.py -q
    KONSUL_PAHO_MOSQUITTO=1 .venv/bin/python -m pytest tests/interop/test_paho_interop.py -q -rxX
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from agents import AgentProcess, free_port
from gateway_edges import start_mqtt_edge

sys.path.insert(0, str(Path(__file__).parent))
import paho_suites  # noqa: E402

SUITES = ("v311", "v5")
PREFIX = {"v311": "paho", "v5": "paho5"}
PROTOCOL = {"v311": mqtt.MQTTv311, "v5": mqtt.MQTTv5}
RUN_DEADLINE_S = 420  # a whole suite; each case has its own (paho_suites._CaseClock)
# The suites against mosquitto too, the reference that shows the wrapper right (they take
# about 4 minutes, the 5.0 suite's waits, so the suite of this project leaves them out).
WITH_MOSQUITTO = os.environ.get("KONSUL_PAHO_MOSQUITTO", "") not in ("", "0")

# -- what the contract forbids, and why -----------------------------------------------------

KV_IS_STATE = (
    "several writes to one key in quick succession: a KV topic carries the key's stored value, and "
    "a watcher may get fewer messages, always ending on the stored value (docs/mqtt.md, Topics)"
)
EMPTY_PAYLOAD_DELETES = (
    "publishes empty payloads as messages: on a KV topic an empty payload deletes the key, and "
    "deleting a key that does not exist changes nothing, so nothing is published (docs/mqtt.md, Topics)"
)
WILL_ELSEWHERE = (
    "a Will on a KV topic: a device's Will must be `offline` on its own status topic, anything else "
    "would relay a message to other devices (CONNACK 5, docs/mqtt.md, Identity and access)"
)
CLIENT_ID_IS_DEVICE = (
    "an empty client id: the client id is the device id, so a client without one is refused "
    "(CONNACK 2 or 4, counted as `auth`; docs/mqtt.md, Identity and access)"
)
NOT_RELAYED = (
    "expects the publisher's message passed on (its QoS, user properties, response topic, correlation "
    "data, retain flag): a device never relays to another; its publish is a write and watchers get the "
    "stored value (docs/mqtt.md, Topics)"
)

V5_SUBACK_REASON = (
    "the suite's 5.0 client library takes only 0x80 as a failed SUBACK and stops reading at anything "
    "else; the edge answers 0x87 \"not authorized\" (docs/mqtt.md, MQTT 5), which MQTT 5.0 (3.9.3) allows"
)
KEEPALIVE_AS_GIVEN = (
    "expects the server to cap a 120 s keep-alive at 60 s (Server Keep Alive), a policy of the suite's "
    "own test broker; the edge takes the device's keep-alive as given and closes after 1.5x of it "
    "(docs/mqtt.md)"
)

FORBIDDEN: dict[str, dict[str, str]] = {
    "v311": {
        "testBasic": KV_IS_STATE,
        "test_keepalive": WILL_ELSEWHERE,
        "test_redelivery_on_reconnect": EMPTY_PAYLOAD_DELETES,
        "test_unsubscribe": EMPTY_PAYLOAD_DELETES,
        "test_zero_length_clientid": CLIENT_ID_IS_DEVICE,
    },
    "v5": {
        "test_basic": KV_IS_STATE,
        "test_publication_expiry": KV_IS_STATE,
        "test_flow_control1": KV_IS_STATE,  # three writes to one key; the third may replace the second
        "test_server_topic_alias": KV_IS_STATE,  # the same value written three times
        "test_subscribe_failure": V5_SUBACK_REASON,
        "test_server_keep_alive": KEEPALIVE_AS_GIVEN,
        "test_will_message": WILL_ELSEWHERE,
        "test_keepalive": WILL_ELSEWHERE,
        "test_will_delay": WILL_ELSEWHERE,
        "test_redelivery_on_reconnect": EMPTY_PAYLOAD_DELETES,
        "test_user_properties": EMPTY_PAYLOAD_DELETES,
        "test_payload_format": EMPTY_PAYLOAD_DELETES,
        "test_assigned_clientid": CLIENT_ID_IS_DEVICE,
        "test_retained_message": NOT_RELAYED,
        "test_request_response": NOT_RELAYED,
        "test_subscribe_options": NOT_RELAYED,
    },
}

# Cases the broker (protocols/mqtt/, the broker work of issue 18) fails: the suite's case if
# the contract allows it, else the check of what docs/mqtt.md says. Strict: once the broker
# passes one, the XPASS fails the run, so that its entry is removed here.
BROKER_GAPS: dict[str, dict[str, str]] = {
    "v311": {},
    "v5": {},
}

# Each of these fails against mosquitto 2.0.11 with the suite's own topics and no ACL too.
MOSQUITTO_DIFFERS: dict[str, dict[str, str]] = {
    "v311": {
        "test_overlapping_subscriptions": "mosquitto sends one message for overlapping subscriptions, "
        "not at the highest QoS of them",
        "test_subscribe_failure": "mosquitto grants every subscription (an ACL applies on delivery), never 0x80",
    },
    "v5": {
        "test_subscribe_failure": "mosquitto grants every subscription (an ACL applies on delivery), never 0x80",
        "test_subscribe_identifiers": "mosquitto sends one message per matching subscription, each with its "
        "own identifier, not one with both",
        "test_server_topic_alias": "mosquitto sends no topic aliases of its own",
        "test_will_delay": "mosquitto waits the Will delay when the session expires first (5 s, not 1 s)",
        "test_flow_control2": "mosquitto does not close (0x93) a client that exceeds its Receive Maximum: "
        "the case waits for that until the wrapper's deadline",
    },
}


def suite_cases(suite: str) -> list[str]:
    """The suite's cases, read from its file (unittest runs them sorted by name)."""
    path = paho_suites.suite_path(suite)
    if not path.is_file():
        return []
    return sorted(set(re.findall(r"^    def (test\w*)\(self\)", path.read_text(), re.MULTILINE)))


def case_params(suite: str, broker: str) -> list:
    cases = suite_cases(suite)
    if not cases:
        return [pytest.param(suite, None, marks=pytest.mark.skip(
            reason=f"the Paho suites are not at {paho_suites.SUITES_DIR} (../shared/peers next to the project)"))]
    params = []
    for case in cases:
        marks = []
        if broker == "mosquitto" and case in MOSQUITTO_DIFFERS[suite]:
            marks.append(pytest.mark.xfail(reason=MOSQUITTO_DIFFERS[suite][case], strict=False))
        if broker == "edge" and case in BROKER_GAPS[suite]:
            marks.append(pytest.mark.xfail(reason=BROKER_GAPS[suite][case], strict=True))
        params.append(pytest.param(suite, case, marks=marks, id=f"{suite}-{case}"))
    return params


# -- brokers and runs -----------------------------------------------------------------------

@dataclass
class Broker:
    port: int
    process: AgentProcess
    credentials: dict[str, str] = field(default_factory=dict)
    http_url: str | None = None


@dataclass
class SuiteRun:
    """One suite running in a child process against one broker; ``outcomes()`` waits for it."""

    suite: str
    broker: Broker
    out: Path
    process: subprocess.Popen
    log: Path
    _outcomes: dict | None = None

    def outcomes(self) -> dict[str, dict[str, str]]:
        if self._outcomes is None:
            try:
                self.process.wait(RUN_DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                pytest.fail(f"the {self.suite} suite ran over {RUN_DEADLINE_S} s: {self.log.read_text()[-3000:]}")
            if not self.out.exists():
                pytest.fail(f"the {self.suite} suite wrote no results: {self.log.read_text()[-3000:]}")
            self._outcomes = json.loads(self.out.read_text())
            assert "__load__" not in self._outcomes, self._outcomes["__load__"]["detail"]
        return self._outcomes


def start_mosquitto(directory: Path, suite: str) -> Broker:
    """mosquitto on a free port, its ACL granting the suite's KV prefix to the suite's devices."""
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    acl = directory / "acl"
    # Anyone may use the suite's prefix and shared subscriptions of it; nothing else (the
    # suite's nosubscribe filter is outside).
    acl.write_text(f"topic readwrite konsul/v1/kv/{PREFIX[suite]}/#\ntopic readwrite $share/#\n")
    config = directory / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nacl_file {acl}\n"
        # The 5.0 suite's test_server_keep_alive expects the server to cap keep-alive at 60 s.
        "max_keepalive 60\npersistence false\n"
        # Started as root, mosquitto drops to user "mosquitto" before reading the ACL file,
        # which lies in a directory only root may enter.
        + ("user root\n" if os.geteuid() == 0 else "")
    )
    process = AgentProcess(["-c", str(config)], command=["mosquitto"])
    process.wait_for(r"mosquitto version \S+ running")
    return Broker(port, process)


def start_edge(directory: Path, suite: str) -> Broker:
    """An edge of the suite's own; the suite's devices registered with the prefix as their allowance."""
    process = start_mqtt_edge(directory)
    broker = Broker(process.mqtt_port, process, http_url=process.url)
    prefix = PREFIX[suite]
    with httpx.Client(base_url=process.url, timeout=10) as http:
        for device in [*paho_suites.device_ids(prefix), f"{prefix}-check"]:
            allowance = [f"{prefix}/"] if device != f"{prefix}-check" else [f"{prefix}check/"]
            response = http.put(f"/v1/devices/{device}", json={"Type": "sensor", "KVRead": allowance, "KVWrite": allowance})
            assert response.status_code == 201, response.text
            broker.credentials[device] = response.json()["Token"]
    return broker


def start_run(directory: Path, suite: str, broker: Broker) -> SuiteRun:
    credentials = directory / f"{suite}-credentials.json"
    credentials.write_text(json.dumps(broker.credentials))
    out = directory / f"{suite}-outcomes.json"
    log = directory / f"{suite}-run.log"
    command = [
        sys.executable, str(Path(paho_suites.__file__)), "--suite", suite, "--port", str(broker.port),
        "--prefix", PREFIX[suite], "--credentials", str(credentials), "--out", str(out),
    ]
    if broker.http_url:
        # The edge: empty the prefix before each case, and run only the cases the contract
        # allows (the forbidden ones are checked apart, and their waits are most of the run).
        command += ["--reset-kv", broker.http_url]
        for case in suite_cases(suite):
            if case not in FORBIDDEN[suite]:
                command += ["--case", case]
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    return SuiteRun(suite, broker, out, process, log)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Iterator[dict[tuple[str, str], SuiteRun]]:
    """All four runs, started at once: {(suite, "mosquitto" | "edge"): run}."""
    if not paho_suites.SUITES_DIR.is_dir():
        pytest.skip(f"the Paho suites are not at {paho_suites.SUITES_DIR}")
    root = tmp_path_factory.mktemp("paho")
    brokers: list[Broker] = []
    started: dict[tuple[str, str], SuiteRun] = {}
    kinds = [("edge", start_edge)]
    if WITH_MOSQUITTO:
        kinds.insert(0, ("mosquitto", start_mosquitto))
    try:
        for suite in SUITES:
            for kind, start in kinds:
                broker = start(root / f"{kind}-{suite}", suite)
                brokers.append(broker)
                started[(suite, kind)] = start_run(root / f"{kind}-{suite}", suite, broker)
        yield started
    finally:
        for run in started.values():
            if run.process.poll() is None:
                run.process.kill()
                run.process.wait()
        for broker in brokers:
            broker.process.stop()


# -- the suites' cases ------------------------------------------------------------------------

def verdict(run: SuiteRun, case: str) -> dict[str, str]:
    outcomes = run.outcomes()
    assert case in outcomes, f"{case} did not run: {sorted(outcomes)}"
    return outcomes[case]


@pytest.mark.skipif(not WITH_MOSQUITTO, reason="the reference run against mosquitto (about 4 minutes, the suites' "
                    "full waits) runs with KONSUL_PAHO_MOSQUITTO=1")
@pytest.mark.parametrize(("suite", "case"), [p for s in SUITES for p in case_params(s, "mosquitto")])
def test_suite_case_against_mosquitto(runs, suite: str, case: str) -> None:
    result = verdict(runs[(suite, "mosquitto")], case)
    assert result["outcome"] == "pass", result["detail"]


@pytest.mark.parametrize(("suite", "case"), [p for s in SUITES for p in case_params(s, "edge")])
def test_suite_case_against_the_edge(runs, suite: str, case: str) -> None:
    run = runs[(suite, "edge")]
    if suite == "v5":
        code = mqtt5_connack(run.broker)
        assert code == 0, f"the edge refused an MQTT 5 CONNECT (reason {code:#x}): it does not speak MQTT 5"
    if case in FORBIDDEN[suite]:
        check_refused(run.broker, suite, FORBIDDEN[suite][case])
        return
    result = verdict(run, case)
    assert result["outcome"] == "pass", result["detail"]


def mqtt5_connack(broker: Broker) -> int:
    device = Device(broker, "v5", "paho5-check")
    code = device.connect()
    device.close()
    return code


def test_the_edge_accepts_mqtt_5(runs) -> None:
    """The 5.0 suite needs a broker speaking MQTT 5; say so plainly when the edge refuses it."""
    code = mqtt5_connack(runs[("v5", "edge")].broker)
    assert code == 0, f"the edge refused an MQTT 5 CONNECT (reason {code:#x}): it does not speak MQTT 5"


# -- how the edge refuses what the contract forbids -----------------------------------------

class Device:
    """A paho-mqtt client (3.1.1 or 5) that records what it gets."""

    def __init__(self, broker: Broker, suite: str, device_id: str, *, token: str | None = None, will: tuple | None = None):
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.events: queue.Queue[tuple] = queue.Queue()
        self.broker = broker
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=PROTOCOL[suite])
        password = token if token is not None else broker.credentials.get(device_id)
        if password is not None:
            self.client.username_pw_set(device_id, password)
        if will is not None:
            self.client.will_set(*will)
        self.client.on_connect = lambda c, u, flags, rc, props: self.events.put(("connect", rc.value, props))
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.events.put(("subscribe", [r.value for r in codes]))
        self.client.on_message = lambda c, u, message: self.messages.put(message)

    def connect(self, keepalive: int = 30) -> int:
        self.client.connect("127.0.0.1", self.broker.port, keepalive=keepalive)
        self.client.loop_start()
        code, self.connack_properties = self.event("connect")
        return code

    def event(self, kind: str, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while True:
            got = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            if got[0] == kind:
                return got[1] if len(got) == 2 else got[1:]

    def subscribe(self, topic: str, qos: int = 1) -> list[int]:
        self.client.subscribe(topic, qos)
        return self.event("subscribe")

    def publish(self, topic: str, payload: bytes, qos: int = 1, **kwargs) -> None:
        self.client.publish(topic, payload, qos=qos, **kwargs).wait_for_publish(10)

    def message(self, timeout: float = 10.0) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def refused_total(http: httpx.Client, reason: str) -> float:
    wanted = f'konsul_mqtt_refused_total{{reason="{reason}"}} '
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(wanted):
            return float(line.split()[-1])
    return 0.0


def check_refused(broker: Broker, suite: str, reason: str) -> None:
    """What the edge does instead of what the forbidden case expects, as docs/mqtt.md says."""
    prefix = PREFIX[suite]
    device_id = f"{prefix}-check"
    # A subtree of its own for each check, so that no earlier check's retained keys arrive.
    root = f"konsul/v1/kv/{prefix}check/c{time.monotonic_ns()}"
    key_topic = f"{root}/key"
    http = httpx.Client(base_url=broker.http_url, timeout=10)
    if reason is WILL_ELSEWHERE:
        refused = Device(broker, suite, device_id, will=(key_topic, b"client not disconnected", 1))
        code = refused.connect()
        refused.close()
        assert code in (5, 0x87), f"a Will on a KV topic was answered {code:#x}, not CONNACK 5 / 0x87 (not authorized)"
        own = Device(broker, suite, device_id, will=(f"konsul/v1/devices/{device_id}/status", b"offline", 1, True))
        assert own.connect() == 0, "a Will of `offline` on the device's own status topic is refused"
        own.close()
    elif reason is CLIENT_ID_IS_DEVICE:
        before = refused_total(http, "auth")
        anonymous = Device(broker, suite, "")  # as the suite's client: no user name, no password
        code = anonymous.connect()
        anonymous.close()
        # docs/mqtt.md, reason `auth`: a bad client id or a missing token, CONNACK 2 or 4
        # (MQTT 5: 0x85 or 0x86), whichever check comes first.
        assert code in (2, 4, 0x85, 0x86), f"an empty client id was answered {code:#x}, not CONNACK 2 or 4"
        assert refused_total(http, "auth") >= before + 1  # (the suite runs beside, refusals of its own count too)
    elif reason is KEEPALIVE_AS_GIVEN:
        device = Device(broker, suite, device_id)
        assert device.connect(keepalive=120) == 0
        assert not hasattr(device.connack_properties, "ServerKeepAlive"), device.connack_properties
        device.close()
    elif reason is V5_SUBACK_REASON:
        device = Device(broker, suite, device_id)
        assert device.connect() == 0
        assert device.subscribe(f"konsul/v1/kv/nosubscribe/{prefix}", 2) == [0x87]
        device.close()
    else:
        watcher = Device(broker, suite, device_id)
        assert watcher.connect() == 0
        assert watcher.subscribe(f"{root}/#") in ([0], [1], [2])
        writer = watcher  # a device hears its own KV writes: watchers get the stored result
        if reason is EMPTY_PAYLOAD_DELETES:
            writer.publish(key_topic, b"")  # no such key: nothing changes, nothing is published
            writer.publish(key_topic, b"value")
            writer.publish(key_topic, b"")
            first, second = watcher.message(), watcher.message()
            assert (first.topic, first.payload) == (key_topic, b"value"), "the empty publish to an absent key was relayed"
            assert (second.topic, second.payload) == (key_topic, b""), "a deletion is published as an empty payload"
            assert http.get(f"/v1/kv/{key_topic.removeprefix('konsul/v1/kv/')}").status_code == 404
        elif reason is KV_IS_STATE:
            for value in (b"1", b"2", b"3"):
                writer.publish(key_topic, value)
            seen = [watcher.message().payload]
            while seen[-1] != b"3":
                seen.append(watcher.message().payload)
            assert seen == sorted(seen) and set(seen) <= {b"1", b"2", b"3"}, seen
            assert http.get(f"/v1/kv/{key_topic.removeprefix('konsul/v1/kv/')}", params={"raw": ""}).content == b"3"
        elif reason is NOT_RELAYED:
            properties = None
            if suite == "v5":
                from paho.mqtt.packettypes import PacketTypes
                from paho.mqtt.properties import Properties

                properties = Properties(PacketTypes.PUBLISH)
                properties.UserProperty = [("a", "2")]
                properties.ResponseTopic = key_topic
                properties.CorrelationData = b"334"
            writer.publish(key_topic, b"request", qos=2, properties=properties)
            got = watcher.message()
            assert (got.topic, got.payload) == (key_topic, b"request")
            assert got.qos <= 1 and not getattr(got.properties, "UserProperty", None), "the publisher's message was relayed"
            assert not getattr(got.properties, "CorrelationData", None), "the publisher's properties were relayed"
        else:
            raise AssertionError(f"no check for {reason!r}")
        watcher.close()
    http.close()
