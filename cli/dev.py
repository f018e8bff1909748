"""`konsul dev`: a hub and an edge on localhost with embedded defaults, TLS and ACLs on."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path

from .flags import DEFAULT_COAP_ADDR, DEFAULT_HTTP_ADDR, DEFAULT_HUB_ADDR, DEFAULT_MQTT_ADDR, add_flag
from .run import run_until_signal


def add_dev_command(commands: argparse._SubParsersAction) -> None:
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


def cmd_dev(args: argparse.Namespace) -> int:
    from konsul.edge.agent import EdgeConfig, run_edge
    from konsul.hub.agent import HubConfig, run_hub

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


def dev_secret(path: Path, make: Callable[[], str], valid: Callable[[str], bool]) -> str:
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

