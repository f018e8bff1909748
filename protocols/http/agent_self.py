"""``/v1/agent/self`` and ``/v1/agent/members``: this agent described in Consul's shapes.

Consul's clients and tools read ``Config`` (Datacenter, NodeName, Version,
Server) and ``Stats`` (sections of string values: agent, build, consul,
runtime). Konsul fills the ones that mean something here and adds a
``konsul`` section for what Consul has no name for (role, replica, hub link).
"""

from __future__ import annotations

import os
import platform
import sys
import threading
from importlib import metadata
from typing import Any

from konsul.sync.checks import NODE_HEALTH_ID

# Serf's member status numbers, which Consul's /v1/agent/members reports.
MEMBER_ALIVE, MEMBER_FAILED = 1, 4
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}


def version() -> str:
    try:
        return metadata.version("konsul-edge")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def own_address(ctx) -> str:
    """The host part of the address clients reach this agent at."""
    host = ctx.advertise.rsplit(":", 1)[0].strip("[]")
    return host


def own_member(ctx) -> dict[str, Any]:
    role = "consul" if ctx.role == "hub" else "node"
    return member_json(ctx.node, own_address(ctx), ctx.site, role, MEMBER_ALIVE, {"konsul_role": ctx.role})


def member_json(name: str, address: str, site: str, role: str, status: int, extra: dict[str, str]) -> dict[str, Any]:
    return {
        "Name": name,
        "Addr": address,
        "Port": 0,  # no gossip port: members are known from the sync link, not from Serf
        "Tags": {"dc": site, "role": role, "build": version(), **extra},
        "Status": status,
        "ProtocolMin": 1, "ProtocolMax": 5, "ProtocolCur": 2,
        "DelegateMin": 2, "DelegateMax": 5, "DelegateCur": 4,
    }


def agent_members(ctx, wan: bool = False) -> list[dict[str, Any]]:
    """This agent, then whatever the agent knows of (at the hub: one member per site).

    ``wan``: Consul's WAN pool names each member ``<node>.<datacenter>``.
    """
    found = [own_member(ctx), *ctx.members()]
    if wan:
        found = [{**m, "Name": f"{m['Name']}.{m['Tags']['dc']}"} for m in found]
    return found


def agent_self(ctx) -> dict[str, Any]:
    record = ctx.replica.scope(ctx.site).catalog.node(ctx.node) if ctx.role == "edge" else None
    checks = list(ctx.checks.checks.values())
    services = [e for e in ctx.replica.scope(ctx.site).catalog.services() if e.node == ctx.node]
    status = ctx.sync_status()
    peers = status.get("Peers") or []
    return {
        "Config": {
            "Datacenter": ctx.site,
            "PrimaryDatacenter": "global",
            "NodeName": ctx.node,
            "NodeID": ctx.replica.replica_id,
            "Server": ctx.role == "hub",
            "Version": version(),
            "Revision": "konsul",
            "BuildDate": "",
        },
        "DebugConfig": {
            "Datacenter": ctx.site,
            "NodeName": ctx.node,
            "NodeID": ctx.replica.replica_id,
            "ServerMode": ctx.role == "hub",
            "ACLsEnabled": bool(getattr(ctx.acl, "enabled", True)),
            "HTTPAddrs": [f"tcp://{ctx.advertise}"],
        },
        # No network coordinates (nothing gossips): Consul's origin coordinate, and no xDS server.
        "Coord": {"Vec": [0.0] * 8, "Error": 1.5, "Adjustment": 0.0, "Height": 1e-05},
        "xDS": {"SupportedProxies": {}, "Port": -1, "Ports": {"Plaintext": -1, "TLS": -1}},
        "Member": own_member(ctx),
        "Meta": dict(record.meta) if record is not None else {},
        "Stats": {
            "agent": {
                "check_monitors": "0",
                "check_ttls": str(sum(1 for c in checks if c.definition.kind == "ttl")),
                "checks": str(sum(1 for c in checks if c.definition.check_id != NODE_HEALTH_ID)),
                "services": str(len(services)),
            },
            "build": {"prerelease": "", "revision": "konsul", "version": version(), "version_metadata": ""},
            "consul": {
                "server": str(ctx.role == "hub").lower(),
                "leader": "true",  # each agent is the authority for its own scope
                "leader_addr": ctx.advertise,
                "known_datacenters": str(len(set(ctx.replica.scopes) - {"global"}) or 1),
                "known_servers": str(1 + (1 if peers else 0)),
                "bootstrap": "false",
            },
            "runtime": {
                "arch": _GOARCH.get(platform.machine(), platform.machine()),
                "os": sys.platform,
                "version": f"python{platform.python_version()}",
                "cpu_count": str(os.cpu_count() or 1),
                "max_procs": str(os.cpu_count() or 1),
                "goroutines": str(threading.active_count()),  # threads: the nearest thing Python has
            },
            "konsul": {
                "role": ctx.role,
                "site": ctx.site,
                "replica": ctx.replica.replica_id,
                "hub_url": ctx.hub_url,
                "hub_connected": str(any(p.get("Connected") for p in peers if isinstance(p, dict))).lower(),
            },
        },
    }
