"""The `konsul` command line: one parser, each command in a module of its own.

`konsul edge` and `konsul hub` (agent_commands.py), `konsul dev` (dev.py),
`konsul sim` (sim.py), and the client commands that talk HTTP to a running
agent (client_commands.py and the *_commands.py beside it). This package sits
above ``konsul.edge`` and ``konsul.hub``: it is the one place that imports both.
Heavy modules are imported inside the command that needs them, so ``konsul
--help`` and the client commands start fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import client_commands
from .agent_commands import add_edge_command, add_hub_command
from .audit_commands import add_audit_command
from .dev import add_dev_command
from .flags import add_flag, env_default
from .sim import add_sim_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="konsul",
        description="Konsul Edge: local-first service discovery, configuration and device registry.",
    )
    parser.add_argument("--log-level", default=env_default("--log-level", "info"), help="debug, info, warning or error (env KONSUL_LOG_LEVEL)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    add_edge_command(commands)
    add_hub_command(commands)
    add_dev_command(commands)
    add_sim_command(commands)
    add_audit_command(commands, add_flag)
    client_commands.add_commands(commands, add_flag)
    return parser


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
