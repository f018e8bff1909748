"""`konsul kv ...` and `konsul services ...`, run as real commands against a real edge."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import uuid

import pytest
from agents import AgentProcess, EdgeProcess


def konsul(edge: EdgeProcess | None, *args: str, input: bytes | None = None, env: dict | None = None):
    """Run ``konsul ARGS`` (against ``edge`` via KONSUL_HTTP_ADDR) and return the result."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KONSUL_")}
    if edge is not None:
        environ["KONSUL_HTTP_ADDR"] = edge.addr
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "konsul.cli", *args],
        input=input if input is not None else b"",
        capture_output=True,
        env=environ,
        timeout=60,
    )


def ok(result) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout.decode()


def fails(result, code: int = 1) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    return result.stderr.decode()


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own, so that tests can share one edge."""
    return f"t{uuid.uuid4().hex[:8]}/"


def watch(edge: EdgeProcess, *args: str) -> AgentProcess:
    return AgentProcess(["kv", "watch", "--http-addr", edge.addr, *args])


def watched_lines(process: AgentProcess) -> list[str]:
    """The watch's stdout lines (its stderr notes start with ``konsul:``)."""
    return [line.rstrip("\n") for line in process.lines if not line.startswith("konsul:")]


# -- kv ----------------------------------------------------------------------------


def test_put_get_list_delete(shared_edge, prefix):
    assert ok(konsul(shared_edge, "kv", "put", prefix + "mode", "eco")).strip() == (
        f"Success! Data written to: {prefix}mode"
    )
    ok(konsul(shared_edge, "kv", "put", prefix + "sub/level", "3", "--flags", "42"))

    shown = ok(konsul(shared_edge, "kv", "get", prefix + "mode"))
    assert shown.splitlines()[0].split() == ["Key", prefix + "mode"]
    assert shown.splitlines()[1].split() == ["Value", "eco"]

    listed = ok(konsul(shared_edge, "kv", "list", prefix)).splitlines()
    assert listed[0].split() == ["KEY", "FLAGS", "INDEX", "VALUE"]
    rows = [line.split() for line in listed[1:]]
    assert [(r[0], r[1], r[3]) for r in rows] == [(prefix + "mode", "0", "eco"), (prefix + "sub/level", "42", "3")]
    # the columns are aligned
    for header in ("FLAGS", "INDEX", "VALUE"):
        column = listed[0].index(header)
        assert all(line[column - 1] == " " and line[column] != " " for line in listed[1:])

    assert ok(konsul(shared_edge, "kv", "list", prefix, "--keys")).split() == [prefix + "mode", prefix + "sub/level"]
    assert ok(konsul(shared_edge, "kv", "list", prefix, "--separator", "/")).split() == [prefix + "mode", prefix + "sub/"]

    assert ok(konsul(shared_edge, "kv", "delete", prefix + "mode")).strip() == f"Success! Deleted key: {prefix}mode"
    assert "does not exist" in fails(konsul(shared_edge, "kv", "get", prefix + "mode"))
    ok(konsul(shared_edge, "kv", "delete", prefix, "--recurse"))
    result = konsul(shared_edge, "kv", "list", prefix)
    assert ok(result) == ""
    assert "no keys under" in result.stderr.decode()


def test_values_from_stdin_and_files_round_trip_raw(shared_edge, prefix, tmp_path):
    binary = bytes(range(256)) + b"\n\x00end"
    ok(konsul(shared_edge, "kv", "put", prefix + "bin", "-", input=binary))
    assert konsul(shared_edge, "kv", "get", prefix + "bin", "--raw").stdout == binary
    assert "<binary, 261 bytes>" in ok(konsul(shared_edge, "kv", "get", prefix + "bin"))

    file = tmp_path / "config.txt"
    file.write_text("line one\nline two\n")
    ok(konsul(shared_edge, "kv", "put", prefix + "file", f"@{file}"))
    assert konsul(shared_edge, "kv", "get", prefix + "file", "--raw").stdout == b"line one\nline two\n"
    assert "line one\\nline two\\n" in ok(konsul(shared_edge, "kv", "get", prefix + "file"))

    assert "cannot read the value" in fails(konsul(shared_edge, "kv", "put", prefix + "x", f"@{tmp_path / 'missing'}"))

    # keys with characters that need escaping in a URL
    ok(konsul(shared_edge, "kv", "put", prefix + "a b?c#d%e", "odd"))
    assert konsul(shared_edge, "kv", "get", prefix + "a b?c#d%e", "--raw").stdout == b"odd"
    # dot segments reach the agent as written (not resolved away by the HTTP client)
    ok(konsul(shared_edge, "kv", "put", prefix + "./dot", "here"))
    assert ok(konsul(shared_edge, "kv", "list", prefix, "--keys")).split().count(prefix + "./dot") == 1
    assert "'..'" in fails(konsul(shared_edge, "kv", "put", prefix + "x/../escape", "v"))


def test_json_format_prints_the_api_json(shared_edge, prefix):
    assert json.loads(ok(konsul(shared_edge, "kv", "put", prefix + "k", "v", "--flags", "7", "--format", "json"))) is True
    [entry] = json.loads(ok(konsul(shared_edge, "kv", "get", prefix + "k", "--format", "json")))
    assert entry["Key"] == prefix + "k"
    assert base64.b64decode(entry["Value"]) == b"v"
    assert entry["Flags"] == 7
    assert set(entry) == {"Key", "Value", "Flags", "CreateIndex", "ModifyIndex", "LockIndex"}

    listed = json.loads(ok(konsul(shared_edge, "kv", "list", prefix, "--format", "json")))
    assert [e["Key"] for e in listed] == [prefix + "k"]
    assert json.loads(ok(konsul(shared_edge, "kv", "list", prefix, "--keys", "--format", "json"))) == [prefix + "k"]
    assert json.loads(ok(konsul(shared_edge, "kv", "list", prefix + "none/", "--format", "json"))) == []

    # the format also comes from the environment
    [entry] = json.loads(ok(konsul(shared_edge, "kv", "get", prefix + "k", env={"KONSUL_FORMAT": "json"})))
    assert entry["Key"] == prefix + "k"


def test_check_and_set(shared_edge, prefix):
    key = prefix + "cas"
    ok(konsul(shared_edge, "kv", "put", key, "first", "--cas", "0"))
    error = fails(konsul(shared_edge, "kv", "put", key, "second", "--cas", "0"))
    assert error.startswith("konsul: cas_mismatch:")
    assert konsul(shared_edge, "kv", "get", key, "--raw").stdout == b"first"

    [entry] = json.loads(ok(konsul(shared_edge, "kv", "get", key, "--format", "json")))
    index = str(entry["ModifyIndex"])
    ok(konsul(shared_edge, "kv", "put", key, "second", "--cas", index))
    assert konsul(shared_edge, "kv", "get", key, "--raw").stdout == b"second"

    # the index moved on: neither a write nor a delete at the old index goes through
    assert "cas_mismatch" in fails(konsul(shared_edge, "kv", "put", key, "third", "--cas", index))
    assert "cas_mismatch" in fails(konsul(shared_edge, "kv", "delete", key, "--cas", index))
    assert konsul(shared_edge, "kv", "get", key, "--raw").stdout == b"second"

    # cas on a key that does not exist is the server's error, shown as error: detail
    error = fails(konsul(shared_edge, "kv", "put", prefix + "absent", "v", "--cas", "5"))
    assert error.startswith("konsul: cas_missing_key: ")


def test_ttl_is_accepted_and_validated(shared_edge, prefix):
    ok(konsul(shared_edge, "kv", "put", prefix + "lease", "held", "--ttl", "30s"))
    assert konsul(shared_edge, "kv", "get", prefix + "lease", "--raw").stdout == b"held"

    error = fails(konsul(shared_edge, "kv", "put", prefix + "lease", "x", "--ttl", "soon"))
    assert error.startswith("konsul: invalid_argument: ")
    assert "not a duration" in error
    assert konsul(shared_edge, "kv", "get", prefix + "lease", "--raw").stdout == b"held"


def test_errors(shared_edge, prefix):
    # a missing key
    error = fails(konsul(shared_edge, "kv", "get", prefix + "nothing"))
    assert f"konsul: key '{prefix}nothing' does not exist" in error
    assert fails(konsul(shared_edge, "kv", "get", prefix + "nothing", "--raw"))

    # a server error in the contract's form
    error = fails(konsul(shared_edge, "kv", "get", prefix + "x", "--dc", "elsewhere"))
    assert error.startswith("konsul: not_found: datacenter 'elsewhere'")

    # usage errors exit 2
    assert "required" in fails(konsul(shared_edge, "kv", "put", prefix + "x"), code=2)
    assert "invalid int" in fails(konsul(shared_edge, "kv", "put", prefix + "x", "v", "--cas", "abc"), code=2)
    assert "--format" in fails(konsul(shared_edge, "kv", "get", "x", env={"KONSUL_FORMAT": "yaml"}), code=2)
    fails(konsul(shared_edge, "kv"), code=2)


def test_connection_refused_names_the_address():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # closed now: nothing listens there
    for addr in (f"127.0.0.1:{port}", f"http://127.0.0.1:{port}"):
        error = fails(konsul(None, "kv", "get", "x", "--http-addr", addr))
        assert f"cannot connect to the agent at http://127.0.0.1:{port}" in error
        assert "connection refused" in error
    error = fails(konsul(None, "kv", "list", env={"KONSUL_HTTP_ADDR": f"127.0.0.1:{port}"}))
    assert f"http://127.0.0.1:{port}" in error


def test_http_addr_flag_accepts_urls(shared_edge, prefix):
    ok(konsul(None, "kv", "put", prefix + "u", "1", "--http-addr", shared_edge.url))
    ok(konsul(None, "kv", "put", prefix + "u", "2", "--http-addr", shared_edge.url + "/"))
    assert konsul(None, "kv", "get", prefix + "u", "--raw", "--http-addr", shared_edge.addr).stdout == b"2"


def test_client_commands_import_httpx_lazily():
    code = "import sys, konsul.cli.main; print('httpx' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
    assert "KONSUL_HTTP_ADDR" in ok(konsul(None, "kv", "watch", "--help"))


# -- kv watch ---------------------------------------------------------------------------


def test_watch_prints_each_change_once_and_exits_0_on_sigint(shared_edge, prefix):
    key = prefix + "watched"
    ok(konsul(shared_edge, "kv", "put", key, "v1"))
    process = watch(shared_edge, key)
    try:
        process.wait_for(r"^v1$")
        # another key changes: the server wakes the watch, which must print nothing
        ok(konsul(shared_edge, "kv", "put", prefix + "unrelated", "x"))
        ok(konsul(shared_edge, "kv", "put", key, "v2"))
        process.wait_for(r"^v2$")
        ok(konsul(shared_edge, "kv", "put", prefix + "unrelated", "y"))
        ok(konsul(shared_edge, "kv", "delete", key))
        process.wait_for(rf"konsul: key '{key}' was deleted")
        ok(konsul(shared_edge, "kv", "put", key, "v3"))
        process.wait_for(r"^v3$")
    finally:
        code = process.stop(signal.SIGINT)
    assert code == 0, process.output
    assert watched_lines(process) == ["v1", "v2", "v3"]
    assert "Traceback" not in process.output


def test_watch_waits_for_a_missing_key_and_exits_0_on_sigterm(shared_edge, prefix):
    key = prefix + "later"
    process = watch(shared_edge, key)
    try:
        process.wait_for(rf"key '{key}' does not exist yet")
        ok(konsul(shared_edge, "kv", "put", key, "here"))
        process.wait_for(r"^here$")
    finally:
        code = process.stop(signal.SIGTERM)
    assert code == 0, process.output
    assert watched_lines(process) == ["here"]


def test_watch_prefix_prints_a_line_per_changed_key(shared_edge, prefix):
    ok(konsul(shared_edge, "kv", "put", prefix + "a", "1"))
    ok(konsul(shared_edge, "kv", "put", prefix + "b", "2"))
    process = watch(shared_edge, prefix, "--recurse")
    try:
        process.wait_for(rf"^{prefix}b\s+2$")
        ok(konsul(shared_edge, "kv", "put", "elsewhere/" + prefix, "x"))
        ok(konsul(shared_edge, "kv", "put", prefix + "a", "10"))
        process.wait_for(rf"^{prefix}a\s+10$")
        ok(konsul(shared_edge, "kv", "delete", prefix + "b"))
        process.wait_for(rf"^{prefix}b\s+\(deleted\)$")
    finally:
        code = process.stop(signal.SIGINT)
    assert code == 0, process.output
    assert [line.split() for line in watched_lines(process)] == [
        [prefix + "a", "1"],
        [prefix + "b", "2"],
        [prefix + "a", "10"],
        [prefix + "b", "(deleted)"],
    ]


def test_watch_json_prints_the_api_json_per_change(shared_edge, prefix):
    key = prefix + "j"
    process = watch(shared_edge, key, "--format", "json")
    try:
        process.wait_for(r"^null$")
        ok(konsul(shared_edge, "kv", "put", key, "hello"))
        process.wait_for(r"ModifyIndex")
    finally:
        code = process.stop(signal.SIGINT)
    assert code == 0, process.output
    first, second = [json.loads(line) for line in watched_lines(process)]
    assert first is None
    assert [base64.b64decode(e["Value"]) for e in second] == [b"hello"]


def test_watch_of_an_unreachable_agent_fails():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error = fails(konsul(None, "kv", "watch", "x", "--http-addr", f"127.0.0.1:{port}"))
    assert f"cannot connect to the agent at http://127.0.0.1:{port}" in error


# -- services -------------------------------------------------------------------------


def test_services_register_list_deregister(edge):
    result = konsul(edge, "services", "list")
    assert ok(result) == ""
    assert "no services" in result.stderr.decode()

    assert ok(
        konsul(
            edge, "services", "register", "--name", "web", "--id", "web-1", "--address", "10.0.0.5",
            "--port", "8080", "--tag", "v1", "--tag", "blue", "--meta", "version=1.2", "--ttl", "30s",
            "--deregister-after", "5m",
        )
    ).strip() == "Registered service: web-1"
    ok(konsul(edge, "services", "register", "--name", "db", "--port", "5432"))

    listed = ok(konsul(edge, "services", "list")).splitlines()
    assert listed[0].split() == ["ID", "NAME", "ADDRESS", "PORT", "HEALTH", "TAGS", "META"]
    assert [line.split() for line in listed[1:]] == [
        ["db", "db", "-", "5432", "-", "-", "-"],
        ["web-1", "web", "10.0.0.5", "8080", "critical", "v1,blue", "version=1.2"],
    ]

    services = json.loads(ok(konsul(edge, "services", "list", "--format", "json")))
    assert set(services) == {"web-1", "db"}
    assert services["web-1"]["Service"] == "web"
    assert services["web-1"]["Tags"] == ["v1", "blue"]
    assert services["web-1"]["Meta"] == {"version": "1.2"}

    assert ok(konsul(edge, "services", "deregister", "web-1")).strip() == "Deregistered service: web-1"
    assert set(json.loads(ok(konsul(edge, "services", "list", "--format", "json")))) == {"db"}

    error = fails(konsul(edge, "services", "deregister", "web-1"))
    assert error.startswith("konsul: not_found: ")


def test_services_register_checks_and_files(edge, tmp_path):
    ok(konsul(edge, "services", "register", "--name", "api", "--http", "http://127.0.0.1:1/health", "--interval", "10s", "--timeout", "2s"))
    ok(konsul(edge, "services", "register", "--name", "cache", "--tcp", "127.0.0.1:1", "--interval", "5s"))

    definition = tmp_path / "service.json"
    definition.write_text(
        json.dumps(
            {
                "service": {
                    "name": "queue",
                    "id": "queue-1",
                    "port": 5672,
                    "tags": ["primary"],
                    "meta": {"some_key": "x"},
                    "check": {"ttl": "30s", "deregister_critical_service_after": "10m"},
                }
            }
        )
    )
    assert ok(konsul(edge, "services", "register", "--file", str(definition))).strip() == "Registered service: queue-1"
    consul_style = {"ID": "queue-2", "Name": "queue", "Check": {"TTL": "30s"}}
    sent = json.loads(
        ok(konsul(edge, "services", "register", "--file", "-", "--format", "json", input=json.dumps(consul_style).encode()))
    )
    assert sent == consul_style

    services = json.loads(ok(konsul(edge, "services", "list", "--format", "json")))
    assert set(services) == {"api", "cache", "queue-1", "queue-2"}
    assert services["queue-1"]["Meta"] == {"some_key": "x"}  # meta keys are not renamed
    assert services["queue-1"]["Port"] == 5672

    # the agent judges what the client passes through
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"Name": "x", "Check": {"Script": "/bin/true"}}))
    assert fails(konsul(edge, "services", "register", "--file", str(bad))).startswith("konsul: invalid_argument: ")
    assert "invalid_argument" in fails(konsul(edge, "services", "register", "--name", "x", "--ttl", "often"))
    notjson = tmp_path / "notjson.json"
    notjson.write_text("{")
    assert "not valid JSON" in fails(konsul(edge, "services", "register", "--file", str(notjson)))


def test_services_register_usage_errors(edge):
    assert "--name" in fails(konsul(edge, "services", "register"), code=2)
    assert "KEY=VALUE" in fails(konsul(edge, "services", "register", "--name", "x", "--meta", "novalue"), code=2)
    assert "not allowed" in fails(konsul(edge, "services", "register", "--name", "x", "--ttl", "5s", "--tcp", "h:1"), code=2)
    assert "needs a check" in fails(konsul(edge, "services", "register", "--name", "x", "--interval", "5s"), code=2)
    assert "--file" in fails(konsul(edge, "services", "register", "--file", "x.json", "--name", "x"), code=2)
    fails(konsul(edge, "services"), code=2)
    assert json.loads(ok(konsul(edge, "services", "list", "--format", "json"))) == {}
