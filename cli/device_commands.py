"""Client commands for the device registry: ``konsul devices list|show|create|delete|desired|telemetry``.

They use the same connection flags, output formats and exit codes as the other
client commands (``client_commands.py``); against the hub, ``--dc <site>``
names the device's site, and ``devices list`` without it lists the fleet.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from .client_commands import Client, UsageError, note, out, print_json, table

Sub = Callable[..., argparse.ArgumentParser]


def add_device_commands(commands: argparse._SubParsersAction, sub: Sub) -> None:
    devices = commands.add_parser(
        "devices",
        help="register devices, read their state, set their desired state",
        description="The device registry of a Konsul agent: records, tokens, twins and telemetry.",
    )
    device_commands = devices.add_subparsers(dest="devices_command", metavar="SUBCOMMAND", required=True)

    listing = sub(device_commands, "list", cmd_devices_list, "list devices, with presence")
    listing.add_argument("--type", default=None, help="only devices of this type")
    listing.add_argument("--tag", action="append", default=[], metavar="TAG", help="only devices with this tag (repeat: all of them)")
    listing.add_argument("--online", action="store_true", help="only devices connected now")

    show = sub(device_commands, "show", cmd_devices_show, "show a device: its record, presence and twin")
    show.add_argument("device_id", metavar="ID")

    create = sub(
        device_commands,
        "create",
        cmd_devices_create,
        "register a device (or update one) and print its token",
        "Register a device, or update an existing one. A new device's token is printed once:\n"
        "the agent keeps only its hash. --rotate-token issues a new one for an existing device.",
        "examples:\n"
        "  konsul devices create pump-7 --type pump --tag hall-2 --kv-read config/pumps/\n"
        "  konsul devices create gw-1 --kv-read '' --policy-name pumps-report   (docs/acl.md)\n"
        "  konsul devices create pump-7 --rotate-token",
    )
    create.add_argument("device_id", metavar="ID")
    create.add_argument("--type", default=None, help="the device type")
    create.add_argument("--tag", action="append", default=None, metavar="TAG", help="a tag (repeat for several)")
    create.add_argument("--attr", action="append", default=[], metavar="KEY=VALUE", help="an attribute (repeat for several)")
    create.add_argument("--firmware", default=None, help="the firmware version")
    create.add_argument("--kv-read", action="append", default=None, metavar="PREFIX", help="a KV prefix it may read")
    create.add_argument("--kv-write", action="append", default=None, metavar="PREFIX", help="a KV prefix it may write")
    create.add_argument("--policy-name", action="append", default=None, metavar="NAME",
                        help="an ACL policy the device links (repeat for several; replaces its policies)")
    create.add_argument("--policy-id", action="append", default=None, metavar="ID",
                        help="an ACL policy the device links, by ID (repeat for several)")
    create.add_argument("--no-policies", action="store_true", help="unlink every ACL policy of the device")
    create.add_argument("--rotate-token", action="store_true",
                        help="issue a new token (the old one stops working; its sessions end)")

    delete = sub(device_commands, "delete", cmd_devices_delete, "remove a device and its twin")
    delete.add_argument("device_id", metavar="ID")

    desired = sub(
        device_commands,
        "desired",
        cmd_devices_desired,
        "show or change a device's desired state",
        "Show a device's desired state, or change fields of it. Values are JSON where they\n"
        "parse as JSON (5, true, \"x\", {...}), else strings. Other fields are kept unless --replace.",
        "examples:\n"
        "  konsul devices desired pump-7                      (show it)\n"
        "  konsul devices desired pump-7 interval=30 led=true\n"
        "  konsul devices desired pump-7 --unset mode\n"
        "  konsul devices desired pump-7 --replace interval=5",
    )
    desired.add_argument("device_id", metavar="ID")
    desired.add_argument("fields", nargs="*", metavar="FIELD=VALUE", help="fields to set")
    desired.add_argument("--unset", action="append", default=[], metavar="FIELD", help="a field to remove")
    desired.add_argument("--replace", action="store_true", help="the given fields become the whole desired state")

    telemetry = sub(device_commands, "telemetry", cmd_devices_telemetry, "show a device's newest telemetry samples")
    telemetry.add_argument("device_id", metavar="ID")
    telemetry.add_argument("--limit", type=int, default=20, help="how many samples (default 20)")
    telemetry.add_argument("--since", default=None, help="only samples from this time on (unix seconds or RFC 3339)")


def _path(device_id: str, suffix: str = "") -> str:
    return f"/v1/devices/{quote(device_id, safe='')}{suffix}"


def _when(seconds: float | None) -> str:
    return "-" if seconds is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def cmd_devices_list(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {}
    if args.type:
        params["type"] = args.type
    if args.online:
        params["online"] = "true"
    with Client(args) as client:
        query = "&".join(f"tag={quote(tag)}" for tag in args.tag)
        devices = client.call("GET", "/v1/devices" + (f"?{query}" if query else ""), params=params).json()
    if args.format == "json":
        print_json(devices)
        return 0
    if not devices:
        note("no devices match")
        return 0
    rows = [
        [
            d["ID"],
            d.get("Site") or "-",
            d.get("Type") or "-",
            "online" if d.get("Online") else "offline",
            d.get("Protocol") or "-",
            d.get("LastSeen") or "-",
            ",".join(d.get("Tags") or []) or "-",
        ]
        for d in devices
    ]
    out(table(rows, ["ID", "SITE", "TYPE", "STATUS", "PROTOCOL", "LAST SEEN", "TAGS"]))
    return 0


def cmd_devices_show(args: argparse.Namespace) -> int:
    with Client(args) as client:
        record = client.call("GET", _path(args.device_id)).json()
        twin = client.call("GET", _path(args.device_id, "/twin")).json()
    if args.format == "json":
        print_json({**record, "Twin": twin})
        return 0
    rows = [
        ["ID", record["ID"]],
        ["Site", record.get("Site") or "-"],
        ["Type", record.get("Type") or "-"],
        ["Tags", ",".join(record.get("Tags") or []) or "-"],
        ["Firmware", record.get("Firmware") or "-"],
        ["Status", ("online" if record.get("Online") else "offline") + (f" ({record['Protocol']})" if record.get("Protocol") else "")],
        ["Last seen", record.get("LastSeen") or "-"],
        ["KV read", ",".join(repr(p) for p in record.get("KVRead") or []) or "-"],
        ["KV write", ",".join(repr(p) for p in record.get("KVWrite") or []) or "-"],
        ["Policies", ",".join(link.get("Name") or link["ID"] for link in record.get("Policies") or []) or "-"],
        ["Desired", json.dumps(twin["Desired"], sort_keys=True)],
        ["Reported", json.dumps(twin["Reported"], sort_keys=True)],
        ["Not applied yet", json.dumps(twin["Delta"], sort_keys=True)],
    ]
    for conflict in twin["Conflicts"]:
        rows.append(["Conflict", f"{conflict['Side']}.{conflict['Field']}: lost {json.dumps(conflict['Value'])}"])
    out(table(rows))
    return 0


def cmd_devices_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    for name, value in (("Type", args.type), ("Tags", args.tag), ("Firmware", args.firmware),
                        ("KVRead", args.kv_read), ("KVWrite", args.kv_write)):
        if value is not None:
            body[name] = value
    if args.no_policies and (args.policy_name or args.policy_id):
        raise UsageError("--no-policies unlinks every policy; drop --policy-name/--policy-id, or it")
    if args.policy_name or args.policy_id or args.no_policies:
        body["Policies"] = [{"Name": name} for name in args.policy_name or []] + [{"ID": i} for i in args.policy_id or []]
    if args.attr:
        body["Attributes"] = {key: value for key, value in (_split(spec, "--attr") for spec in args.attr)}
    params = {"rotate-token": ""} if args.rotate_token else None
    with Client(args) as client:
        record = client.call("PUT", _path(args.device_id), body=body, params=params).json()
    if args.format == "json":
        print_json(record)
    elif "Token" in record:
        out(f"device {record['ID']} in site {record.get('Site')}; its token (shown only this once):")
        out(record["Token"])
    else:
        out(f"device {record['ID']} updated; its token is unchanged")
    return 0


def cmd_devices_delete(args: argparse.Namespace) -> int:
    with Client(args) as client:
        client.call("DELETE", _path(args.device_id))
    note(f"device {args.device_id} deleted")
    return 0


def cmd_devices_desired(args: argparse.Namespace) -> int:
    changes: dict[str, Any] = dict(_split(spec, "FIELD=VALUE", parse_json=True) for spec in args.fields)
    for name in args.unset:
        if name in changes:
            raise UsageError(f"{name} is both set and --unset")
        changes[name] = None
    if args.replace and args.unset:
        raise UsageError("--replace already removes every field not given; drop --unset")
    with Client(args) as client:
        if not changes and not args.replace:
            state = client.call("GET", _path(args.device_id, "/desired")).json()
        else:
            method = "PUT" if args.replace else "PATCH"
            state = client.call(method, _path(args.device_id, "/desired"), body=changes).json()
    if args.format == "json":
        print_json(state)
    else:
        out(json.dumps(state, indent=2, sort_keys=True))
    return 0


def cmd_devices_telemetry(args: argparse.Namespace) -> int:
    params = {"limit": str(args.limit)}
    if args.since:
        params["since"] = args.since
    with Client(args) as client:
        samples = client.call("GET", _path(args.device_id, "/telemetry"), params=params).json()
    if args.format == "json":
        print_json(samples)
        return 0
    if not samples:
        note("no samples")
        return 0
    rows = [[_when(s["Time"]), str(s["Seq"]), json.dumps(s["Data"], sort_keys=True)] for s in samples]
    out(table(rows, ["TIME (UTC)", "SEQ", "DATA"]))
    return 0


def _split(spec: str, what: str, parse_json: bool = False) -> tuple[str, Any]:
    key, sep, value = spec.partition("=")
    if not sep or not key:
        raise UsageError(f"{what} takes NAME=VALUE, not {spec!r}")
    if parse_json:
        try:
            return key, json.loads(value)
        except ValueError:
            return key, value
    return key, value
