"""`konsul sim`: a fleet of simulated devices against a running edge (docs/simulator.md)."""

from __future__ import annotations

import argparse
import sys

from .flags import DEFAULT_COAP_ADDR, DEFAULT_HTTP_ADDR, DEFAULT_MQTT_ADDR, add_flag, env_bool


def add_sim_command(commands: argparse._SubParsersAction) -> None:
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

