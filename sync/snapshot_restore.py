"""Restoring a snapshot (snapshot.py has the format) into a data directory no agent runs on.

The whole archive is checked before the target is touched; a directory that
holds data is replaced only when forced; the restored store gets a new replica
id unless asked to keep it; OSCORE contexts come back with their sender
sequence numbers moved ahead and their replay windows unknown (snapshot.py's
theory of operation says why).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from .errors import KonsulError, StoreError
from .snapshot import (
    OSCORE_DIR, OSCORE_SEQUENCE_MARGIN, PENDING_NAME, PRIVATE_FILE_MODE, STATE_NAME, RestoreRefused,
    SnapshotInvalid, archive_role, backup_database, check, database_summary,
)
from .snapshot_hub import hub_holds_data, install_hub, is_hub_dir
from .store import DB_NAME, fsync_directory, lock_directory

__all__ = ["apply_pending", "holds_data", "restore"]


def holds_data(data_dir: Path) -> bool:
    """Whether ``data_dir`` has a state store with any key, service or device in it (a hub's: any scope's)."""
    if not (data_dir / DB_NAME).exists():
        return False
    work = Path(tempfile.mkdtemp(prefix=".restore-check-", dir=data_dir))
    try:
        if is_hub_dir(data_dir):
            return hub_holds_data(data_dir, work)
        copy = work / DB_NAME
        try:
            backup_database(data_dir / DB_NAME, copy)
            scopes = database_summary(copy)["Scopes"]
        except (sqlite3.Error, KonsulError):
            return True  # damaged: treat as data, never overwrite it unasked
        return any(s["Keys"] or s["Services"] or s["Devices"] for s in scopes.values())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def restore(archive_path: Path, data_dir: Path, *, force: bool = False, same_replica: bool = False) -> dict[str, Any]:
    """Restore the snapshot at ``archive_path`` into ``data_dir`` (no agent may be running on it).

    Raises:
        SnapshotInvalid: the archive is not an intact snapshot; nothing changed.
        RestoreRefused: ``data_dir`` holds data and ``force`` is not set.
        StoreLocked: an agent runs on ``data_dir``.
    """
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock_fd = lock_directory(data_dir)
    work = Path(tempfile.mkdtemp(prefix=".restore-", dir=data_dir))
    try:
        with open(archive_path, "rb") as archive:
            meta = check(archive, work)
        role = archive_role(meta)
        if role == "edge" and is_hub_dir(data_dir):
            raise SnapshotInvalid(f"the snapshot is an edge's and {data_dir} is a hub's data directory: restore "
                                  "an edge's snapshot into an edge's (or an empty) data directory")
        if role == "hub" and (data_dir / OSCORE_DIR).exists():
            raise SnapshotInvalid(f"the snapshot is a hub's and {data_dir} is an edge's data directory: restore "
                                  "a hub's snapshot into a hub's (or an empty) data directory")
        os.close(lock_fd)  # holds_data opens the store, which takes the lock itself
        lock_fd = -1
        if not force and holds_data(data_dir):
            raise RestoreRefused(
                f"{data_dir} already holds keys, services or devices; restore into an empty data "
                "directory, or pass --force to replace them"
            )
        lock_fd = lock_directory(data_dir)
        state = work / STATE_NAME
        replica = meta.get("Replica")
        if not same_replica:
            replica = _new_replica_id(state)
        if role == "hub":
            install_hub(work, data_dir, _install)
        else:
            _install(state, data_dir)
            _install_oscore(work / OSCORE_DIR, data_dir / OSCORE_DIR)
        return {**meta, "RestoredReplica": replica}
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if lock_fd >= 0:
            os.close(lock_fd)


def _new_replica_id(state: Path) -> str:
    replica = secrets.token_hex(6)
    conn = sqlite3.connect(state, isolation_level=None)
    try:
        conn.execute("INSERT OR REPLACE INTO meta(name, value) VALUES ('replica_id', ?)", (replica,))
    finally:
        conn.close()
    return replica


def _install(state: Path, data_dir: Path) -> None:
    """Put ``state`` in place of the data directory's store, crash-safely."""
    target = data_dir / DB_NAME
    staged = data_dir / (DB_NAME + ".restoring")
    shutil.copyfile(state, staged)
    os.chmod(staged, PRIVATE_FILE_MODE)
    with open(staged, "rb") as file:
        os.fsync(file.fileno())
    # The old WAL belongs to the old database: it must never be replayed onto the new one.
    for suffix in ("-wal", "-shm", "-journal"):
        try:
            os.unlink(f"{target}{suffix}")
        except FileNotFoundError:
            pass
    os.replace(staged, target)
    fsync_directory(data_dir)


def _install_oscore(source: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    if not source.is_dir():
        return
    target.mkdir(mode=0o700)
    for context in sorted(source.iterdir()):
        into = target / context.name
        into.mkdir(mode=0o700)
        for name in ("secret.json", "device"):
            if (context / name).exists():
                shutil.copyfile(context / name, into / name)
                os.chmod(into / name, PRIVATE_FILE_MODE)
        sent = 0
        try:
            sent = int(json.loads((context / "sequence.json").read_text())["next-to-send"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            pass
        sequence = {"next-to-send": sent + OSCORE_SEQUENCE_MARGIN, "received": "unknown"}
        descriptor = os.open(into / "sequence.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
        with os.fdopen(descriptor, "w") as file:
            json.dump(sequence, file)
    fsync_directory(target)


def apply_pending(data_dir: Path) -> dict[str, Any] | None:
    """Apply a restore accepted over HTTP (``PUT /v1/snapshot``), before the agent opens its store."""
    pending = data_dir / PENDING_NAME
    if not pending.exists():
        return None
    try:
        options = json.loads((data_dir / (PENDING_NAME + ".json")).read_text() or "{}")
    except (OSError, ValueError):
        options = {}
    try:
        meta = restore(pending, data_dir, force=True, same_replica=bool(options.get("same_replica")))
    except SnapshotInvalid as error:
        raise StoreError(
            f"the snapshot staged for restore, {pending}, cannot be loaded ({error}); the data directory "
            "was left as it was: remove that file to start without it"
        ) from None
    (data_dir / (PENDING_NAME + ".json")).unlink(missing_ok=True)
    os.unlink(pending)
    return meta
