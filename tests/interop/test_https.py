"""HTTPS on the edge and hub API and on the sync link, with real agents and real clients.

Certificates come from ``trustme`` CAs made per test in temp dirs. Agents run
with ``--acl off`` (these tests are about the transport, not tokens) and
``--mqtts-addr off`` (no MQTT over TLS listener on 8883 next to other tests).
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import consul
import httpx
import pytest
import trustme

from agents import EdgeProcess, HubProcess, eventually

NO_MQTTS = ["--mqtts-addr", "off"]


@dataclass
class Pki:
    """A CA, its PEM in ``ca``, and a server certificate for 127.0.0.1/localhost in ``cert``/``key``."""

    authority: trustme.CA
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def make(cls, directory: Path) -> Pki:
        directory.mkdir(parents=True, exist_ok=True)
        authority = trustme.CA()
        pki = cls(authority, directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
        authority.cert_pem.write_to_path(str(pki.ca))
        pki.issue_server(pki.cert, pki.key)
        return pki

    def issue_server(self, cert: Path, key: Path) -> None:
        issued = self.authority.issue_cert("127.0.0.1", "localhost")
        cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
        key.write_bytes(issued.private_key_pem.bytes())

    def issue_client(self, directory: Path, name: str) -> tuple[Path, Path]:
        """A client certificate (CN ``name``) and its key, for mutual TLS."""
        issued = self.authority.issue_cert(f"{name}.clients.test", common_name=name)
        cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
        cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
        key.write_bytes(issued.private_key_pem.bytes())
        return cert, key

    def tls_flags(self) -> list[str]:
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key)]

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


@pytest.fixture
def pki(tmp_path) -> Pki:
    return Pki.make(tmp_path / "pki")


@pytest.fixture
def other_pki(tmp_path) -> Pki:
    """A second, unrelated CA: what an agent that is not ours, or a client that does not trust ours, has."""
    return Pki.make(tmp_path / "other-pki")


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True, timeout=20)


def konsul(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The `konsul` CLI, with no TLS settings from this environment but ``env``'s."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KONSUL_", "CONSUL_"))}
    return subprocess.run([sys.executable, "-m", "konsul.cli", *args], capture_output=True, text=True,
                          timeout=30, env={**clean, **(env or {})})


def metric(url: str, ca: Path | ssl.SSLContext, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``, from /metrics over HTTPS.

    ``ca``: the CA file that signed the agent's certificate, or a client context to use.
    """
    context = ca if isinstance(ca, ssl.SSLContext) else ssl.create_default_context(cafile=str(ca))
    text = httpx.get(f"{url}/metrics", verify=context).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def served_certificate(port: int, ca: Path) -> bytes:
    """The DER certificate the agent on ``port`` serves now, verified against ``ca`` (fails otherwise)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ssl.create_default_context(cafile=str(ca)).wrap_socket(raw, server_hostname="127.0.0.1") as secured:
            return secured.getpeercert(binary_form=True)


def test_curl_with_the_ca_writes_and_reads_kv_at_the_edge_and_the_hub(tmp_path, pki):
    edge = EdgeProcess(tmp_path / "edge", extra=[*pki.tls_flags(), *NO_MQTTS])
    hub = HubProcess(tmp_path / "hub", extra=pki.tls_flags())
    try:
        assert edge.url.startswith("https://") and hub.url.startswith("https://")
        ca = str(pki.ca)
        put = curl("--cacert", ca, "-X", "PUT", "-d", "v", f"{edge.url}/v1/kv/x")
        assert put.returncode == 0 and put.stdout == "true", put
        got = curl("--cacert", ca, f"{edge.url}/v1/kv/x?raw")
        assert got.returncode == 0 and got.stdout == "v", got
        put = curl("--cacert", ca, "-X", "PUT", "-d", "fleet", f"{hub.url}/v1/kv/x?dc=global")
        assert put.returncode == 0 and put.stdout == "true", put
        got = curl("--cacert", ca, f"{hub.url}/v1/kv/x?dc=global&raw")
        assert got.returncode == 0 and got.stdout == "fleet", got
    finally:
        edge.stop()
        hub.stop()


def test_untrusted_and_plaintext_clients_are_refused_and_the_agent_serves_on(tmp_path, pki, other_pki):
    edge = EdgeProcess(tmp_path / "edge", extra=[*pki.tls_flags(), *NO_MQTTS])
    try:
        # A client that trusts neither the system's CAs' nor another CA's word for this certificate refuses it.
        for untrusted in (curl(f"{edge.url}/v1/kv/x"), curl("--cacert", str(other_pki.ca), f"{edge.url}/v1/kv/x")):
            assert untrusted.returncode == 60 and "certificate" in untrusted.stderr, untrusted
        eventually(lambda: metric(edge.url, pki.ca, "konsul_tls_handshake_failures_total", interface="http") >= 2,
                   what="the aborted handshakes counted")
        # Plain HTTP to the TLS port: a plain 400 the client can read, and nothing written.
        plain_url = edge.url.replace("https://", "http://")
        plain = httpx.put(f"{plain_url}/v1/kv/x", content=b"sneaky")
        assert plain.status_code == 400 and plain.json()["error"] == "tls_required", plain.text
        assert "https://" in plain.json()["detail"]
        assert metric(edge.url, pki.ca, "konsul_tls_handshake_failures_total", interface="http", reason="not_tls") == 1
        assert httpx.get(f"{edge.url}/v1/kv/x", verify=pki.context()).status_code == 404
        assert "TLS handshake with 127.0.0.1 failed" in edge.output
        # The agent serves on.
        assert curl("--cacert", str(pki.ca), "-X", "PUT", "-d", "v", f"{edge.url}/v1/kv/x").stdout == "true"
        assert edge.proc.poll() is None
    finally:
        edge.stop()


def test_half_open_and_garbage_handshakes_end_only_their_own_connection(tmp_path, pki):
    edge = EdgeProcess(tmp_path / "edge", extra=[*pki.tls_flags(), *NO_MQTTS])
    try:
        failures = "konsul_tls_handshake_failures_total"
        before = metric(edge.url, pki.ca, failures, interface="http")
        # Clients that connect and send nothing, held open: the others are served meanwhile.
        idle = [socket.create_connection(("127.0.0.1", edge.port)) for _ in range(3)]
        try:
            put = curl("--cacert", str(pki.ca), "-X", "PUT", "-d", "v", f"{edge.url}/v1/kv/x")
            assert put.returncode == 0 and put.stdout == "true", put
            assert httpx.get(f"{edge.url}/v1/kv/x?raw", verify=pki.context()).content == b"v"
            # Garbage that looks like the start of a TLS record: that connection ends, and is counted.
            with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as garbage:
                garbage.sendall(b"\x16\x03\x01\x00\x40" + bytes(range(0x40)))
                while garbage.recv(4096):  # the agent's alert, if any, then its close
                    pass
            eventually(lambda: metric(edge.url, pki.ca, failures, interface="http") >= before + 1,
                       what="the garbage handshake counted")
            assert metric(edge.url, pki.ca, failures, interface="http", reason="timeout") == 0
        finally:
            for connection in idle:
                connection.close()
        assert httpx.get(f"{edge.url}/v1/kv/x?raw", verify=pki.context()).content == b"v"
    finally:
        edge.stop()


def test_client_certificates_are_required_with_tls_verify_client(tmp_path, pki, other_pki):
    clients = Pki.make(tmp_path / "clients")  # the CA that signs the clients' certificates
    cert, key = clients.issue_client(tmp_path / "clients", "ops-1")
    stranger_cert, stranger_key = other_pki.issue_client(tmp_path / "other-pki", "stranger")
    edge = EdgeProcess(tmp_path / "edge", extra=[
        *pki.tls_flags(), "--tls-ca", str(clients.ca), "--tls-verify-client", "on", *NO_MQTTS,
    ])
    try:
        ca = str(pki.ca)
        # Refused, and told why: the agent's TLS alert reaches the client.
        without = curl("--cacert", ca, "-X", "PUT", "-d", "v", f"{edge.url}/v1/kv/x")
        assert without.returncode != 0 and "alert certificate required" in without.stderr, without
        stranger = curl("--cacert", ca, "--cert", str(stranger_cert), "--key", str(stranger_key), f"{edge.url}/v1/kv/x")
        assert stranger.returncode != 0 and "alert unknown ca" in stranger.stderr, stranger
        cli = konsul("kv", "get", "x", "--http-addr", edge.url, "--ca-file", ca)
        assert cli.returncode == 1 and "requires a client certificate" in cli.stderr and "--client-cert" in cli.stderr
        cli = konsul("kv", "get", "x", "--http-addr", edge.url, "--ca-file", ca, "--client-cert", str(stranger_cert),
                     "--client-key", str(stranger_key))
        assert cli.returncode == 1 and "refused the client certificate" in cli.stderr, cli.stderr
        allowed = curl("--cacert", ca, "--cert", str(cert), "--key", str(key), "-X", "PUT", "-d", "v",
                       f"{edge.url}/v1/kv/x")
        assert allowed.returncode == 0 and allowed.stdout == "true", allowed
        cli = konsul("kv", "get", "x", "--http-addr", edge.url, env={
            "CONSUL_CACERT": ca, "CONSUL_CLIENT_CERT": str(cert), "CONSUL_CLIENT_KEY": str(key),
        })
        assert cli.returncode == 0 and ["Value", "v"] in [line.split() for line in cli.stdout.splitlines()], cli
        mutual = ssl.create_default_context(cafile=ca)
        mutual.load_cert_chain(str(cert), str(key))
        assert httpx.get(f"{edge.url}/v1/kv/x?raw", verify=mutual).content == b"v"
        refused = httpx.get(f"{edge.url}/metrics", verify=mutual).text
        assert 'konsul_tls_handshake_failures_total{interface="http",reason="client_certificate"} 4.0' in refused
        # The refused clients wrote nothing: x is what the allowed one wrote.
        assert httpx.get(f"{edge.url}/v1/kv/x?raw", verify=mutual).content == b"v"
    finally:
        edge.stop()


def test_sighup_serves_the_new_certificate_keeps_open_connections_and_survives_a_broken_file(tmp_path, pki):
    edge = EdgeProcess(tmp_path / "edge", extra=[*pki.tls_flags(), *NO_MQTTS])
    try:
        old = served_certificate(edge.port, pki.ca)
        # A keep-alive connection made with the old certificate.
        kept = http.client.HTTPSConnection("127.0.0.1", edge.port, context=pki.context(), timeout=10)
        kept.request("PUT", "/v1/kv/x", body=b"before")
        assert kept.getresponse().read() == b"true"
        kept_socket = kept.sock

        # Rotation: new files from a new CA in place of the old ones, then SIGHUP.
        rotated = Pki.make(tmp_path / "rotated")
        rotated.issue_server(pki.cert, pki.key)
        edge.proc.send_signal(signal.SIGHUP)
        new = eventually(lambda: served_certificate(edge.port, rotated.ca), what="the new certificate served")
        assert new != old
        with pytest.raises(ssl.SSLCertVerificationError):
            served_certificate(edge.port, pki.ca)  # nobody gets the old one any more
        assert metric(edge.url, rotated.ca, "konsul_tls_reloads_total", result="ok") == 1

        # The connection opened before the reload was not dropped and still has the old certificate.
        kept.request("GET", "/v1/kv/x?raw")
        assert kept.getresponse().read() == b"before"
        assert kept.sock is kept_socket and kept.sock.getpeercert(binary_form=True) == old
        kept.close()

        # A broken file on reload: the certificate in use stays, the failure is logged and counted.
        pki.cert.write_text("not a certificate\n")
        edge.proc.send_signal(signal.SIGHUP)
        eventually(lambda: metric(edge.url, rotated.ca, "konsul_tls_reloads_total", result="failed") == 1,
                   what="the failed reload counted")
        edge.wait_for(r"SIGHUP: kept the certificate in use: --tls-cert .*cannot load them")
        assert served_certificate(edge.port, rotated.ca) == new
        assert httpx.get(f"{edge.url}/v1/kv/x?raw", verify=rotated.context()).content == b"before"
        assert edge.proc.poll() is None
    finally:
        edge.stop()


def sync_peer(edge: EdgeProcess) -> dict:
    return httpx.get(f"{edge.url}/v1/sync/status").json()["Peers"][0]


def test_edge_syncs_with_a_hub_over_https_pinned_to_its_ca(tmp_path, pki, other_pki):
    hub = HubProcess(tmp_path / "hub", extra=pki.tls_flags())
    pinned = EdgeProcess(tmp_path / "pinned", site="s1", hub_url=hub.url, extra=["--hub-ca", str(pki.ca)])
    # Pinned to a CA that did not sign the hub's certificate: the link must not come up.
    misled = EdgeProcess(tmp_path / "misled", site="s2", hub_url=hub.url, extra=["--hub-ca", str(other_pki.ca)])
    try:
        assert hub.url.startswith("https://") and sync_peer(pinned)["Peer"] == hub.url
        httpx.put(f"{pinned.url}/v1/kv/line/speed", content=b"42").raise_for_status()
        eventually(lambda: httpx.get(f"{hub.url}/v1/kv/line/speed?dc=s1&raw", verify=pki.context()).content == b"42",
                   what="the edge's write at the hub, over wss")
        assert sync_peer(pinned)["Connected"] and sync_peer(pinned)["LastError"] is None

        httpx.put(f"{misled.url}/v1/kv/secret", content=b"stays here").raise_for_status()
        error = eventually(lambda: sync_peer(misled)["LastError"], what="the refused hub certificate reported")
        assert "the hub's certificate was refused" in error and "--hub-ca" in error, error
        assert not sync_peer(misled)["Connected"] and sync_peer(misled)["Connects"] == 0
        assert sync_peer(misled)["PendingChanges"] >= 1
        # Nothing crossed: the hub knows no site s2 and has none of its keys.
        sites = {site["Site"] for site in httpx.get(f"{hub.url}/v1/sites", verify=pki.context()).json()}
        assert sites == {"s1"}
        assert httpx.get(f"{hub.url}/v1/kv/secret?dc=s2&raw", verify=pki.context()).status_code == 404
        # The hub counted the handshakes the edge walked out of.
        eventually(lambda: metric(hub.url, pki.ca, "konsul_tls_handshake_failures_total", interface="http") >= 1,
                   what="the hub counts the refused handshakes")
    finally:
        for agent in (pinned, misled, hub):
            agent.stop()


def test_a_hub_requiring_client_certificates_syncs_only_with_sites_that_present_one(tmp_path, pki, other_pki):
    sites = Pki.make(tmp_path / "sites")  # the CA that signs the sites' certificates
    cert, key = sites.issue_client(tmp_path / "sites", "plant-1")
    stranger_cert, stranger_key = other_pki.issue_client(tmp_path / "other-pki", "plant-2")
    hub = HubProcess(tmp_path / "hub", extra=[
        *pki.tls_flags(), "--tls-ca", str(sites.ca), "--tls-verify-client", "on",
    ])
    pinned = ["--hub-ca", str(pki.ca)]
    member = EdgeProcess(tmp_path / "member", site="plant-1", hub_url=hub.url,
                         extra=[*pinned, "--site-cert", str(cert), "--site-key", str(key)])
    anonymous = EdgeProcess(tmp_path / "anonymous", site="plant-2", hub_url=hub.url, extra=pinned)
    stranger = EdgeProcess(tmp_path / "stranger", site="plant-3", hub_url=hub.url,
                           extra=[*pinned, "--site-cert", str(stranger_cert), "--site-key", str(stranger_key)])
    # The operator's own client, with a certificate from the same CA (the hub asks everyone for one).
    operator = pki.context()
    operator.load_cert_chain(*map(str, sites.issue_client(tmp_path / "sites", "operator")))
    try:
        httpx.put(f"{member.url}/v1/kv/line/speed", content=b"42").raise_for_status()
        eventually(lambda: httpx.get(f"{hub.url}/v1/kv/line/speed?dc=plant-1&raw", verify=operator).content
                   == b"42", what="the member site's write at the hub")
        # Refused at the TLS handshake, and each edge says why (the hub's alert), without waiting out a timeout.
        error = eventually(lambda: sync_peer(anonymous)["LastError"], what="the missing certificate reported")
        assert "requires a client certificate" in error and "--site-cert" in error, error
        error = eventually(lambda: sync_peer(stranger)["LastError"], what="the foreign certificate reported")
        assert "refused this site's certificate" in error, error
        for refused in (anonymous, stranger):
            assert sync_peer(refused)["Connects"] == 0
        known = {site["Site"] for site in httpx.get(f"{hub.url}/v1/sites", verify=operator).json()}
        assert known == {"plant-1"}
        assert metric(hub.url, operator, "konsul_tls_handshake_failures_total", reason="client_certificate") >= 2
    finally:
        for agent in (member, anonymous, stranger, hub):
            agent.stop()


def test_py_consul_reads_and_writes_kv_over_https_with_and_without_a_client_certificate(tmp_path, pki):
    edge = EdgeProcess(tmp_path / "edge", extra=[*pki.tls_flags(), *NO_MQTTS])
    clients = Pki.make(tmp_path / "clients")
    cert, key = clients.issue_client(tmp_path / "clients", "app-1")
    mutual = EdgeProcess(tmp_path / "mutual", extra=[
        *pki.tls_flags(), "--tls-ca", str(clients.ca), "--tls-verify-client", "on", *NO_MQTTS,
    ])
    try:
        client = consul.Consul(host="127.0.0.1", port=edge.port, scheme="https", verify=str(pki.ca))
        assert client.kv.put("config/db", "postgres://db:5432") is True
        _, entry = client.kv.get("config/db")
        assert entry["Value"] == b"postgres://db:5432"
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
            consul.Consul(host="127.0.0.1", port=edge.port, scheme="https").kv.get("config/db")

        client = consul.Consul(host="127.0.0.1", port=mutual.port, scheme="https", verify=str(pki.ca),
                               cert=(str(cert), str(key)))
        assert client.kv.put("config/db", "mutual") is True
        assert client.kv.get("config/db")[1]["Value"] == b"mutual"
    finally:
        edge.stop()
        mutual.stop()
