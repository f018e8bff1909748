"""Consul sessions and KV locks against a real `konsul edge`, with py-consul.

Session TTLs are short here (``--session-ttl-min 1s``); every wait is on a
condition (a blocking query, or polling with a deadline), never a sleep.
"""

from __future__ import annotations

import signal
import threading

import consul
import consul.exceptions
import httpx
import pytest

from agents import EdgeProcess, HubProcess, eventually

NO_SESSION = "0c3c5a0e-0000-4000-8000-000000000000"


@pytest.fixture(scope="module")
def lock_edge(tmp_path_factory):
    process = EdgeProcess(tmp_path_factory.mktemp("locks"), extra=["--session-ttl-min", "1s"])
    yield process
    process.stop()


@pytest.fixture
def client(lock_edge):
    return consul.Consul(host=lock_edge.host, port=lock_edge.port)


def test_session_create_info_list_node_renew_destroy(client):
    sid = client.session.create(name="worker", behavior="release", ttl=30, lock_delay=5)
    _, info = client.session.info(sid)
    assert info["ID"] == sid and info["Name"] == "worker" and info["Node"] == "n1"
    assert info["Behavior"] == "release" and info["TTL"] == "30s"
    assert info["LockDelay"] == 5 * 10**9  # nanoseconds, as Consul shows it
    assert info["NodeChecks"] == ["serfHealth"] and info["CreateIndex"] == info["ModifyIndex"] > 0
    index, listed = client.session.list()
    assert sid in [s["ID"] for s in listed] and int(index) >= info["ModifyIndex"]
    assert sid in [s["ID"] for s in client.session.node("n1")[1]]
    assert client.session.node("elsewhere")[1] == []
    assert client.session.renew(sid)["ID"] == sid
    assert client.session.destroy(sid) is True
    assert client.session.info(sid)[1] is None
    assert sid not in [s["ID"] for s in client.session.list()[1]]
    with pytest.raises(consul.NotFound):
        client.session.renew(sid)


def test_session_create_refusals(client, lock_edge):
    # (py-consul checks TTL and Behavior itself; a raw client reaches the edge's own checks.)
    for body in ({"TTL": "86401s"}, {"Behavior": "explode"}, {"LockDelay": "61s"}, {"TTL": "soon"}):
        refused = httpx.put(f"{lock_edge.url}/v1/session/create", json=body)
        assert refused.status_code == 400 and refused.json()["error"] == "invalid_argument", body
    refused = httpx.put(f"{lock_edge.url}/v1/session/create", json={"TTL": "100ms"})
    assert refused.status_code == 400 and "between 1s and 86400s" in refused.json()["detail"]
    refused = httpx.put(f"{lock_edge.url}/v1/session/create", json={"NodeChecks": ["no-such-check"]})
    assert refused.status_code == 400 and refused.json()["error"] == "session_check_failing"
    refused = httpx.put(f"{lock_edge.url}/v1/session/create", json={"Node": "unknown-node"})
    assert refused.status_code == 404


def test_acquire_release_and_the_lock_fields(client):
    mine, theirs = client.session.create(lock_delay=0), client.session.create(lock_delay=0)
    assert client.kv.put("locks/a", "one", acquire=mine) is True
    _, entry = client.kv.get("locks/a")
    assert entry["Session"] == mine and entry["LockIndex"] == 1 and entry["Value"] == b"one"
    assert client.kv.put("locks/a", "two", acquire=theirs) is False  # held: nothing written
    assert client.kv.get("locks/a")[1]["Value"] == b"one"
    assert client.kv.put("locks/a", "again", acquire=mine) is True  # the holder again: same LockIndex
    assert client.kv.get("locks/a")[1]["LockIndex"] == 1
    # A plain write on a locked key is allowed, as in Consul, and keeps the lock.
    assert httpx.put(f"http://{client.http.host}:{client.http.port}/v1/kv/locks/a", content=b"plain").json() is True
    _, entry = client.kv.get("locks/a")
    assert entry["Value"] == b"plain" and entry["Session"] == mine
    _, listed = client.kv.get("locks/", recurse=True)
    assert listed[0]["Session"] == mine
    assert client.kv.put("locks/a", "x", release=theirs) is False  # not the holder
    assert client.kv.put("locks/a", "released", release=mine) is True
    _, entry = client.kv.get("locks/a")
    assert "Session" not in entry and entry["LockIndex"] == 1 and entry["Value"] == b"released"
    assert client.kv.put("locks/a", "three", acquire=theirs) is True  # an explicit release has no lock-delay
    assert client.kv.get("locks/a")[1]["LockIndex"] == 2
    # A deleted key takes its lock with it: written again, it is a new key, unlocked.
    assert client.kv.delete("locks/a") is True
    client.kv.put("locks/a", "new")
    _, entry = client.kv.get("locks/a")
    assert "Session" not in entry and entry["LockIndex"] == 0


def test_racing_clients_never_hold_a_lock_together(lock_edge):
    holders: list[str] = []
    violations: list[str] = []
    acquired = {i: 0 for i in range(6)}
    guard = threading.Lock()

    def contend(worker: int) -> None:
        c = consul.Consul(host=lock_edge.host, port=lock_edge.port)
        sid = c.session.create(name=f"racer-{worker}", lock_delay=0)
        for _ in range(25):
            if not c.kv.put("race/lock", f"w{worker}", acquire=sid):
                continue
            with guard:
                if holders:
                    violations.append(f"{worker} acquired while {holders} held it")
                holders.append(sid)
            acquired[worker] += 1
            if c.kv.get("race/lock")[1]["Session"] != sid:
                violations.append(f"{worker} holds the lock but the key names another session")
            with guard:
                holders.remove(sid)
            assert c.kv.put("race/lock", "", release=sid) is True
        c.session.destroy(sid)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not violations, violations
    assert sum(acquired.values()) > 0


def run_lock_recipe(c: consul.Consul, key: str, name: str, log: list[str], entered: threading.Event | None,
                    leave: threading.Event | None) -> None:
    """py-consul's lock pattern: acquire, else block on the key until its Session is gone, and retry."""
    sid = c.session.create(name=name, lock_delay=0, ttl=30)
    try:
        while not c.kv.put(key, name, acquire=sid):
            index, entry = c.kv.get(key)
            while entry is not None and entry.get("Session"):
                index, entry = c.kv.get(key, index=index, wait="10s")
        log.append(f"enter {name}")
        if entered is not None:
            entered.set()
        if leave is not None:
            assert leave.wait(30)
        log.append(f"leave {name}")
        assert c.kv.put(key, "", release=sid) is True
    finally:
        c.session.destroy(sid)


def test_the_lock_recipe_serialises_two_workers(lock_edge):
    log: list[str] = []
    first_in, let_go = threading.Event(), threading.Event()
    first = threading.Thread(target=run_lock_recipe, args=(
        consul.Consul(host=lock_edge.host, port=lock_edge.port), "recipe/lock", "A", log, first_in, let_go))
    first.start()
    assert first_in.wait(30)
    second = threading.Thread(target=run_lock_recipe, args=(
        consul.Consul(host=lock_edge.host, port=lock_edge.port), "recipe/lock", "B", log, None, None))
    second.start()
    # B is blocked on the key (its session exists), not inside.
    c = consul.Consul(host=lock_edge.host, port=lock_edge.port)
    eventually(lambda: any(s["Name"] == "B" for s in c.session.list()[1]), what="B's session")
    assert log == ["enter A"]
    let_go.set()
    first.join(30)
    second.join(30)
    assert log == ["enter A", "leave A", "enter B", "leave B"]


def short_session(edge: EdgeProcess, **fields) -> str:
    """A session with a TTL below py-consul's own 10s floor (the edge runs with --session-ttl-min 1s)."""
    response = httpx.put(f"{edge.url}/v1/session/create", json={"TTL": "1s", "LockDelay": "0s", **fields})
    assert response.status_code == 200, response.text
    return response.json()["ID"]


def test_ttl_expiry_releases_and_delete_behaviour_deletes(client, lock_edge):
    released = short_session(lock_edge, Behavior="release")
    deleted = short_session(lock_edge, Behavior="delete")
    assert client.kv.put("ttl/released", "kept", acquire=released) is True
    assert client.kv.put("ttl/deleted", "gone", acquire=deleted) is True
    index, entry = client.kv.get("ttl/released")
    # Nobody renews: both end within twice the TTL; a blocking read sees the release.
    while entry.get("Session"):
        index, entry = client.kv.get("ttl/released", index=index, wait="10s")
    assert entry["Value"] == b"kept" and entry["LockIndex"] == 1
    eventually(lambda: client.kv.get("ttl/deleted")[1] is None, what="the delete-behaviour key gone")
    assert client.session.info(released)[1] is None and client.session.info(deleted)[1] is None


def test_destroy_releases_and_lock_delay_holds_the_key(client):
    holder = client.session.create(lock_delay=2)
    waiting = client.session.create(lock_delay=0)
    assert client.kv.put("delay/key", "held", acquire=holder) is True
    assert client.session.destroy(holder) is True
    entry = client.kv.get("delay/key")[1]
    assert "Session" not in entry and entry["Value"] == b"held"
    # Within the 2s lock-delay no session may take it; after it, one may.
    assert client.kv.put("delay/key", "mine", acquire=waiting) is False
    eventually(lambda: client.kv.put("delay/key", "mine", acquire=waiting), timeout=15, what="the lock-delay over")
    assert client.kv.get("delay/key")[1]["Session"] == waiting


def test_txn_lock_unlock_check_session(client):
    a, b = client.session.create(lock_delay=0), client.session.create(lock_delay=0)
    encoded = "dmFsdWU="  # "value"
    result = client.txn.put([
        {"KV": {"Verb": "lock", "Key": "txn/lock", "Value": encoded, "Session": a}},
        {"KV": {"Verb": "check-session", "Key": "txn/lock", "Session": a}},
        {"KV": {"Verb": "set", "Key": "txn/other", "Value": encoded}},
    ])
    assert result["Errors"] is None
    assert result["Results"][0]["KV"]["Session"] == a and result["Results"][0]["KV"]["LockIndex"] == 1
    assert client.kv.get("txn/lock")[1]["Session"] == a
    with pytest.raises(consul.ConsulException) as refused:
        client.txn.put([
            {"KV": {"Verb": "set", "Key": "txn/other", "Value": "eA=="}},
            {"KV": {"Verb": "lock", "Key": "txn/lock", "Value": encoded, "Session": b}},
        ])
    assert "already held" in str(refused.value)
    assert client.kv.get("txn/other")[1]["Value"] == b"value"  # all or nothing
    for verb in ("unlock", "check-session"):
        with pytest.raises(consul.ConsulException):
            client.txn.put([{"KV": {"Verb": verb, "Key": "txn/lock", "Session": b}}])
    result = client.txn.put([{"KV": {"Verb": "unlock", "Key": "txn/lock", "Value": encoded, "Session": a}}])
    assert result["Errors"] is None
    assert "Session" not in client.kv.get("txn/lock")[1]
    result = client.txn.put([{"KV": {"Verb": "lock", "Key": "txn/lock", "Value": encoded, "Session": b}}])
    assert result["Results"][0]["KV"]["LockIndex"] == 2


def test_a_blocking_session_list_wakes_on_a_change(client, lock_edge):
    index, _ = client.session.list()
    answers: list = []
    watcher_client = consul.Consul(host=lock_edge.host, port=lock_edge.port)
    watcher = threading.Thread(target=lambda: answers.append(watcher_client.session.list(index=index, wait="30s")))
    watcher.start()
    sid = client.session.create(name="wake-up")
    watcher.join(30)
    new_index, sessions = answers[0]
    assert int(new_index) > int(index) and sid in [s["ID"] for s in sessions]
    # info blocks the same way, and wakes when the session ends.
    info_index, _ = client.session.info(sid)
    watcher = threading.Thread(
        target=lambda: answers.append(watcher_client.session.info(sid, index=info_index, wait="30s")))
    watcher.start()
    client.session.destroy(sid)
    watcher.join(30)
    assert answers[1][1] is None


def test_sessions_and_locks_survive_kill_9(tmp_path):
    edge = EdgeProcess(tmp_path / "edge")
    try:
        c = consul.Consul(host=edge.host, port=edge.port)
        sid = c.session.create(name="durable", lock_delay=0)
        assert c.kv.put("durable/lock", "v", acquire=sid) is True
        edge.stop(signal.SIGKILL)
        edge = EdgeProcess(tmp_path / "edge")
        c = consul.Consul(host=edge.host, port=edge.port)
        assert c.session.info(sid)[1]["Name"] == "durable"
        entry = c.kv.get("durable/lock")[1]
        assert entry["Session"] == sid and entry["LockIndex"] == 1
        other = c.session.create(lock_delay=0)
        assert c.kv.put("durable/lock", "x", acquire=other) is False
    finally:
        edge.stop()


def test_the_hub_and_other_scopes_grant_no_locks(tmp_path):
    hub = HubProcess(tmp_path / "hub")
    edge = EdgeProcess(tmp_path / "edge", site="s1", hub_url=hub.url)
    try:
        c = consul.Consul(host=edge.host, port=edge.port)
        sid = c.session.create(lock_delay=0)
        assert c.kv.put("site/lock", "held", acquire=sid) is True
        # The value replicates; the lock is the edge's alone.
        eventually(lambda: httpx.get(f"{hub.url}/v1/kv/site/lock?dc=s1&raw").content == b"held",
                   what="the value at the hub")
        at_hub = httpx.get(f"{hub.url}/v1/kv/site/lock?dc=s1").json()[0]
        assert "Session" not in at_hub
        for request in (
            ("PUT", f"/v1/kv/site/lock?dc=s1&acquire={sid}", b"stolen"),
            ("PUT", f"/v1/kv/site/lock?dc=s1&release={sid}", b""),
            ("PUT", "/v1/session/create?dc=s1", b"{}"),
            ("GET", "/v1/session/list?dc=s1", None),
            ("PUT", "/v1/txn?dc=s1", b'[{"KV": {"Verb": "lock", "Key": "site/lock", "Session": "%s"}}]' % sid.encode()),
        ):
            refused = httpx.request(request[0], hub.url + request[1], content=request[2])
            assert refused.status_code == 400, (request, refused.text)
            assert refused.json()["error"] == "locks_local_to_edge" and "edge" in refused.json()["detail"]
        assert httpx.get(f"{hub.url}/v1/kv/site/lock?dc=s1&raw").content == b"held"
        # At the edge, the global scope (written by every edge) is refused too.
        refused = httpx.put(f"{edge.url}/v1/kv/shared/lock?dc=global&acquire={sid}", content=b"x")
        assert refused.status_code == 400 and refused.json()["error"] == "locks_local_to_edge"
        assert httpx.get(f"{edge.url}/v1/kv/shared/lock?dc=global").status_code == 404
        assert c.kv.get("site/lock")[1]["Session"] == sid
    finally:
        edge.stop()
        hub.stop()


def test_a_critical_check_ends_the_sessions_bound_to_it(client, lock_edge):
    service = {"Name": "guarded", "Port": 80, "Check": {"TTL": "60s"}}
    assert httpx.put(f"{lock_edge.url}/v1/agent/service/register", json=service).status_code == 200
    check = "service:guarded"
    refused = httpx.put(f"{lock_edge.url}/v1/session/create", json={"Checks": ["serfHealth", check]})
    assert refused.status_code == 400 and "critical" in refused.json()["detail"]  # TTL checks start critical
    assert httpx.put(f"{lock_edge.url}/v1/agent/check/pass/{check}").status_code == 200
    sid = client.session.create(checks=["serfHealth", check], lock_delay=0)
    assert client.session.info(sid)[1]["NodeChecks"] == ["serfHealth", check]
    assert client.kv.put("guarded/lock", "v", acquire=sid) is True
    assert httpx.put(f"{lock_edge.url}/v1/agent/check/fail/{check}").status_code == 200
    eventually(lambda: client.session.info(sid)[1] is None, what="the session ended by its check")
    assert "Session" not in client.kv.get("guarded/lock")[1]
