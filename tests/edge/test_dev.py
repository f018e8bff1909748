"""`konsul dev`: a hub, an edge and simulated devices with ACLs on and HTTPS with a CA of its own,
and printed examples (token, CA, curl and CLI commands) that work as printed."""

from __future__ import annotations

import os
import re
import ssl
import subprocess
import sys

import httpx

from agents import AgentProcess, eventually


def start_dev(data_dir) -> AgentProcess:
    dev = AgentProcess([
        "dev", "--data-dir", str(data_dir), "--sim-devices", "2", "--edge-addr", "127.0.0.1:0",
        "--hub-addr", "127.0.0.1:0", "--mqtt-addr", "127.0.0.1:0", "--coap-addr", "127.0.0.1:0",
        "--mqtts-addr", "127.0.0.1:0",
    ], env={"KONSUL_HTTP_TOKEN": "", "CONSUL_HTTP_TOKEN": "", "KONSUL_CACERT": "", "CONSUL_CACERT": ""})
    dev.wait_for("Stop with Ctrl-C", timeout=60)
    return dev


def printed(dev: AgentProcess, pattern: str) -> str:
    """The one printed example line matching ``pattern``, as a user would copy it."""
    lines = [line.strip() for line in dev.lines if re.search(pattern, line)]
    assert len(lines) == 1, (pattern, lines)
    return lines[0]


def run_printed(dev: AgentProcess, command: str) -> subprocess.CompletedProcess:
    """``command`` in a shell after the printed ``export`` lines, ``konsul`` being this checkout's CLI."""
    exports = [line.strip() for line in dev.lines if line.strip().startswith("export ")]
    konsul = f"{sys.executable} -m konsul.cli"
    script = "\n".join([*exports, f"konsul() {{ {konsul} \"$@\"; }}", command])
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "KONSUL_HTTP_TOKEN": "", "CONSUL_HTTP_TOKEN": ""})


def test_dev_runs_with_acls_over_https_and_its_printed_examples_work(tmp_path):
    dev = start_dev(tmp_path / "dev")
    ca = (tmp_path / "dev" / "tls" / "ca.pem").resolve()
    try:
        token = dev.wait_for(r"ACL management token\s+(\S+)").group(1)
        edge = dev.wait_for(r'edge \(site "dev"\)\s+(https://\S+)').group(1)
        hub = dev.wait_for(r"hub\s+(https://\S+)").group(1)
        assert dev.wait_for(r"CA of the dev agents\s+(\S+)").group(1) == str(ca)
        assert f"export KONSUL_HTTP_TOKEN={token}" in dev.output
        # The edge and the hub serve HTTPS with a certificate the dev CA signed, and nothing else.
        trusted = ssl.create_default_context(cafile=str(ca))
        auth = {"X-Consul-Token": token}
        assert httpx.put(f"{edge}/v1/kv/greeting", content=b"hello", verify=trusted).status_code == 403
        untrusted = subprocess.run(["curl", "-sS", f"{edge}/v1/kv/greeting"], capture_output=True, text=True)
        assert untrusted.returncode == 60, untrusted  # curl: peer certificate cannot be authenticated
        plain = httpx.get(f"http://{edge.split('://', 1)[1]}/v1/kv/greeting")
        assert plain.status_code == 400 and plain.json()["error"] == "tls_required"

        # The printed examples, copied as they are: curl with --cacert, then the CLI.
        put = run_printed(dev, printed(dev, r"curl .*-X PUT .*--data 'hello' \S+/v1/kv/greeting$"))
        assert put.returncode == 0 and put.stdout == "true", put
        get = run_printed(dev, printed(dev, r"curl .*X-Consul-Token.* \S+/v1/kv/greeting\?raw$"))
        assert get.returncode == 0 and get.stdout == "hello", get
        refused = run_printed(dev, printed(dev, r"# no token: 403"))
        assert "permission_denied" in refused.stdout, refused
        synced = printed(dev, r"greeting\?dc=dev&raw.*# synced to the hub")
        eventually(lambda: run_printed(dev, synced).stdout == "hello", what="the write synced to the hub over wss")
        assert run_printed(dev, printed(dev, r"--data 'eco' .*fleet/mode\?dc=global")).stdout == "true"
        from_edge = printed(dev, r"^\s*konsul kv get fleet/mode --dc global$")

        def edge_has_it():
            done = run_printed(dev, from_edge)
            return done.returncode == 0 and "eco" in done.stdout

        eventually(edge_has_it, what="the hub's global key through the edge with the printed CLI example")
        # The simulated devices came up (anonymous devices are allowed in dev).
        eventually(lambda: len(httpx.get(f"{edge}/v1/devices", headers=auth, verify=trusted).json()) >= 2,
                   what="simulated devices")
        assert httpx.get(f"{hub}/v1/kv/greeting?dc=dev&raw", headers=auth, verify=trusted).content == b"hello"
    finally:
        assert dev.stop() == 0
    stored = tmp_path / "dev" / "management-token"
    assert stored.read_text().strip() == token and stored.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "dev" / "tls").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "dev" / "tls" / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    ca_before = ca.read_bytes()
    again = start_dev(tmp_path / "dev")
    try:
        assert re.search(rf"ACL management token\s+{token}", again.output)  # kept across restarts
        # So is the CA: a client that trusts it once keeps trusting the dev agents.
        assert ca.read_bytes() == ca_before
        edge = again.wait_for(r'edge \(site "dev"\)\s+(https://\S+)').group(1)
        trusted = ssl.create_default_context(cafile=str(ca))
        answer = httpx.get(f"{edge}/v1/kv/greeting?raw", headers={"X-Consul-Token": token}, verify=trusted)
        assert answer.content == b"hello"
    finally:
        again.stop()
