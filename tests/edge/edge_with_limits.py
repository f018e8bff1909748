"""Run `konsul edge` with some of its NetworkLimits changed, for tests of those limits.

Usage: ``python edge_with_limits.py '{"http_body_timeout_s": 0.5}' edge --site ...``.
The edge is the real one, started by the real command line; only the limits
its configuration carries are replaced, so a test need not hold hundreds of
connections or wait half a minute to see a bound act.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from konsul.cli import main as cli
from konsul.edge import agent


def main() -> int:
    overrides = json.loads(sys.argv[1])
    run_edge = agent.run_edge

    async def run_edge_with_limits(config, **kwargs):
        config.limits = dataclasses.replace(config.limits, **overrides)
        await run_edge(config, **kwargs)

    agent.run_edge = run_edge_with_limits  # cmd_edge (cli/agent_commands.py) looks it up when it runs
    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
