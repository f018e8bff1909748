"""``konsul audit tail``: print an agent's audit log (protocols/audit.py), optionally following it.

It reads the file on this machine (the agent writes ``<data-dir>/audit.log``
unless started with ``--audit-log``), so it works while the agent is down too.
Lines are shown readable by default, or as the stored JSON with ``--json``.
Following survives rotation: when the file is replaced or cut, it reads the new
one from its start.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .client_commands import CommandError, UsageError, note, out, run_command

FOLLOW_POLL_S = 0.25
_BLOCK = 64 * 1024


def add_audit_command(commands: argparse._SubParsersAction, add_flag: Callable[..., None]) -> None:
    audit = commands.add_parser(
        "audit",
        help="read an agent's audit log",
        description="The audit log of an edge or hub on this machine: every write and every refusal.",
    )
    audit_commands = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)
    tail = audit_commands.add_parser(
        "tail",
        help="print the newest audit events (and, with --follow, new ones as they come)",
        description="Print the newest audit events. Exits 1 when the log does not exist.",
        epilog="examples:\n"
        "  konsul audit tail --data-dir /var/lib/konsul --lines 50\n"
        "  konsul audit tail --file /var/log/konsul/audit.log --follow --json | jq 'select(.result != \"allowed\")'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = tail.add_mutually_exclusive_group()
    add_flag(where, "--data-dir", "the agent's data directory (the log is <data-dir>/audit.log)")
    where.add_argument("--file", default=None, metavar="PATH", help="the audit log file (if --audit-log put it elsewhere)")
    tail.add_argument("--lines", "-n", type=int, default=10, metavar="N", help="how many of the newest events (default 10)")
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing new events until Ctrl-C")
    tail.add_argument("--json", action="store_true", help="print each event as its stored JSON line")
    tail.set_defaults(run=_runner(cmd_audit_tail, tail))


def _runner(command: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser):
    # Ctrl-C is how `--follow` is meant to end: not an interruption.
    return lambda args: run_command(command, args, parser, interrupted=0)


def log_path(args: argparse.Namespace) -> Path:
    if args.file:
        return Path(args.file)
    if args.data_dir:
        return Path(args.data_dir) / "audit.log"
    raise UsageError("name the log: --data-dir DIR (its audit.log) or --file PATH")


def show(line: bytes, as_json: bool) -> str:
    text = line.decode("utf-8", "replace").rstrip("\n")
    if as_json:
        return text
    try:
        event = json.loads(text)
        if not isinstance(event, dict):
            raise ValueError
    except ValueError:
        return text  # not ours (or cut by a crash mid-line): shown as it is
    reason = f"  ({event['reason']})" if event.get("reason") else ""
    return (
        f"{event.get('time', '')}  {event.get('result', ''):<12} {event.get('interface', ''):<5} "
        f"{event.get('operation', '')}  {event.get('resource', '')}  "
        f"by {event.get('accessor', '')} from {event.get('source', '')}{reason}"
    )


def last_lines(path: Path, count: int, end: int) -> list[bytes]:
    """The last ``count`` lines of the log up to offset ``end``, reaching into rotated files (``path.1`` ...)."""
    lines: list[bytes] = []
    number = 0
    current = path
    while len(lines) < count and current.exists():
        lines = _tail_of(current, count - len(lines), end if number == 0 else None) + lines
        number += 1
        current = path.with_name(f"{path.name}.{number}")
    return lines


def _tail_of(path: Path, count: int, end: int | None) -> list[bytes]:
    """The last ``count`` complete lines of one file before ``end`` (None: its end), read from the back."""
    with open(path, "rb") as file:
        if end is None:
            end = file.seek(0, os.SEEK_END)
        data = b""
        position = end
        while position > 0 and data.count(b"\n") <= count:
            step = min(_BLOCK, position)
            position -= step
            file.seek(position)
            data = file.read(step) + data
    lines = data.splitlines(keepends=True)
    if position > 0:
        lines = lines[1:]  # the first one may be cut
    return lines[-count:] if count else []


def follow(path: Path, start: int) -> Iterator[bytes]:
    """New complete lines of ``path`` from offset ``start``, across rotations, forever.

    Like ``tail -F``, it polls; a file rotated twice between two polls (more
    than ``--audit-max-bytes`` written in ``FOLLOW_POLL_S``) is skipped: read
    it with ``konsul audit tail --file <log>.1``.
    """
    file = open(path, "rb")
    file.seek(start)
    identity = os.fstat(file.fileno()).st_ino
    partial = b""
    try:
        while True:
            chunk = file.read(_BLOCK)
            if chunk:
                partial += chunk
                *complete, partial = partial.split(b"\n")
                for line in complete:
                    yield line + b"\n"
                continue
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None  # between rename and re-creation
            if now is not None and (now.st_ino != identity or now.st_size < file.tell()):
                # Rotated (or cut): what reached the old file before the rename is
                # still to be read through this descriptor; then the new file.
                rest = partial + file.read()
                for line in rest.splitlines(keepends=True):
                    yield line if line.endswith(b"\n") else line + b"\n"
                file.close()
                file = open(path, "rb")
                identity = os.fstat(file.fileno()).st_ino
                partial = b""
                continue
            time.sleep(FOLLOW_POLL_S)
    finally:
        file.close()


def cmd_audit_tail(args: argparse.Namespace) -> int:
    if args.lines < 0:
        raise UsageError(f"--lines must not be negative, got {args.lines}")
    path = log_path(args)
    if not path.exists():
        raise CommandError(
            f"no audit log at {path}; is the agent's --audit-log elsewhere (give --file), or '-' or 'off'?"
        )
    try:
        end = path.stat().st_size
        for line in last_lines(path, args.lines, end):
            out(show(line, args.json))
        if not args.follow:
            return 0

        def stop(signum, frame) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        note(f"following {path} (Ctrl-C to stop)")
        for line in follow(path, end):
            out(show(line, args.json))
    except PermissionError:
        raise CommandError(f"cannot read {path}: permission denied (the log is readable by the agent's user only)") from None
    return 0
