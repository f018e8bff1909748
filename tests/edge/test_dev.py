"""`konsul dev`: a hub, an edge and simulated devices with ACLs on, and a printed token that works."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx

from agents import AgentProcess, eventually


def start_dev(data_dir) -> AgentProcess:
    dev = AgentProcess([
        "dev", "--data-dir", str(data_dir), "--sim-devices", "2", "--edge-addr", "127.0.0.1:0",
        "--hub-addr", "127.0.0.1:0", "--mqtt-addr", "127.0.0.1:0", "--coap-addr", "127.0.0.1:0",
    ], env={"KONSUL_HTTP_TOKEN": "", "CONSUL_HTTP_TOKEN": ""})
    dev.wait_for("Stop with Ctrl-C", timeout=60)
    return dev


def test_dev_runs_with_acls_and_its_printed_token_and_examples_work(tmp_path):
    dev = start_dev(tmp_path / "dev")
    try:
        token = dev.wait_for(r"ACL management token\s+(\S+)").group(1)
        edge = dev.wait_for(r'edge \(site "dev"\)\s+(http://\S+)').group(1)
        hub = dev.wait_for(r"hub\s+(http://\S+)").group(1)
        assert f"export KONSUL_HTTP_TOKEN={token}" in dev.output
        auth = {"X-Consul-Token": token}
        assert httpx.put(f"{edge}/v1/kv/greeting", content=b"hello").status_code == 403
        assert httpx.put(f"{edge}/v1/kv/greeting", content=b"hello", headers=auth).json() is True
        eventually(lambda: httpx.get(f"{hub}/v1/kv/greeting?dc=dev&raw", headers=auth).content == b"hello",
                   what="the write synced to the hub with the printed token")
        # The printed CLI examples, with the exported token.
        cli = subprocess.run(
            [sys.executable, "-m", "konsul.edge.cli", "kv", "get", "greeting"],
            env={**os.environ, "KONSUL_HTTP_ADDR": edge.split("://", 1)[1], "KONSUL_HTTP_TOKEN": token},
            capture_output=True, text=True, timeout=30,
        )
        assert cli.returncode == 0 and "hello" in cli.stdout, cli.stderr
        # The simulated devices came up (anonymous devices are allowed in dev).
        eventually(lambda: len(httpx.get(f"{edge}/v1/devices", headers=auth).json()) >= 2, what="simulated devices")
    finally:
        assert dev.stop() == 0
    stored = tmp_path / "dev" / "management-token"
    assert stored.read_text().strip() == token and stored.stat().st_mode & 0o777 == 0o600
    again = start_dev(tmp_path / "dev")
    try:
        assert re.search(rf"ACL management token\s+{token}", again.output)  # kept across restarts
    finally:
        again.stop()
