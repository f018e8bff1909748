"""The DNS interface (--dns-addr) of a real edge, asked with dig over UDP and TCP."""

from __future__ import annotations

import socket
import subprocess
import sys

import httpx
import pytest

from agents import EdgeProcess, eventually


def dig(port: int, *args: str) -> str:
    result = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(port), "+time=5", "+tries=1", *args],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def short(port: int, *args: str) -> list[str]:
    return sorted(line for line in dig(port, "+short", *args).splitlines() if line)


def status(output: str) -> str:
    return output.split("status: ", 1)[1].split(",", 1)[0]


@pytest.fixture(scope="module")
def dns_edge(tmp_path_factory):
    edge = EdgeProcess(tmp_path_factory.mktemp("dns"), node="n1", extra=["--dns-addr", "127.0.0.1:0"])
    edge.dns_port = int(edge.wait_for(r"dns listening on 127\.0\.0\.1:(\d+)").group(1))
    with httpx.Client(base_url=edge.url, timeout=10) as http:
        for service in (
            {"Name": "web", "ID": "web-1", "Port": 8080, "Address": "10.0.0.5", "Tags": ["v1", "primary"]},
            {"Name": "web", "ID": "web-2", "Port": 8081, "Address": "10.0.0.6", "Tags": ["v2"]},
            {"Name": "web", "ID": "web-3", "Port": 8082, "Address": "10.0.0.7", "Check": {"TTL": "60s"}},
            {"Name": "db", "ID": "db-1", "Port": 5432, "Address": "fd00::5"},
        ):
            assert http.put("/v1/agent/service/register", json=service).status_code == 200
        for i in range(40):
            big = {"Name": "big", "ID": f"big-{i}", "Port": 9000 + i, "Address": f"10.1.0.{i + 1}"}
            assert http.put("/v1/agent/service/register", json=big).status_code == 200
    yield edge
    edge.stop()


def test_a_and_srv_answers_for_a_registered_service(dns_edge):
    port = dns_edge.dns_port
    assert short(port, "web.service.consul", "A") == ["10.0.0.5", "10.0.0.6"]
    assert short(port, "web.service.s1.konsul", "A") == ["10.0.0.5", "10.0.0.6"]  # explicit site, other domain
    srv = dig(port, "web.service.consul", "SRV")
    assert status(srv) == "NOERROR" and " aa " in srv.split("flags:", 1)[1].split(";", 1)[0] + " "
    assert short(port, "web.service.consul", "SRV") == [
        "1 1 8080 0a000005.addr.s1.consul.", "1 1 8081 0a000006.addr.s1.consul.",
    ]
    # The SRV targets resolve, and come along in the additional section.
    assert "0a000005.addr.s1.consul. 0\tIN\tA\t10.0.0.5" in srv
    assert short(port, "0a000006.addr.s1.consul", "A") == ["10.0.0.6"]
    assert short(port, "db.service.consul", "AAAA") == ["fd00::5"]
    assert short(port, "WEB.Service.CONSUL", "A") == ["10.0.0.5", "10.0.0.6"]  # names are case-insensitive


def test_tags_filter_in_both_forms(dns_edge):
    port = dns_edge.dns_port
    assert short(port, "v1.web.service.consul", "A") == ["10.0.0.5"]
    assert short(port, "primary.web.service.s1.consul", "SRV") == ["1 1 8080 0a000005.addr.s1.consul."]
    assert short(port, "_web._v2.service.consul", "SRV") == ["1 1 8081 0a000006.addr.s1.consul."]  # RFC 2782
    assert len(short(port, "_web._tcp.service.consul", "SRV")) == 2  # _tcp: no tag filter
    assert status(dig(port, "v9.web.service.consul", "A")) == "NXDOMAIN"


def test_an_instance_whose_check_fails_is_left_out(dns_edge):
    port = dns_edge.dns_port
    with httpx.Client(base_url=dns_edge.url, timeout=10) as http:
        # web-3's TTL check starts critical: not answered until it passes.
        assert "10.0.0.7" not in short(port, "web.service.consul", "A")
        assert http.put("/v1/agent/check/pass/service:web-3").status_code == 200
        assert short(port, "web.service.consul", "A") == ["10.0.0.5", "10.0.0.6", "10.0.0.7"]
        assert http.put("/v1/agent/check/fail/service:web-3").status_code == 200
        assert short(port, "web.service.consul", "A") == ["10.0.0.5", "10.0.0.6"]


def test_node_lookup(dns_edge):
    port = dns_edge.dns_port
    assert short(port, "n1.node.consul", "A") == ["127.0.0.1"]
    assert short(port, "n1.node.s1.konsul") == ["127.0.0.1"]
    assert status(dig(port, "nobody.node.consul")) == "NXDOMAIN"


def test_nodes_and_services_registered_through_the_catalog(dns_edge):
    port = dns_edge.dns_port
    registrations = [
        {"Node": "ext-1", "Address": "10.2.0.1", "Service": {"Service": "api", "Port": 7000},
         "Check": {"Name": "api alive", "ServiceID": "api", "Status": "passing"}},
        {"Node": "ext-2", "Address": "10.2.0.2", "Service": {"Service": "api", "Port": 7000},
         "Check": {"Name": "api alive", "ServiceID": "api", "Status": "critical"}},
        {"Node": "ext-3", "Address": "10.2.0.3", "Service": {"Service": "api", "Port": 7000, "Address": "10.2.0.33"},
         "Checks": [{"Name": "api alive", "ServiceID": "api", "Status": "passing"},
                    {"Name": "node down", "CheckID": "node-down", "Status": "critical"}]},  # node-level
        {"Node": "ext-4", "Address": "10.2.0.4", "Service": {"Service": "api", "Port": 7001, "Tags": ["v2"]},
         "Check": {"Name": "api slow", "ServiceID": "api", "Status": "warning"}},
        {"Node": "Ext-Mixed", "Address": "10.2.0.9"},
    ]
    with httpx.Client(base_url=dns_edge.url, timeout=10) as http:
        for body in registrations:
            assert http.put("/v1/catalog/register", json=body).json() is True
        passing = http.get("/v1/health/service/api", params={"passing": "true"}).json()
    # Passing and warning instances are answered, as by /v1/health/service; critical ones, or on a critical node, not.
    assert short(port, "api.service.consul", "A") == ["10.2.0.1", "10.2.0.4"]
    assert sorted(e["Node"]["Node"] for e in passing) == ["ext-1"]
    assert short(port, "v2.api.service.consul", "SRV") == ["1 1 7001 0a020004.addr.s1.consul."]
    # Every catalog node answers, not only the edge's own.
    assert short(port, "ext-2.node.consul", "A") == ["10.2.0.2"]
    assert short(port, "ext-3.node.s1.konsul", "A") == ["10.2.0.3"]
    assert short(port, "ext-mixed.node.consul", "A") == ["10.2.0.9"]  # DNS names are case-insensitive
    assert short(port, "n1.node.consul", "A") == ["127.0.0.1"]


def test_tcp_and_truncation_over_udp(dns_edge):
    port = dns_edge.dns_port
    assert short(port, "+tcp", "web.service.consul", "A") == ["10.0.0.5", "10.0.0.6"]
    # 40 SRV records do not fit 512 bytes: UDP answers what fits, flagged TC ...
    udp = dig(port, "+ignore", "+noedns", "big.service.consul", "SRV")
    flags = udp.split("flags:", 1)[1].split(";", 1)[0]
    assert " tc" in flags
    answered = int(udp.split("ANSWER: ", 1)[1].split(",", 1)[0])
    assert 0 < answered < 40
    # ... and dig, seeing TC, asks again over TCP and gets all of them.
    assert len(short(port, "+noedns", "big.service.consul", "SRV")) == 40


def test_unknown_names_foreign_names_and_other_sites(dns_edge):
    port = dns_edge.dns_port
    missing = dig(port, "nothing.service.consul", "A")
    assert status(missing) == "NXDOMAIN"
    assert "IN\tSOA\tns.consul. hostmaster.consul." in missing
    assert status(dig(port, "web.service.elsewhere.consul", "A")) == "NXDOMAIN"  # a site this edge does not hold
    assert status(dig(port, "example.com", "A")) == "REFUSED"  # no recursion
    nodata = dig(port, "web.service.consul", "TXT")
    assert status(nodata) == "NOERROR" and "ANSWER: 0" in nodata and "SOA" in nodata
    assert short(port, "konsul", "SOA") == ["ns.konsul. hostmaster.konsul. 1 3600 600 86400 0"]


def test_hostile_packets_get_formerr_or_nothing_and_the_server_goes_on(dns_edge):
    port = dns_edge.dns_port
    header = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(3)
        # A name that is a compression pointer to itself: a loop dnspython refuses.
        udp.sendto(header + b"\xc0\x0c\x00\x01\x00\x01", ("127.0.0.1", port))
        reply = udp.recv(4096)
        assert reply[:2] == b"\x12\x34" and reply[3] & 0x0F == 1  # FORMERR
        for junk in (b"", b"\x00", b"\xff" * 3000, header + b"\x3fabc", header[:2] + b"\x80" + header[3:]):
            udp.sendto(junk, ("127.0.0.1", port))
    # A TCP client that declares a length it never sends, and one that sends garbage.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as stalled, \
            socket.create_connection(("127.0.0.1", port), timeout=5) as garbage:
        stalled.sendall(b"\xff\xff\x00")
        garbage.sendall(b"\x00\x04\xde\xad\xbe\xef")
        assert short(port, "web.service.consul", "A") == ["10.0.0.5", "10.0.0.6"]
    with httpx.Client(base_url=dns_edge.url, timeout=10) as http:
        metrics = http.get("/metrics").text
    assert 'konsul_dns_queries_total{outcome="malformed",transport="udp"}' in metrics


def test_a_source_over_its_rate_is_dropped_and_counted(tmp_path):
    edge = EdgeProcess(tmp_path / "edge", extra=[
        "--dns-addr", "127.0.0.1:0", "--dns-rate-per-source", "1", "--dns-burst-per-source", "3",
    ])
    try:
        port = int(edge.wait_for(r"dns listening on 127\.0\.0\.1:(\d+)").group(1))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(0.5)
            query = b"\x00\x07\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01x\x07service\x06consul\x00\x00\x01\x00\x01"
            for _ in range(10):
                udp.sendto(query, ("127.0.0.1", port))
            answered = 0
            try:
                while True:
                    udp.recv(4096)
                    answered += 1
            except TimeoutError:
                pass
        assert 1 <= answered <= 5  # the burst, and what the rate refilled meanwhile
        with httpx.Client(base_url=edge.url, timeout=10) as http:
            eventually(lambda: 'konsul_rate_limited_total{interface="dns",kind="source"}' in http.get("/metrics").text)
    finally:
        edge.stop()


def test_dns_is_off_with_an_empty_address_and_dnspython_not_loaded(tmp_path):
    code = (
        "import pathlib, sys, trio\n"
        "from konsul.edge.agent import EdgeConfig, run_edge\n"
        "async def main():\n"
        "    config = EdgeConfig(site='s1', data_dir=pathlib.Path(sys.argv[1]), http_addr='127.0.0.1:0', mqtt_addr='', "
        "coap_addr='', acl=False)\n"
        "    async with trio.open_nursery() as nursery:\n"
        "        info = await nursery.start(run_edge, config)\n"
        "        print(info.dns_addr, 'dns' in sys.modules, 'dns.message' in sys.modules)\n"
        "        nursery.cancel_scope.cancel()\n"
        "trio.run(main)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "e")], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["None", "False", "False"], result.stderr
