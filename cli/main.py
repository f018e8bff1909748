"""The `konsul` command line: one parser, each command in a module of its own.

`konsul edge` and `konsul hub` (agent_commands.py), `konsul dev` (dev.py),
`konsul sim` (sim.py), and the client commands that talk HTTP to a running
agent (client_commands.py and the *_commands.py beside it). This package sits
above ``konsul.edge`` and ``konsul.hub``: it is the one place that imports both.
Heavy modules are imported inside the command that needs them, so ``konsul
--help`` and the client commands start fast; and `konsul edge` / `konsul hub`
build only their own subcommand, so a long-running agent does not carry the
client commands' modules and parsers (docs/benchmarks.md, "Edge memory").
"""

from __future__ import annotations

import argparse
import logging
import sys

from .agent_commands import add_edge_command, add_hub_command
from .flags import add_flag, env_default

# The commands that run an agent: for these the parser holds only that command.
AGENT_COMMANDS = {"edge": add_edge_command, "hub": add_hub_command}


def command_named(argv: list[str]) -> str | None:
    """The COMMAND word of ``argv`` (after the global ``--log-level``), or None."""
    args = iter(argv)
    for arg in args:
        if arg == "--log-level":
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole `konsul` parser; for an agent ``command`` (edge, hub), one with only that command."""
    parser = argparse.ArgumentParser(
        prog="konsul",
        description="Konsul Edge: local-first service discovery, configuration and device registry.",
    )
    parser.add_argument("--log-level", default=env_default("--log-level", "info"), help="debug, info, warning or error (env KONSUL_LOG_LEVEL)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    if command in AGENT_COMMANDS:
        AGENT_COMMANDS[command](commands)
        return parser
    from . import client_commands
    from .audit_commands import add_audit_command
    from .dev import add_dev_command
    from .sim import add_sim_command

    add_edge_command(commands)
    add_hub_command(commands)
    add_dev_command(commands)
    add_sim_command(commands)
    add_audit_command(commands, add_flag)
    client_commands.add_commands(commands, add_flag)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(command_named(sys.argv[1:] if argv is None else argv))
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
