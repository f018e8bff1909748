"""Client commands for backups: ``konsul snapshot save|restore|inspect`` and ``konsul kv export|import``.

``snapshot save`` asks a running edge for a snapshot (``GET /v1/snapshot``,
a management token) and writes it to a file; ``snapshot inspect`` checks a
snapshot file whole and prints what it holds; ``snapshot restore`` writes it
into a stopped agent's data directory (``--data-dir``), or, without one,
sends it to a running agent, which loads it at its next start. The archive
format and what is in it: sync/snapshot.py, docs/operations.md.

``kv export`` / ``kv import`` move KV entries in Consul's JSON format (a list
of ``{"key", "flags", "value"}``, values base64), through the HTTP API with
the token, so ACLs apply and an import is ordinary writes: the later write wins.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

from .client_commands import Client, CommandError, api_error, is_missing, kv_path, note, out, print_json, table

IMPORT_BATCH = 64  # operations per /v1/txn (Consul's limit)
CHUNK = 64 * 1024
# An online restore is answered once the agent has checked the whole archive.
RESTORE_TIMEOUT_S = 600.0


def add_snapshot_commands(commands: argparse._SubParsersAction, sub) -> None:
    snapshots = commands.add_parser(
        "snapshot",
        help="save, inspect and restore snapshots of an edge's or a hub's state",
        description="Snapshots of an edge's state store and OSCORE contexts, or of a hub's stores (docs/operations.md).",
    )
    snapshot_commands = snapshots.add_subparsers(dest="snapshot_command", metavar="SUBCOMMAND", required=True)
    save = sub(snapshot_commands, "save", cmd_snapshot_save,
               "save a snapshot of a running edge or hub to FILE (needs a management token)",
               epilog="example:\n  konsul snapshot save backup.snap --token $KONSUL_HTTP_TOKEN")
    save.add_argument("file", metavar="FILE")
    inspect = sub(snapshot_commands, "inspect", cmd_snapshot_inspect,
                  "check a snapshot file and show what it holds")
    inspect.add_argument("file", metavar="FILE")
    restore = sub(
        snapshot_commands, "restore", cmd_snapshot_restore,
        "restore a snapshot into a stopped agent's data directory, or stage it on a running one",
        epilog="examples:\n  konsul snapshot restore backup.snap --data-dir /var/lib/konsul   (the agent stopped)\n"
        "  konsul snapshot restore backup.snap --http-addr 127.0.0.1:8500 --token ...   (loaded at its next start)",
    )
    restore.add_argument("file", metavar="FILE")
    restore.add_argument("--data-dir", default=None, help="restore offline into this data directory (no agent running on it)")
    restore.add_argument("--force", action="store_true", help="replace the data the target already holds")
    restore.add_argument("--same-replica", action="store_true",
                         help="keep the snapshot's replica id (only when the original edge will never run again)")


def add_kv_transfer_commands(kv_commands: argparse._SubParsersAction, sub) -> None:
    export = sub(kv_commands, "export", cmd_kv_export,
                 "print the keys under a prefix in Consul's JSON export format",
                 epilog="example:\n  konsul kv export app/ > app.json")
    export.add_argument("prefix", metavar="PREFIX", nargs="?", default="", help="only keys starting with PREFIX")
    imports = sub(kv_commands, "import", cmd_kv_import,
                  "write keys from Consul's JSON export format (a file, or '-' / nothing for stdin)",
                  epilog="example:\n  konsul kv import app.json --http-addr 127.0.0.1:8501")
    imports.add_argument("file", metavar="FILE", nargs="?", default="-")
    imports.add_argument("--prefix", default="", help="put PREFIX before every imported key")


# -- snapshots ----------------------------------------------------------------------


def cmd_snapshot_save(args: argparse.Namespace) -> int:
    target = Path(args.file)
    partial = target.with_name(f".{target.name}.partial")
    with Client(args) as client:
        with client.http.stream("GET", "/v1/snapshot", params=_dc(client)) as response:
            if response.status_code >= 400:
                response.read()
                raise api_error(response)
            index = response.headers.get("X-Consul-Index", "?")
            descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "wb") as file:
                for chunk in response.iter_bytes(CHUNK):
                    file.write(chunk)
                file.flush()
                os.fsync(file.fileno())
    os.replace(partial, target)
    note(f"saved snapshot to {target} (index {index}); it holds the edge's OSCORE secrets: keep it private")
    return 0


def _dc(client: Client) -> dict[str, str]:
    return {"dc": client.dc} if client.dc else {}


def cmd_snapshot_inspect(args: argparse.Namespace) -> int:
    from konsul.sync.snapshot import SnapshotInvalid, inspect

    try:
        meta = inspect(Path(args.file))
    except SnapshotInvalid as error:
        raise CommandError(f"{args.file}: {error}") from None
    except OSError as error:
        raise CommandError(f"cannot read {args.file}: {error.strerror}") from None
    if args.format == "json":
        print_json(meta)
        return 0
    counts = meta["Counts"]
    rows = [["Role", meta.get("Role", "edge")], ["Site", meta["Site"]], ["Replica", meta["Replica"]], ["Index", str(meta["Index"])],
            ["Created", meta["CreatedAt"]], ["Size", f"{meta['ArchiveBytes']} bytes"],
            ["Keys", str(counts["Keys"])], ["Services", str(counts["Services"])],
            ["Devices", str(counts["Devices"])], ["OSCORE contexts", str(counts["OscoreContexts"])]]
    if "SiteCredentials" in counts:
        rows.append(["Site credentials", str(counts["SiteCredentials"])])
    out(table(rows, ["FIELD", "VALUE"]))
    scopes = [[name, str(s["Index"]), str(s["Keys"]), str(s["Services"]), str(s["Devices"])]
              for name, s in meta["Scopes"].items()]
    out("")
    out(table(scopes, ["SCOPE", "INDEX", "KEYS", "SERVICES", "DEVICES"]))
    return 0


def cmd_snapshot_restore(args: argparse.Namespace) -> int:
    if args.data_dir is None:
        return _restore_online(args)
    from konsul.sync.errors import KonsulError
    from konsul.sync.snapshot_restore import restore

    try:
        meta = restore(Path(args.file), Path(args.data_dir), force=args.force, same_replica=args.same_replica)
    except KonsulError as error:
        raise CommandError(f"{getattr(error, 'code', 'error')}: {error}") from None
    except OSError as error:
        raise CommandError(f"cannot read {args.file}: {error.strerror}") from None
    if args.format == "json":
        print_json(meta)
    elif meta.get("Role") == "hub":
        note(f"restored a hub's {len(meta.get('ScopeIndexes', {}))} scopes into {args.data_dir} as replica "
             f"{meta['RestoredReplica']}; start the hub with --data-dir {args.data_dir}")
    else:
        note(f"restored site {meta['Site']} (index {meta['Index']}) into {args.data_dir} as replica "
             f"{meta['RestoredReplica']}; start the edge with --site {meta['Site']} --data-dir {args.data_dir}")
    return 0


def _restore_online(args: argparse.Namespace) -> int:
    try:
        body = open(args.file, "rb")  # noqa: SIM115 - closed below; sent as it is read, never whole in memory
    except OSError as error:
        raise CommandError(f"cannot read {args.file}: {error.strerror}") from None
    params = {}
    if args.force:
        params["force"] = "true"
    if args.same_replica:
        params["same-replica"] = "true"
    with body, Client(args) as client:
        found = client.call("PUT", "/v1/snapshot", params=params, content=body, read_timeout=RESTORE_TIMEOUT_S).json()
    if args.format == "json":
        print_json(found)
    elif found.get("Role") == "hub":
        note("hub snapshot checked and staged: restart the hub to load it")
    else:
        note(f"snapshot of site {found['Site']} checked and staged: restart the agent to load it")
    return 0


# -- kv export / import -------------------------------------------------------------


def cmd_kv_export(args: argparse.Namespace) -> int:
    with Client(args) as client:
        response = client.request("GET", kv_path(args.prefix), params={"recurse": "true"})
        if response.status_code >= 400 and not is_missing(response):
            raise api_error(response)
    found = [] if is_missing(response) else response.json()
    exported = [{"key": e["Key"], "flags": e.get("Flags", 0), "value": e.get("Value") or ""} for e in found]
    print_json(exported)
    return 0


def _read_entries(name: str) -> list[dict[str, Any]]:
    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text()
    except OSError as error:
        raise CommandError(f"cannot read {name}: {error.strerror}") from None
    try:
        entries = json.loads(text)
    except ValueError as error:
        raise CommandError(f"{name}: not JSON ({error})") from None
    if not isinstance(entries, list):
        raise CommandError(f"{name}: expected a JSON list of {{\"key\", \"flags\", \"value\"}} (Consul's kv export)")
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            raise CommandError(f"{name}: entry {number} has no \"key\" string")
        try:
            base64.b64decode(entry.get("value") or "", validate=True)
        except ValueError:
            raise CommandError(f"{name}: entry {number} ({entry['key']!r}): \"value\" is not base64") from None
        if not isinstance(entry.get("flags", 0), int) or entry.get("flags", 0) < 0:
            raise CommandError(f"{name}: entry {number} ({entry['key']!r}): \"flags\" is not an unsigned integer")
    return entries


def cmd_kv_import(args: argparse.Namespace) -> int:
    entries = _read_entries(args.file)
    with Client(args) as client:
        for start in range(0, len(entries), IMPORT_BATCH):
            batch = entries[start:start + IMPORT_BATCH]
            operations = [{"KV": {"Verb": "set", "Key": args.prefix + e["key"], "Value": e.get("value") or "",
                                  "Flags": e.get("flags", 0)}} for e in batch]
            client.call("PUT", "/v1/txn", body=operations)
    note(f"imported {len(entries)} keys")
    return 0


__all__ = ["add_kv_transfer_commands", "add_snapshot_commands"]
