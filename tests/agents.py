"""Run real `konsul` agent processes for tests, and wait for them properly."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

_LISTENING = re.compile(r"http listening on (https?://\S+)")

# The management secret agents started with ``acl=True`` are given
# (--acl-initial-management); tests send it as X-Consul-Token.
MANAGEMENT_TOKEN = "5e1f2a3b-0c4d-4e5f-8a6b-7c8d9e0f1a2b"


def acl_args(acl: bool, extra: list[str]) -> list[str]:
    """``--acl off`` for tests about something else; the management token for ACL tests."""
    if any(arg == "--acl" or arg.startswith("--acl=") for arg in extra):
        return []
    if not acl:
        return ["--acl", "off"]
    return ["--acl-initial-management", MANAGEMENT_TOKEN]


class AgentProcess:
    """A `konsul ...` child process whose stderr is collected and searchable."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, command: list[str] | None = None) -> None:
        """``command`` runs another program (mosquitto, mosquitto_sub, ...) instead of `konsul`."""
        self.args = args
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            [*(command or [sys.executable, "-m", "konsul.cli"]), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 20.0) -> re.Match[str]:
        """The first output line matching ``pattern``; fails if the process exits first."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    found = regex.search(line)
                    if found:
                        return found
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"agent exited ({self.proc.returncode}):\n{self.output}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {regex.pattern!r}:\n{self.output}")
                self._changed.wait(min(left, 0.5))

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(5)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free right now on 127.0.0.1 (for an agent that must come back on it); UDP with SOCK_DGRAM."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_udp_port() -> int:
    return free_port(socket.SOCK_DGRAM)


class _Listening(AgentProcess):
    def _ready(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.url = self.wait_for(_LISTENING).group(1)
        self.addr = self.url.split("://", 1)[1]
        self.host, port = self.addr.rsplit(":", 1)
        self.port = int(port)


class EdgeProcess(_Listening):
    """`konsul edge` on free ports; ``url`` is its HTTP API."""

    def __init__(
        self,
        data_dir: Path,
        site: str = "s1",
        node: str = "n1",
        extra: list[str] | None = None,
        hub_url: str = "",
        *,
        acl: bool = False,
        coap_uri_tokens: bool = True,
    ) -> None:
        """``acl``: run with ACLs on (``token`` is then a management secret); off by default
        for tests about something else. ``coap_uri_tokens``: admit CoAP ``tk=`` tokens
        (``--coap-uri-tokens on``), which tests written before OSCORE use; the agent's
        own default is off (tests/interop/test_coap_oscore.py)."""
        self.token = MANAGEMENT_TOKEN if acl else None
        super().__init__(
            [
                "edge",
                "--site", site,
                "--node", node,
                "--data-dir", str(data_dir),
                "--http-addr", "127.0.0.1:0",
                "--mqtt-addr", "",
                "--coap-addr", "",
                "--hub-url", hub_url,
                *acl_args(acl, extra or []),
                *([] if not coap_uri_tokens or "--coap-uri-tokens" in (extra or []) else ["--coap-uri-tokens", "on"]),
                *(extra or []),
            ]
        )
        self._ready(data_dir)

    def mqtt_addr(self) -> tuple[str, int]:
        """Where the edge serves MQTT (start it with ``extra=["--mqtt-addr", "127.0.0.1:0"]``)."""
        host, port = self.wait_for(r"mqtt listening on (\S+)").group(1).rsplit(":", 1)
        return host.strip("[]"), int(port)

    def mqtts_addr(self) -> tuple[str, int]:
        """Where the edge serves MQTT over TLS (start it with ``--tls-cert``, ``--tls-key`` and
        ``extra=["--mqtts-addr", "127.0.0.1:0"]``)."""
        host, port = self.wait_for(r"mqtts listening on (\S+)").group(1).rsplit(":", 1)
        return host.strip("[]"), int(port)

    def coap_addr(self) -> tuple[str, int]:
        """Where the edge serves CoAP (start it with ``extra=["--coap-addr", "127.0.0.1:0"]``)."""
        host, port = self.wait_for(r"coap listening on (\S+)").group(1).rsplit(":", 1)
        return host.strip("[]"), int(port)


class HubProcess(_Listening):
    """`konsul hub`; give ``port`` to bring a hub back where its edges expect it."""

    def __init__(self, data_dir: Path, port: int = 0, extra: list[str] | None = None, *, acl: bool = False) -> None:
        self.token = MANAGEMENT_TOKEN if acl else None
        super().__init__([
            "hub", "--data-dir", str(data_dir), "--http-addr", f"127.0.0.1:{port}",
            *acl_args(acl, extra or []), *(extra or []),
        ])
        self._ready(data_dir)


def join_token(hub: HubProcess, site: str, global_access: str = "read", verify=True) -> str:
    """A join token for ``site`` from a hub run with ``acl=True`` (``konsul sites add``).

    ``verify``: for a hub on HTTPS, its CA file or a client SSL context.
    """
    import httpx

    response = httpx.put(
        f"{hub.url}/v1/sites/{site}", json={"Global": global_access},
        headers={"X-Consul-Token": MANAGEMENT_TOKEN}, timeout=10, verify=verify,
    )
    response.raise_for_status()
    return response.json()["JoinToken"]


def eventually(condition, timeout: float = 30.0, what: str = "condition"):
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds.

    Exceptions count as "not yet" (an agent that is restarting refuses
    connections), and the last one is shown if the deadline passes.
    """
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = condition()
        except Exception as error:  # noqa: BLE001 - reported on timeout
            last = error
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.05)  # polling interval, not a synchronisation
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")
