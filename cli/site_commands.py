"""Client commands for the hub's sites: ``konsul sites add|list|revoke``.

A site syncs with the hub only with a credential the hub issued for it
(docs/security.md): ``add`` makes (or replaces) the site's join token and
prints it once, ``revoke`` ends it and every open session of the site, and
``list`` shows every site the hub knows, connected or not. They talk to the
hub's HTTP API (``--http-addr``, default the hub's 127.0.0.1:8700) with a
token that may write ``operator``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any
from urllib.parse import quote

from .client_commands import DEFAULT_HTTP_ADDR, Client, note, out, print_json, table

DEFAULT_HUB_ADDR = "127.0.0.1:8700"


def add_site_commands(commands: argparse._SubParsersAction, sub) -> None:
    sites = commands.add_parser(
        "sites",
        help="let sites sync with the hub: join tokens (add, list, revoke)",
        description="The sites a hub lets sync, each with its own join token (docs/security.md). "
        "These commands talk to the hub (--http-addr, default 127.0.0.1:8700).",
    )
    site_commands = sites.add_subparsers(dest="sites_command", metavar="SUBCOMMAND", required=True)
    add = sub(
        site_commands, "add", cmd_sites_add,
        "make a site's join token (replacing any earlier one) and print it once",
        epilog="example:\n  konsul sites add plant-7 --http-addr 127.0.0.1:8700\n"
        "  konsul edge --site plant-7 --hub-url http://127.0.0.1:8700 --site-token <printed token> ...",
    )
    add.add_argument("site", metavar="SITE")
    add.add_argument("--global", dest="global_access", choices=("read", "write"), default="read",
                     help="whether the site may also change fleet-wide (global) KV, services and devices; "
                     "default read (fleet-wide ACL records are written at the hub only, always)")
    add.add_argument("--description", default="", help="a note for operators")
    sub(site_commands, "list", cmd_sites_list, "list every site the hub knows: credential, connection, lag")
    revoke = sub(site_commands, "revoke", cmd_sites_revoke,
                 "revoke a site's join token and end its open sessions")
    revoke.add_argument("site", metavar="SITE")


def _hub(args: argparse.Namespace) -> argparse.Namespace:
    """The hub's address: the client default (an edge's port) becomes the hub's."""
    if args.http_addr == DEFAULT_HTTP_ADDR and "KONSUL_HTTP_ADDR" not in os.environ:
        args.http_addr = DEFAULT_HUB_ADDR
    return args


def _site_path(site: str) -> str:
    return "/v1/sites/" + quote(site, safe="")


def cmd_sites_add(args: argparse.Namespace) -> int:
    body = {"Global": args.global_access, "Description": args.description}
    with Client(_hub(args)) as client:
        found = client.call("PUT", _site_path(args.site), body=body).json()
    if args.format == "json":
        print_json(found)
    else:
        out(found["JoinToken"])
        note(f"site {found['Site']}: join token shown once (global: {found['Global']}); start its edge with "
             "--site-token <token> (or KONSUL_SITE_TOKEN)")
    return 0


def cmd_sites_list(args: argparse.Namespace) -> int:
    with Client(_hub(args)) as client:
        found: list[dict[str, Any]] = client.call("GET", "/v1/sites").json()
    if args.format == "json":
        print_json(found)
        return 0
    rows = []
    for site in found:
        credential = site.get("Credential") or {}
        state = "none" if not credential else "revoked" if credential.get("Revoked") else "join-token"
        rows.append([
            site["Site"], state, credential.get("Global", "-"), "yes" if site["Connected"] else "no",
            site["LastSeen"] or "never", str(site["LagSeconds"]),
        ])
    out(table(rows, ["SITE", "CREDENTIAL", "GLOBAL", "CONNECTED", "LAST SEEN", "LAG (S)"]))
    return 0


def cmd_sites_revoke(args: argparse.Namespace) -> int:
    with Client(_hub(args)) as client:
        found = client.call("DELETE", _site_path(args.site)).json()
    if args.format == "json":
        print_json(found)
    else:
        note(f"site {found['Site']}: join token revoked; its open sessions were ended")
    return 0
