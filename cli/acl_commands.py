"""Client commands for access control: ``konsul acl bootstrap|token|policy ...``.

They speak Consul's ``/v1/acl`` API with the connection flags, token, output
formats and exit codes of the other client commands (``client_commands.py``).
A token's SecretID is printed by ``bootstrap`` and ``token create`` only: the
agent keeps its hash, so it cannot be shown again (``token self`` echoes the
secret the command was given).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from .client_commands import Client, CommandError, UsageError, note, out, print_json, read_value, table

Sub = Callable[..., argparse.ArgumentParser]

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def add_acl_commands(commands: argparse._SubParsersAction, sub: Sub) -> None:
    acl = commands.add_parser(
        "acl",
        help="bootstrap access control; manage ACL tokens and policies",
        description="Access control of a Konsul agent: tokens and policies (Consul's /v1/acl API; docs/acl.md).",
    )
    acl_commands = acl.add_subparsers(dest="acl_command", metavar="SUBCOMMAND", required=True)

    sub(
        acl_commands,
        "bootstrap",
        cmd_acl_bootstrap,
        "create the first management token (once per fleet) and print its SecretID",
        "Create the management token, once for the whole replicated state, and print its\n"
        "SecretID. Keep it safe: it is shown only now, and allows everything.",
        "example:\n  export KONSUL_HTTP_TOKEN=$(konsul acl bootstrap --format json | jq -r .SecretID)",
    )

    # -- tokens
    token = acl_commands.add_parser("token", help="create, read, list, update and delete ACL tokens",
                                    description="ACL tokens: each links policies; a request carries its SecretID.")
    token_commands = token.add_subparsers(dest="acl_token_command", metavar="SUBCOMMAND", required=True)

    create = sub(
        token_commands,
        "create",
        cmd_token_create,
        "create a token and print its SecretID (shown only this once)",
        epilog="example:\n  konsul acl token create --description 'app deploy' --policy-name app-write",
    )
    _token_fields(create)
    create.add_argument("--local", action="store_true", help="a token of this site only, not replicated to the fleet")

    read = sub(token_commands, "read", cmd_token_read, "show a token (its SecretID is hidden)")
    read.add_argument("accessor_id", metavar="ACCESSOR_ID")

    sub(token_commands, "self", cmd_token_self, "show the token this command is given (--token or the environment)")
    sub(token_commands, "list", cmd_token_list, "list every token (SecretIDs hidden)")

    update = sub(
        token_commands,
        "update",
        cmd_token_update,
        "change a token's description or policies",
        "Change a token. Fields not given are kept; --policy-name/--policy-id, when given,\n"
        "replace its policies (all of them: name each one it should keep).",
    )
    update.add_argument("accessor_id", metavar="ACCESSOR_ID")
    _token_fields(update)

    delete = sub(token_commands, "delete", cmd_token_delete, "revoke a token (every edge refuses it once the change arrives)")
    delete.add_argument("accessor_id", metavar="ACCESSOR_ID")

    # -- policies
    policy = acl_commands.add_parser("policy", help="create, read, list, update and delete ACL policies",
                                     description="ACL policies: rules in Consul's language (HCL or JSON).")
    policy_commands = policy.add_subparsers(dest="acl_policy_command", metavar="SUBCOMMAND", required=True)

    pcreate = sub(
        policy_commands,
        "create",
        cmd_policy_create,
        "create a policy",
        "Create a policy. --rules is the rules text (HCL or JSON), '@FILE' reads it from FILE,\n"
        "'-' from stdin.",
        "examples:\n"
        "  konsul acl policy create --name app-write --rules 'key_prefix \"app/\" { policy = \"write\" }'\n"
        "  konsul acl policy create --name ops --description 'operators' --rules @ops.hcl",
    )
    _policy_fields(pcreate, name_required=True)

    pread = sub(policy_commands, "read", cmd_policy_read, "show a policy and its rules")
    pread.add_argument("policy", metavar="ID_OR_NAME")
    sub(policy_commands, "list", cmd_policy_list, "list every policy")

    pupdate = sub(
        policy_commands,
        "update",
        cmd_policy_update,
        "change a policy's name, description, rules or datacenters (fields not given are kept)",
    )
    pupdate.add_argument("policy", metavar="ID_OR_NAME")
    _policy_fields(pupdate, name_required=False)

    pdelete = sub(policy_commands, "delete", cmd_policy_delete, "delete a policy (tokens linking it lose its rules)")
    pdelete.add_argument("policy", metavar="ID_OR_NAME")


def _token_fields(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--description", default=None, help="what the token is for")
    parser.add_argument("--policy-name", action="append", default=[], metavar="NAME",
                        help="link the policy named NAME (repeat for several)")
    parser.add_argument("--policy-id", action="append", default=[], metavar="ID",
                        help="link the policy with this ID (repeat for several)")


def _policy_fields(parser: argparse.ArgumentParser, name_required: bool) -> None:
    parser.add_argument("--name", default=None, required=name_required, help="the policy's name (unique)")
    parser.add_argument("--description", default=None, help="what the policy is for")
    parser.add_argument("--rules", default=None, metavar="RULES",
                        help="the rules, HCL or JSON; '@FILE' reads a file, '-' stdin")
    parser.add_argument("--datacenter", action="append", default=None, metavar="SITE",
                        help="apply the policy at this site only (repeat for several; default: everywhere)")


# -- output -------------------------------------------------------------------------


def _policy_links(token: dict) -> list[str]:
    return [f"{link.get('ID')} - {link.get('Name')}" for link in token.get("Policies") or []]


def show_token(token: dict, args: argparse.Namespace) -> None:
    if args.format == "json":
        print_json(token)
        return
    rows = [
        ["AccessorID:", token.get("AccessorID", "")],
        ["SecretID:", token.get("SecretID", "")],
        ["Description:", token.get("Description") or ""],
        ["Local:", "true" if token.get("Local") else "false"],
        ["Create Time:", token.get("CreateTime", "")],
    ]
    links = _policy_links(token)
    out(table(rows) + "\nPolicies:" + "".join(f"\n   {link}" for link in links) + ("" if links else " none"))


def show_policy(policy: dict, args: argparse.Namespace) -> None:
    if args.format == "json":
        print_json(policy)
        return
    rows = [
        ["ID:", policy.get("ID", "")],
        ["Name:", policy.get("Name", "")],
        ["Description:", policy.get("Description") or ""],
        ["Datacenters:", ", ".join(policy.get("Datacenters") or []) or "all"],
    ]
    out(table(rows) + "\nRules:\n" + ((policy.get("Rules") or "").rstrip("\n") or "(none)"))


# -- commands -----------------------------------------------------------------------


def cmd_acl_bootstrap(args: argparse.Namespace) -> int:
    with Client(args) as client:
        token = client.call("PUT", "/v1/acl/bootstrap").json()
    show_token(token, args)
    if args.format == "table":
        note("this SecretID is shown only now; store it safely (e.g. export KONSUL_HTTP_TOKEN=<SecretID>)")
    return 0


def _policy_links_from(args: argparse.Namespace) -> list[dict] | None:
    links = [{"Name": name} for name in args.policy_name] + [{"ID": pid} for pid in args.policy_id]
    return links or None


def cmd_token_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"Description": args.description or "", "Local": args.local}
    links = _policy_links_from(args)
    if links:
        body["Policies"] = links
    with Client(args) as client:
        token = client.call("PUT", "/v1/acl/token", body=body).json()
    show_token(token, args)
    return 0


def _token_path(accessor_id: str) -> str:
    return "/v1/acl/token/" + quote(accessor_id, safe="")


def cmd_token_read(args: argparse.Namespace) -> int:
    with Client(args) as client:
        token = client.call("GET", _token_path(args.accessor_id)).json()
    show_token(token, args)
    return 0


def cmd_token_self(args: argparse.Namespace) -> int:
    with Client(args) as client:
        token = client.call("GET", "/v1/acl/token/self").json()
    show_token(token, args)
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    with Client(args) as client:
        tokens = client.call("GET", "/v1/acl/tokens").json()
    if args.format == "json":
        print_json(tokens)
        return 0
    rows = [
        [
            token.get("AccessorID", ""),
            token.get("Description") or "-",
            ",".join(link.get("Name", "") for link in token.get("Policies") or []) or "-",
            "local" if token.get("Local") else "global",
        ]
        for token in tokens
    ]
    out(table(rows, ["ACCESSOR ID", "DESCRIPTION", "POLICIES", "SCOPE"]))
    return 0


def cmd_token_update(args: argparse.Namespace) -> int:
    with Client(args) as client:
        current = client.call("GET", _token_path(args.accessor_id)).json()
        links = _policy_links_from(args)
        body = {
            "AccessorID": current["AccessorID"],
            "Description": current.get("Description", "") if args.description is None else args.description,
            "Policies": links if links is not None else [{"ID": link["ID"]} for link in current.get("Policies") or []],
            "Local": current.get("Local", False),
        }
        token = client.call("PUT", _token_path(args.accessor_id), body=body).json()
    show_token(token, args)
    return 0


def cmd_token_delete(args: argparse.Namespace) -> int:
    with Client(args) as client:
        done = client.call("DELETE", _token_path(args.accessor_id)).json()
    if done is not True:
        raise CommandError(f"token {args.accessor_id} was not deleted (the agent answered {done!r})")
    if args.format == "json":
        print_json(True)
    else:
        out(f"Token {args.accessor_id} deleted")
    return 0


def _rules(spec: str | None) -> str | None:
    if spec is None:
        return None
    raw = read_value(spec)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError("the rules are not UTF-8 text") from None


def _find_policy(client: Client, given: str) -> dict:
    """A policy by ID (a UUID) or else by name."""
    path = "/v1/acl/policy/" + ("" if _UUID.fullmatch(given) else "name/") + quote(given, safe="")
    return client.call("GET", path).json()


def cmd_policy_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"Name": args.name, "Description": args.description or "", "Rules": _rules(args.rules) or ""}
    if args.datacenter:
        body["Datacenters"] = args.datacenter
    with Client(args) as client:
        policy = client.call("PUT", "/v1/acl/policy", body=body).json()
    show_policy(policy, args)
    return 0


def cmd_policy_read(args: argparse.Namespace) -> int:
    with Client(args) as client:
        policy = _find_policy(client, args.policy)
    show_policy(policy, args)
    return 0


def cmd_policy_list(args: argparse.Namespace) -> int:
    with Client(args) as client:
        policies = client.call("GET", "/v1/acl/policies").json()
    if args.format == "json":
        print_json(policies)
        return 0
    rows = [[p.get("ID", ""), p.get("Name", ""), p.get("Description") or "-"] for p in policies]
    out(table(rows, ["ID", "NAME", "DESCRIPTION"]))
    return 0


def cmd_policy_update(args: argparse.Namespace) -> int:
    if args.name is None and args.description is None and args.rules is None and args.datacenter is None:
        raise UsageError("nothing to change: give --name, --description, --rules or --datacenter")
    rules = _rules(args.rules)
    with Client(args) as client:
        current = _find_policy(client, args.policy)
        body = {
            "ID": current["ID"],
            "Name": current["Name"] if args.name is None else args.name,
            "Description": current.get("Description", "") if args.description is None else args.description,
            "Rules": current.get("Rules", "") if rules is None else rules,
            "Datacenters": current.get("Datacenters") if args.datacenter is None else args.datacenter,
        }
        policy = client.call("PUT", "/v1/acl/policy/" + quote(current["ID"], safe=""), body=body).json()
    show_policy(policy, args)
    return 0


def cmd_policy_delete(args: argparse.Namespace) -> int:
    with Client(args) as client:
        policy = _find_policy(client, args.policy)
        done = client.call("DELETE", "/v1/acl/policy/" + quote(policy["ID"], safe="")).json()
    if done is not True:
        raise CommandError(f"policy {args.policy} was not deleted (the agent answered {done!r})")
    if args.format == "json":
        print_json(True)
    else:
        out(f"Policy {policy['Name']} ({policy['ID']}) deleted")
    return 0
