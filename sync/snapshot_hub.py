"""Snapshots of a hub's data directory: every scope's store and the hub's own, in one archive.

A hub keeps each scope (every site, and ``global``) in a store of its own,
``<data-dir>/scopes/<scope>/konsul.db``, and its own state in
``<data-dir>/konsul.db``: its replica id and the sites' join-token hashes
(hub/site_credentials.py). ACLs live in the ``global`` scope. A hub's archive
is the edge's format (snapshot.py) with ``"Role": "hub"`` in ``meta.json``:

- ``state/konsul.db``: the hub's own store;
- ``scopes/<scope>/konsul.db``: one per scope.

Each store is copied with SQLite's backup API under one read transaction, so
each is the state of one of its commits. The stores are separate databases,
so the archive is consistent per store, not across stores: a write that lands
in one scope while another is copied may or may not be in it. That is the
hub's normal condition anyway (scopes sync with their edges independently),
and the edges send what a restored hub lacks when they reconnect.

Not included: the telemetry store (``telemetry.db``) and the audit log, for
the edge's reasons (snapshot.py).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

from .snapshot import (
    FORMAT, SCOPE_MEMBER, SCOPES_DIR, STATE_NAME, VERSION, SnapshotInvalid, backup_database, database_summary,
    file_entries, write_archive,
)
from .store import DB_NAME, fsync_directory
from .tables import scope_counters
from .wire import SCOPE_NAME

__all__ = ["hub_holds_data", "hub_summary", "install_hub", "is_hub_dir", "save_hub"]

# hub/site_credentials.py keeps each site's join-token hash in a meta row with this prefix.
SITE_CREDENTIAL_ROWS = "site_credential/%"


def is_hub_dir(data_dir: Path) -> bool:
    """Whether ``data_dir`` is laid out as a hub's (a store per scope)."""
    return (data_dir / SCOPES_DIR).is_dir()


def _scope_stores(data_dir: Path) -> dict[str, Path]:
    """Each scope's store in a hub's data directory, by scope name."""
    root = data_dir / SCOPES_DIR
    if not root.is_dir():
        return {}
    return {
        path.name: path / DB_NAME
        for path in sorted(root.iterdir())
        if path.is_dir() and SCOPE_NAME.fullmatch(path.name) and (path / DB_NAME).exists()
    }


def _read(path: Path, sql: str, *params: Any) -> list[tuple]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def save_hub(data_dir: Path, work_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Write a snapshot of the hub's ``data_dir`` to ``work_dir/snapshot.tar.gz``; its path and meta."""
    state = work_dir / STATE_NAME
    state.parent.mkdir(mode=0o700)
    backup_database(data_dir / DB_NAME, state)
    names = [STATE_NAME]
    indexes: dict[str, int] = {}
    for scope, source in _scope_stores(data_dir).items():
        name = f"{SCOPES_DIR}/{scope}/{DB_NAME}"
        (work_dir / name).parent.mkdir(parents=True, mode=0o700)
        backup_database(source, work_dir / name)
        indexes[scope] = scope_counters(lambda sql, *p: _read(work_dir / name, sql, *p), scope)[0]
        names.append(name)
    row = _read(state, "SELECT value FROM meta WHERE name = 'replica_id'")
    meta = {
        "Format": FORMAT,
        "Version": VERSION,
        "Role": "hub",
        "Site": "global",
        "Replica": row[0][0] if row else None,
        "Index": indexes.get("global", 0),
        "ScopeIndexes": indexes,
        "SiteCredentials": _read(state, "SELECT count(*) FROM meta WHERE name LIKE ?", SITE_CREDENTIAL_ROWS)[0][0],
        "CreatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "OscoreContexts": 0,
        "Files": file_entries(work_dir, names),
    }
    return write_archive(work_dir, meta, names), meta


def hub_summary(unpacked: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per scope, its index and counts, and the hub's own counts, of a checked hub archive in ``unpacked``.

    Opens private copies (``database_summary`` may write to them).
    """
    scopes: dict[str, Any] = {}
    for member in sorted((unpacked / SCOPES_DIR).glob(f"*/{DB_NAME}")):
        found = database_summary(member)["Scopes"]
        scopes[member.parent.name] = found.get(member.parent.name, {"Index": 0, "Keys": 0, "Services": 0, "Devices": 0})
    credentials = _read(unpacked / STATE_NAME, "SELECT count(*) FROM meta WHERE name LIKE ?", SITE_CREDENTIAL_ROWS)
    return scopes, {"SiteCredentials": credentials[0][0]}


def hub_holds_data(data_dir: Path, copy_dir: Path) -> bool:
    """Whether a hub's ``data_dir`` holds a key, service or device in any scope, or a site credential.

    Each store is read from a copy made in ``copy_dir`` (opening one may write to it).
    """
    if (data_dir / DB_NAME).exists():
        try:
            if _read(data_dir / DB_NAME, "SELECT 1 FROM meta WHERE name LIKE ? LIMIT 1", SITE_CREDENTIAL_ROWS):
                return True
        except sqlite3.Error:
            return True  # damaged: treat as data, never overwrite it unasked
    for scope, source in _scope_stores(data_dir).items():
        copy = copy_dir / scope / DB_NAME
        copy.parent.mkdir(parents=True, mode=0o700)
        try:
            backup_database(source, copy)
            counts = database_summary(copy)["Scopes"].get(scope, {})
        except sqlite3.Error:
            return True
        if counts.get("Keys") or counts.get("Services") or counts.get("Devices"):
            return True
    return False


def install_hub(unpacked: Path, data_dir: Path, install_store) -> None:
    """Put a checked hub archive's stores in place of ``data_dir``'s (whose root lock the caller holds).

    ``install_store(state, directory)`` replaces one directory's store crash-safely
    (snapshot_restore.py). Scopes the archive does not hold are removed: a
    restore replaces the hub's state, it does not merge into it.
    """
    if not (unpacked / STATE_NAME).exists():
        raise SnapshotInvalid("the hub's archive holds no hub store")
    install_store(unpacked / STATE_NAME, data_dir)
    root = data_dir / SCOPES_DIR
    root.mkdir(mode=0o700, exist_ok=True)
    restored = {p.parent.name for p in (unpacked / SCOPES_DIR).glob(f"*/{DB_NAME}")
                if SCOPE_MEMBER.fullmatch(f"{SCOPES_DIR}/{p.parent.name}/{DB_NAME}")}
    for scope in _scope_stores(data_dir):
        if scope not in restored:
            shutil.rmtree(root / scope)
    for scope in sorted(restored):
        target = root / scope
        target.mkdir(mode=0o700, exist_ok=True)
        os.chmod(target, 0o700)
        install_store(unpacked / SCOPES_DIR / scope / DB_NAME, target)
    fsync_directory(root)
