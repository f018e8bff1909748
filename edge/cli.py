"""The `konsul` command line.

Every flag can also come from an environment variable, ``KONSUL_`` plus the
flag's name in capitals (``--http-addr`` -> ``KONSUL_HTTP_ADDR``). Heavy modules
are imported inside the command that needs them, so ``konsul --help`` and the
client commands start fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from konsul.sync.errors import KonsulError

from . import client_commands

DEFAULT_HTTP_ADDR = "127.0.0.1:8500"
DEFAULT_MQTT_ADDR = "127.0.0.1:1883"
DEFAULT_COAP_ADDR = "127.0.0.1:5683"
DEFAULT_HUB_ADDR = "127.0.0.1:8700"
DEFAULT_DNS_ADDR = "127.0.0.1:8600"


def env_default(flag: str, default: str | None = None) -> str | None:
    return os.environ.get("KONSUL_" + flag.lstrip("-").replace("-", "_").upper(), default)


def add_flag(parser: argparse.ArgumentParser, flag: str, help: str, default: str | None = None, **kwargs) -> None:
    """Add ``flag`` with its environment variable named in the help."""
    env = "KONSUL_" + flag.lstrip("-").replace("-", "_").upper()
    value = env_default(flag, default)
    shown = f" (env {env}; default {default})" if default is not None else f" (env {env})"
    parser.add_argument(flag, default=value, help=help + shown, **kwargs)


def env_bool(flag: str) -> bool:
    return (env_default(flag, "") or "").lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="konsul",
        description="Konsul Edge: local-first service discovery, configuration and device registry.",
    )
    parser.add_argument("--log-level", default=env_default("--log-level", "info"), help="debug, info, warning or error (env KONSUL_LOG_LEVEL)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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

    hub = commands.add_parser("hub", help="run the central hub", description="Run the hub edges sync with.")
    add_flag(hub, "--data-dir", "where the hub keeps every site's state", required=env_default("--data-dir") is None)
    add_flag(hub, "--http-addr", "HTTP API and sync endpoint address; port 0 picks a free port", DEFAULT_HUB_ADDR)
    add_flag(hub, "--durability", "full or relaxed, as for konsul edge", "full", choices=["full", "relaxed"])
    add_limit_flags(hub, "hub")
    add_security_flags(hub)
    add_tls_flags(hub, "hub")
    hub.set_defaults(run=cmd_hub)

    dev = commands.add_parser(
        "dev", help="run a hub and an edge on localhost with embedded defaults", description="Try Konsul in one command."
    )
    add_flag(dev, "--data-dir", "where the dev agents keep their state", str(Path.home() / ".konsul" / "dev"))
    add_flag(dev, "--sim-devices", "simulated devices to start (mixed MQTT and CoAP); 0 starts none", "5", type=int)
    add_flag(dev, "--edge-addr", "the dev edge's HTTP address", DEFAULT_HTTP_ADDR)
    add_flag(dev, "--hub-addr", "the dev hub's HTTP address", DEFAULT_HUB_ADDR)
    add_flag(dev, "--mqtt-addr", "the dev edge's MQTT address; empty disables it", DEFAULT_MQTT_ADDR)
    add_flag(dev, "--coap-addr", "the dev edge's CoAP address; empty disables it", DEFAULT_COAP_ADDR)
    add_flag(dev, "--mqtts-addr", "the dev edge's MQTT over TLS address; empty disables it", "127.0.0.1:8883")
    dev.set_defaults(run=cmd_dev)

    add_sim_command(commands)

    from .audit_commands import add_audit_command

    add_audit_command(commands, add_flag)

    client_commands.add_commands(commands, add_flag)
    return parser


def add_limit_flags(parser: argparse.ArgumentParser, role: str) -> None:
    """A flag for each bound in ``NetworkLimits`` that applies to ``role`` (docs/operations.md)."""
    import dataclasses

    from konsul.protocols.admission import NetworkLimits

    group = parser.add_argument_group("limits", "bounds on what peers may hold or send (docs/operations.md)")
    for limit in dataclasses.fields(NetworkLimits):
        if role in limit.metadata["roles"]:
            add_flag(group, limit.metadata["flag"], limit.metadata["help"], str(limit.default),
                     type=type(limit.default), dest=f"limit_{limit.name}",
                     metavar="SECONDS" if isinstance(limit.default, float) else "N")


def add_security_flags(parser: argparse.ArgumentParser) -> None:
    """Access control and the audit log (docs/acl.md), for `konsul edge` and `konsul hub`."""
    group = parser.add_argument_group("access control and audit (docs/acl.md)")
    add_flag(group, "--acl", "'on': every request needs a token its policies allow; 'off' lets anyone who "
             "reaches a port read, write and delete everything (a closed test bench only)", "on",
             metavar="on|off")
    add_flag(group, "--acl-initial-management", "a management token's secret (a UUID) made at start if missing, "
             "instead of calling bootstrap (Consul's initial_management; keep it out of shell history)", "",
             metavar="UUID")
    add_flag(group, "--audit-log", "where every write and refusal is logged as JSON lines: a file, '-' for "
             "stdout, 'off' for nowhere; empty means <data-dir>/audit.log", "", metavar="PATH")
    add_flag(group, "--audit-max-bytes", "size at which the audit log file is rotated (bytes, or e.g. 64MiB)", "64MiB",
             metavar="SIZE")
    add_flag(group, "--audit-keep", "rotated audit log files kept (audit.log.1 newest); 0 keeps none", "5", type=int,
             metavar="N")


def add_tls_flags(parser: argparse.ArgumentParser, role: str) -> None:
    """TLS for the listeners and, at an edge, the sync link and its site credential (docs/security.md)."""
    group = parser.add_argument_group("TLS and site credentials (docs/security.md)")
    add_flag(group, "--tls-cert", "PEM certificate (chain) to serve HTTPS" + (" and MQTT over TLS" if role == "edge" else "")
             + " with; reloaded on SIGHUP", "", metavar="PATH")
    add_flag(group, "--tls-key", "PEM private key of --tls-cert", "", metavar="PATH")
    add_flag(group, "--tls-ca", "PEM CA bundle that signs clients' certificates", "", metavar="PATH")
    add_flag(group, "--tls-verify-client", "'on': every TLS client must present a certificate --tls-ca signed", "off",
             metavar="on|off")
    if role != "edge":
        return
    add_flag(group, "--mqtts-addr", "MQTT over TLS address; default 127.0.0.1:8883 when --tls-cert is given, "
             "'off' for none", "", metavar="HOST:PORT")
    add_flag(group, "--hub-ca", "the only CA the hub's certificate may chain to (pinning); empty trusts the "
             "system's CAs", "", metavar="PATH")
    add_flag(group, "--site-token", "this site's join token at the hub (`konsul sites add SITE` prints it)", "",
             metavar="SECRET")
    add_flag(group, "--site-cert", "a client certificate for this site (mutual TLS with the hub), instead of "
             "--site-token", "", metavar="PATH")
    add_flag(group, "--site-key", "PEM private key of --site-cert", "", metavar="PATH")


DEFAULT_MQTTS_ADDR = "127.0.0.1:8883"


def tls_config(args: argparse.Namespace, role: str) -> dict:
    """The TLS fields of EdgeConfig / HubConfig from the parsed flags."""
    from konsul.protocols.tls import TlsFiles

    verify = str(args.tls_verify_client).strip().lower()
    if verify not in ("on", "off", "true", "false", "1", "0", "yes", "no"):
        raise SystemExit(f"konsul: --tls-verify-client must be on or off, not {args.tls_verify_client!r}")
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise SystemExit("konsul: --tls-cert and --tls-key go together")
        tls = TlsFiles(
            Path(args.tls_cert), Path(args.tls_key), Path(args.tls_ca) if args.tls_ca else None,
            verify in ("on", "true", "1", "yes"),
        )
    elif args.tls_ca or verify in ("on", "true", "1", "yes"):
        raise SystemExit("konsul: --tls-ca and --tls-verify-client need --tls-cert and --tls-key")
    config: dict = {"tls": tls}
    if role == "edge":
        mqtts = (args.mqtts_addr or "").strip()
        if mqtts.lower() == "off":
            mqtts = ""
        elif not mqtts and tls is not None:
            mqtts = DEFAULT_MQTTS_ADDR
        elif mqtts and tls is None:
            raise SystemExit("konsul: --mqtts-addr needs --tls-cert and --tls-key")
        if bool(args.site_cert) != bool(args.site_key):
            raise SystemExit("konsul: --site-cert and --site-key go together")
        config.update(
            mqtts_addr=mqtts, hub_ca=args.hub_ca, site_token=(args.site_token or "").strip(),
            site_cert=args.site_cert, site_key=args.site_key,
        )
    return config


def security_config(args: argparse.Namespace) -> dict:
    """The ``acl`` and ``audit_*`` fields of EdgeConfig / HubConfig from the parsed flags."""
    acl = on_off(args.acl, "--acl")
    max_bytes = parse_size(args.audit_max_bytes, "--audit-max-bytes")
    if max_bytes < 1 or args.audit_keep < 0:
        raise SystemExit("konsul: --audit-max-bytes must be positive and --audit-keep not negative")
    return {
        "acl": acl,
        "acl_initial_management": check_initial_management(args.acl_initial_management),
        "audit_log": args.audit_log,
        "audit_max_bytes": max_bytes,
        "audit_keep": args.audit_keep,
    }


def check_initial_management(secret: str) -> str:
    from konsul.sync.acl import check_uuid
    from konsul.sync.errors import InvalidArgument

    secret = (secret or "").strip()
    try:
        return check_uuid(secret, "--acl-initial-management") if secret else ""
    except InvalidArgument as error:
        raise SystemExit(f"konsul: {error}") from None


def network_limits(args: argparse.Namespace):
    """The ``NetworkLimits`` the parsed flags give; a usage error for a bound below zero."""
    import dataclasses

    from konsul.protocols.admission import NetworkLimits

    values = {}
    for limit in dataclasses.fields(NetworkLimits):
        value = getattr(args, f"limit_{limit.name}", None)
        if value is None:
            continue
        if value < 0:
            raise SystemExit(f"konsul: {limit.metadata['flag']} must not be negative, got {value}")
        values[limit.name] = value
    return NetworkLimits(**values)


def add_sim_command(commands) -> None:
    sim = commands.add_parser(
        "sim",
        help="simulate a fleet of devices against a running edge",
        description="Drive simulated devices over MQTT and CoAP against a running `konsul edge`: each sends "
        "telemetry, follows its desired state (the `interval` field sets seconds between samples), reports "
        "its state and disconnects at random. Prints a summary line periodically.",
    )
    add_flag(sim, "--devices", "how many devices", "10", type=int)
    add_flag(sim, "--protocol", "mqtt, coap, or mixed (alternating)", "mixed", choices=["mqtt", "coap", "mixed"])
    add_flag(sim, "--http-addr", "the edge's HTTP API, to create devices and get their tokens", DEFAULT_HTTP_ADDR)
    add_flag(sim, "--mqtt-addr", "the edge's MQTT address", DEFAULT_MQTT_ADDR)
    add_flag(sim, "--coap-addr", "the edge's CoAP address", DEFAULT_COAP_ADDR)
    add_flag(sim, "--rate", "telemetry samples per second per device (desired `interval` overrides it)", "1", type=float)
    add_flag(sim, "--disconnect-rate", "mean random disconnects per device per minute; 0 for none", "0", type=float)
    add_flag(sim, "--duration", "seconds to run; 0 runs until Ctrl-C or SIGTERM", "0", type=float)
    add_flag(sim, "--prefix", "device ids are this prefix and a number", "sim-")
    add_flag(sim, "--seed", "random seed, for a reproducible fleet; empty picks one", "")
    add_flag(sim, "--report-every", "seconds between summary lines; 0 for none", "5", type=float)
    sim.add_argument(
        "--token", default=None, metavar="SECRET",
        help="an ACL token that may write the devices, to create them (env KONSUL_HTTP_TOKEN, then CONSUL_HTTP_TOKEN)",
    )
    sim.add_argument(
        "--anonymous",
        action="store_true",
        default=env_bool("--anonymous"),
        help="connect without tokens, for an edge run with --allow-anonymous; devices register on first "
        "contact (env KONSUL_ANONYMOUS)",
    )
    sim.set_defaults(run=cmd_sim)


def cmd_sim(args: argparse.Namespace) -> int:
    from konsul.simulator import command
    from konsul.simulator.fleet import FleetConfig

    from .client_commands import token_of

    try:
        config = FleetConfig(
            devices=args.devices,
            protocol=args.protocol,
            http_addr=args.http_addr,
            mqtt_addr=args.mqtt_addr,
            coap_addr=args.coap_addr,
            rate=args.rate,
            disconnect_rate=args.disconnect_rate,
            anonymous=args.anonymous,
            prefix=args.prefix,
            seed=int(args.seed) if args.seed else None,
            acl_token=token_of(args) or "",
        )
    except ValueError as error:
        print(f"konsul sim: {error}", file=sys.stderr)
        return 2
    return command.main(config, args.duration or float("inf"), args.report_every)


def cmd_edge(args: argparse.Namespace) -> int:
    from .agent import EdgeConfig, run_edge

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


def on_off(value: str, flag: str) -> bool:
    """An on|off flag's value; a usage error for anything else."""
    text = str(value).strip().lower()
    if text not in ("on", "off", "true", "false", "1", "0", "yes", "no"):
        raise SystemExit(f"konsul: {flag} must be on or off, not {value!r}")
    return text in ("on", "true", "1", "yes")


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str, flag: str) -> int:
    """Bytes from ``65536``, ``64MiB``, ``1GB``...; a usage error otherwise."""
    import re

    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    unit = _SIZE_UNITS.get(match.group(2).lower()) if match else None
    if unit is None:
        raise SystemExit(f"konsul: {flag} must be a size like 65536, 64MiB or 1GB, not {text!r}")
    return int(match.group(1)) * unit


def cmd_hub(args: argparse.Namespace) -> int:
    from konsul.hub.agent import HubConfig, run_hub

    config = HubConfig(
        data_dir=Path(args.data_dir), http_addr=args.http_addr, durability=args.durability, limits=network_limits(args),
        **security_config(args), **tls_config(args, "hub"),
    )
    return run_until_signal(run_hub, config)


def cmd_dev(args: argparse.Namespace) -> int:
    from konsul.hub.agent import HubConfig, run_hub

    from .agent import EdgeConfig, run_edge

    data_dir = Path(args.data_dir)
    # ACLs are on in dev as everywhere: one management token, made once and
    # kept in the data directory, is the hub's and the edge's initial
    # management token and the printed examples' token; the edge syncs with
    # the dev site's join token, also kept there.
    management = dev_management_token(data_dir)
    site_token = dev_site_token(data_dir)
    os.environ["KONSUL_HTTP_TOKEN"] = management  # for anything this process starts
    # TLS everywhere in dev too, with a CA of its own made on first start and
    # kept in <data-dir>/tls (docs/tls.md): the hub and the edge serve HTTPS,
    # the edge pins the hub to that CA, MQTT over TLS uses the same certificate.
    certificates = dev_certificates(data_dir)
    os.environ["KONSUL_CACERT"] = str(certificates.ca)  # for anything this process starts
    from konsul.protocols.tls import TlsFiles

    # The hub accepts (does not require) client certificates from the dev CA.
    hub_tls = TlsFiles(certificates.cert, certificates.key, certificates.ca)
    edge_tls = TlsFiles(certificates.cert, certificates.key)

    async def run_dev(_config, *, task_status):
        import trio

        async with trio.open_nursery() as nursery:
            hub = await nursery.start(
                run_hub, HubConfig(
                    data_dir / "hub", args.hub_addr, acl_initial_management=management,
                    initial_site_tokens={"dev": site_token}, tls=hub_tls,
                ),
            )
            edge = await nursery.start(
                run_edge,
                EdgeConfig(
                    site="dev",
                    data_dir=data_dir / "edge",
                    node="dev-edge",
                    http_addr=args.edge_addr,
                    mqtt_addr=args.mqtt_addr,
                    coap_addr=args.coap_addr,
                    hub_url=hub.http_url,
                    allow_anonymous=True,
                    acl_initial_management=management,
                    site_token=site_token,
                    # The simulator's CoAP devices give their token in the URI; dev is one machine's loopback.
                    coap_uri_tokens=True,
                    tls=edge_tls,
                    mqtts_addr=args.mqtts_addr,
                    hub_ca=str(certificates.ca),
                ),
            )
            if args.sim_devices > 0:
                await nursery.start(run_dev_fleet, edge, args.sim_devices)
            task_status.started((hub, edge))

    async def run_dev_fleet(edge, devices: int, *, task_status) -> None:
        from konsul.simulator import FleetConfig, run_fleet

        protocols = [name for name, addr in (("mqtt", edge.mqtt_addr), ("coap", edge.coap_addr)) if addr]
        if not protocols:
            task_status.started()
            return
        config = FleetConfig(
            devices=devices,
            protocol="mixed" if len(protocols) == 2 else protocols[0],
            http_addr=edge.http_url.split("://", 1)[1],
            mqtt_addr=edge.mqtt_addr or "",
            coap_addr=edge.coap_addr or "",
            rate=0.2,  # a sample every 5 s: alive, not noisy
            anonymous=True,
            prefix="dev-sim-",
            seed=1,
        )
        await run_fleet(config, task_status=task_status)

    def announce(infos) -> None:
        hub, edge = infos
        ca = certificates.ca
        mqtts = getattr(edge, "mqtts_addr", None) or args.mqtts_addr
        sim_line = (
            f"{args.sim_devices} (dev-sim-0000...), MQTT and CoAP, a sample every 5 s: "
            f"curl --cacert {ca} {edge.http_url}/v1/devices"
            if args.sim_devices > 0
            else "none (--sim-devices)"
        )
        mqtts_example = (
            f"  mosquitto_sub -h 127.0.0.1 -p {mqtts.rsplit(':', 1)[1]} --cafile $CONSUL_CACERT -i watcher-tls "
            "-t 'konsul/v1/kv/#' -v      # MQTT over TLS\n"
            f"  mosquitto_pub -h 127.0.0.1 -p {mqtts.rsplit(':', 1)[1]} --cafile $CONSUL_CACERT -i dev-sim-9999 "
            "-t konsul/v1/devices/dev-sim-9999/telemetry -m '{\"temp\": 21.5}'\n"
            if mqtts
            else ""
        )
        print(
            f"""
Konsul dev is running (data in {data_dir}):
  ACL management token  {management}   (kept in {data_dir / "management-token"})
  CA of the dev agents  {ca}   (made on first start; trust it for HTTPS and MQTT over TLS)
  edge (site "dev")  {edge.http_url}   Consul-compatible API: point CONSUL_HTTP_ADDR or KONSUL_HTTP_ADDR here
  hub                {hub.http_url}   every site (?dc=dev) and the fleet-wide scope (?dc=global)
  MQTT for devices   {edge.mqtt_addr or "off"}   anonymous devices allowed in dev
  MQTT over TLS      {mqtts or "off"}
  CoAP for devices   {edge.coap_addr or "off"} (UDP)
  simulated devices  {sim_line}

Try it (ACLs are on: every request carries the token; HTTPS with the dev CA):
  export KONSUL_HTTP_TOKEN={management} CONSUL_HTTP_TOKEN={management}
  export KONSUL_CACERT={ca} CONSUL_CACERT={ca}
  export KONSUL_HTTP_ADDR={edge.http_url} CONSUL_HTTP_ADDR={edge.http_url}
  curl --cacert $CONSUL_CACERT -X PUT -H "X-Consul-Token: $KONSUL_HTTP_TOKEN" --data 'hello' {edge.http_url}/v1/kv/greeting
  curl --cacert $CONSUL_CACERT -H "X-Consul-Token: $KONSUL_HTTP_TOKEN" {edge.http_url}/v1/kv/greeting?raw
  curl --cacert $CONSUL_CACERT {edge.http_url}/v1/kv/greeting?raw      # no token: 403 permission_denied
  curl --cacert $CONSUL_CACERT -H "X-Consul-Token: $KONSUL_HTTP_TOKEN" '{hub.http_url}/v1/kv/greeting?dc=dev&raw'      # synced to the hub (over wss)
  curl --cacert $CONSUL_CACERT -X PUT -H "X-Consul-Token: $KONSUL_HTTP_TOKEN" --data 'eco' '{hub.http_url}/v1/kv/fleet/mode?dc=global'
  konsul kv get fleet/mode --dc global
  konsul kv list
  konsul acl token list
  curl --cacert $CONSUL_CACERT -H "X-Consul-Token: $KONSUL_HTTP_TOKEN" {hub.http_url}/v1/sites
  konsul devices list
  konsul devices desired dev-sim-0000 interval=2      # the device follows
  konsul devices telemetry dev-sim-0000
  curl --cacert $CONSUL_CACERT -H "X-Consul-Token: $KONSUL_HTTP_TOKEN" '{hub.http_url}/v1/devices/dev-sim-0000/telemetry?dc=dev&limit=5'
  mosquitto_sub -h 127.0.0.1 -p {(edge.mqtt_addr or ":1883").rsplit(":", 1)[1]} -i watcher -t 'konsul/v1/kv/#' -v
{mqtts_example}  coap-client -m get coap://{edge.coap_addr or "127.0.0.1:5683"}/kv/greeting

Stop with Ctrl-C.
""",
            flush=True,
        )

    return run_until_signal(run_dev, None, on_ready=announce)


def dev_certificates(data_dir: Path):
    """The dev CA and server certificate in ``<data-dir>/tls``: made on first start, reused after."""
    from konsul.protocols.tls_certs import ensure_dev_certificates

    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    certificates = ensure_dev_certificates(data_dir.resolve() / "tls")
    if certificates.created:
        logging.getLogger("konsul").info(
            "made the dev %s in %s", " and ".join(
                {"ca": "CA", "server": "server certificate"}[what] for what in certificates.created
            ), certificates.directory,
        )
    return certificates


def dev_management_token(data_dir: Path) -> str:
    """The dev agents' management secret: read from ``<data-dir>/management-token``, made on first start."""
    import uuid

    def valid(text: str) -> bool:
        try:
            return str(uuid.UUID(text)) == text
        except ValueError:
            return False

    return dev_secret(data_dir / "management-token", lambda: str(uuid.uuid4()), valid)


def dev_site_token(data_dir: Path) -> str:
    """The dev edge's join token at the dev hub: ``<data-dir>/site-token``, made on first start."""
    from konsul.hub.site_credentials import new_join_token

    return dev_secret(data_dir / "site-token", new_join_token, lambda text: text.startswith("ksite-"))


def dev_secret(path: Path, make, valid) -> str:
    """A secret kept in ``path`` (0600): read if it holds a valid one, else made and written."""
    try:
        found = path.read_text().strip()
        if valid(found):
            return found
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = make()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secret + "\n")
    return secret


def run_until_signal(run, config, on_ready=None) -> int:
    """Run an agent under trio until SIGTERM/SIGINT, then shut it down cleanly."""
    import trio  # here, so that client commands and --help start fast

    raise_open_file_limit()

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                info = await nursery.start(run, config)
                collect_garbage_less_often()
                if on_ready is not None:
                    on_ready(info)
                async for signum in signals:
                    logging.getLogger("konsul").info("%s: shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except BaseException as error:  # noqa: BLE001 - reported below or re-raised
        reason = _startup_error(error)
        if reason is None:
            raise
        print(f"konsul: {reason}", file=sys.stderr)
        return 2
    return 0


def raise_open_file_limit() -> None:
    """Raise the soft limit on open files to the hard one.

    Every connection, observer and database holds a descriptor; the usual soft
    limit (1024) is below what the connection bounds allow (docs/operations.md).
    The listeners back off when it is reached anyway, but would then refuse
    everyone, not just the source that holds too many.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as error:
            logging.getLogger("konsul").warning("could not raise the open file limit from %d: %s", soft, error)


# Allocations (net) between two young-generation collections; CPython's default is 700.
GC_YOUNG_THRESHOLD = 10_000


def collect_garbage_less_often() -> None:
    """Tune the cyclic garbage collector for a long-running agent under load.

    A request through aiocoap leaves reference cycles behind (its pipes and
    callbacks), and objects that live for the few milliseconds a durable
    write takes are traversed by every young collection they see. With
    CPython's defaults the collector took a fifth of the CPU of a loaded
    edge answering CoAP PUTs (bench/coap.py); with a young generation of
    10,000 objects, under a tenth. Everything alive once the agent has
    started (modules, the loaded state) is moved out of the collector's
    sight (``gc.freeze``): it lives as long as the process, and full
    collections no longer walk it.
    """
    import gc

    _young, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)
    gc.freeze()


def _startup_error(error: BaseException) -> BaseException | None:
    """The user-facing cause inside a (possibly nested) exception group, if any."""
    if isinstance(error, (KonsulError, OSError, ValueError)):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _startup_error(inner)
            if found is not None:
                return found
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Positional lists such as `devices desired ID F=V ...` may continue after
        # an option (`... --replace F=V`), which argparse leaves over; nothing else may.
        if not hasattr(args, "fields") or any(arg.startswith("-") for arg in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.fields = [*args.fields, *extra]
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
