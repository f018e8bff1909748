"""`konsul edge` and `konsul hub`: their flags and how the flags become an agent's configuration."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

from .flags import (
    DEFAULT_COAP_ADDR,
    DEFAULT_DNS_ADDR,
    DEFAULT_HTTP_ADDR,
    DEFAULT_HUB_ADDR,
    DEFAULT_MQTT_ADDR,
    add_flag,
    add_limit_flags,
    add_security_flags,
    add_tls_flags,
    env_bool,
    env_default,
    network_limits,
    on_off,
    parse_size,
    security_config,
    tls_config,
)
from .run import run_until_signal


def add_edge_command(commands: argparse._SubParsersAction) -> None:
    edge = commands.add_parser("edge", help="run a site's agent", description="Run a site's edge agent.")
    add_flag(edge, "--site", "this site's id (its Consul datacenter name)", required=env_default("--site") is None)
    add_flag(edge, "--data-dir", "where the agent keeps its state", required=env_default("--data-dir") is None)
    add_flag(edge, "--hub-url", "the hub to sync with; empty runs standalone", "")
    add_flag(edge, "--node", "this agent's node name", socket.gethostname())
    add_flag(edge, "--http-addr", "HTTP API address; port 0 picks a free port", DEFAULT_HTTP_ADDR)
    add_flag(edge, "--mqtt-addr", "MQTT address for devices; empty disables it", DEFAULT_MQTT_ADDR)
    add_flag(
        edge,
        "--mqtt-broker",
        "attach to this MQTT broker (mqtt://[user:password@]host:port, mqtts:// over TLS) as a client "
        "instead of embedding one; --mqtt-addr is then unused",
        "",
    )
    add_flag(edge, "--mqtt-broker-ca", "for an mqtts:// --mqtt-broker: the only CA its certificate may chain to "
             "(pinning); empty trusts the system's CAs", "", metavar="PATH")
    add_flag(edge, "--coap-addr", "CoAP (UDP) address for devices; empty disables it", DEFAULT_COAP_ADDR)
    add_flag(edge, "--dns-addr", "DNS interface address, UDP and TCP (docs/dns.md); empty disables it; port 0 "
             "picks a free port", DEFAULT_DNS_ADDR)
    edge.add_argument(
        "--allow-anonymous",
        action="store_true",
        default=env_bool("--allow-anonymous"),
        help="let devices connect over MQTT and CoAP without credentials (env KONSUL_ALLOW_ANONYMOUS)",
    )
    add_flag(
        edge,
        "--durability",
        "full: every acknowledged write survives power loss; relaxed: survives a crash of "
        "the process, the last writes may be lost on power loss",
        "full",
        choices=["full", "relaxed"],
    )
    add_flag(
        edge,
        "--telemetry-buffer",
        "the most disk the telemetry buffer may take while the hub is away (bytes, or e.g. 64MiB, "
        "1GB); past it the oldest samples are dropped and counted",
        "64MiB",
    )
    add_flag(
        edge, "--coap-uri-tokens", "on: CoAP devices may give their token in the URI (tk=), in clear on the "
        "network; off: they use OSCORE (PUT /v1/devices/<id>?oscore=true) or are anonymous (docs/coap.md)",
        "off", metavar="on|off",
    )
    add_flag(edge, "--session-ttl-min", "the shortest session TTL clients may ask for (Consul's session_ttl_min)",
             "10s")
    add_limit_flags(edge, "edge")
    add_security_flags(edge)
    add_tls_flags(edge, "edge")
    edge.set_defaults(run=cmd_edge)


def add_hub_command(commands: argparse._SubParsersAction) -> None:
    hub = commands.add_parser("hub", help="run the central hub", description="Run the hub edges sync with.")
    add_flag(hub, "--data-dir", "where the hub keeps every site's state", required=env_default("--data-dir") is None)
    add_flag(hub, "--http-addr", "HTTP API and sync endpoint address; port 0 picks a free port", DEFAULT_HUB_ADDR)
    add_flag(hub, "--durability", "full or relaxed, as for konsul edge", "full", choices=["full", "relaxed"])
    add_limit_flags(hub, "hub")
    add_security_flags(hub)
    add_tls_flags(hub, "hub")
    hub.set_defaults(run=cmd_hub)


def cmd_edge(args: argparse.Namespace) -> int:
    from konsul.edge.agent import EdgeConfig, run_edge

    config = EdgeConfig(
        site=args.site,
        data_dir=Path(args.data_dir),
        node=args.node,
        http_addr=args.http_addr,
        mqtt_addr=args.mqtt_addr,
        mqtt_broker=args.mqtt_broker,
        coap_addr=args.coap_addr,
        hub_url=args.hub_url,
        allow_anonymous=args.allow_anonymous,
        durability=args.durability,
        telemetry_buffer_bytes=parse_size(args.telemetry_buffer, "--telemetry-buffer"),
        limits=network_limits(args),
        **security_config(args),
        **tls_config(args, "edge"),
        mqtt_broker_ca=args.mqtt_broker_ca,
        coap_uri_tokens=on_off(args.coap_uri_tokens, "--coap-uri-tokens"),
        session_ttl_min_s=session_ttl_min(args.session_ttl_min),
        dns_addr=(args.dns_addr or "").strip(),
    )
    return run_until_signal(run_edge, config)


def session_ttl_min(text: str) -> float:
    """``--session-ttl-min`` in seconds; a usage error unless a positive duration."""
    from konsul.protocols.http.params import parse_duration
    from konsul.sync.errors import InvalidArgument

    try:
        seconds = parse_duration(text, "--session-ttl-min")
    except InvalidArgument as error:
        raise SystemExit(f"konsul: {error}") from None
    if seconds <= 0:
        raise SystemExit("konsul: --session-ttl-min must be positive, e.g. 10s")
    return seconds


def cmd_hub(args: argparse.Namespace) -> int:
    from konsul.hub.agent import HubConfig, run_hub

    config = HubConfig(
        data_dir=Path(args.data_dir), http_addr=args.http_addr, durability=args.durability, limits=network_limits(args),
        **security_config(args), **tls_config(args, "hub"),
    )
    return run_until_signal(run_hub, config)

