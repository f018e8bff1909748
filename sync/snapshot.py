"""Snapshots of an edge's data directory: save, check, inspect, restore.

Theory of operation
-------------------
A snapshot is a gzip'd tar archive (docs/operations.md, "Snapshots"):

- ``meta.json``: ``{"Format": "konsul-snapshot", "Version": 1, "Site",
  "Replica", "Index", "CreatedAt", "OscoreContexts", "Files"}``;
- ``SHA256SUMS``: one ``<sha256>  <name>`` line per file below, in the
  format ``sha256sum -c`` reads;
- ``state/konsul.db``: the state store (KV, catalog, devices, ACLs),
  copied with SQLite's online backup API;
- ``oscore/<sender id>/{secret.json,sequence.json,device}``: the devices'
  OSCORE contexts, so that a restored edge keeps serving its OSCORE devices.

The copy is consistent under concurrent writes: it reads through one
connection that holds one read transaction for the whole copy, so every step
of the backup sees the same committed state. In WAL mode a reader never
blocks the writer (commits append to the WAL meanwhile), and the copy goes in
steps of :data:`BACKUP_STEP_PAGES` pages so it holds the GIL only briefly.

Not included, on purpose: the telemetry buffer (``telemetry.db``: churning
samples the hub may have received already, which a restore would send again),
and the audit log (a record of what happened on that machine, kept with its
logs). The archive holds the OSCORE master secrets: keep it as secret as the
data directory itself (it is written 0600).

A restore (snapshot_restore.py) checks the whole archive (format, checksums, SQLite's integrity
check, the schema version) before it touches the target; anything wrong is a
:class:`SnapshotInvalid` and nothing changes. Then, unless asked to keep it,
the restored store gets a new replica id, since two running replicas with one
id would stamp different writes alike. OSCORE contexts are restored with
their sender sequence number moved :data:`OSCORE_SEQUENCE_MARGIN` ahead and
their replay window marked unknown, so the restored edge never reuses a nonce
the original may have used after the snapshot, and recovers each device's
replay window with an Echo exchange (RFC 8613 B.1.2) instead of accepting a
request replayed from that time.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sqlite3
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

from .errors import InvalidArgument, KonsulError
from .store import DB_NAME, LOCK_NAME, PENDING_RESTORE_NAME, Store
from .tables import KNOWN_VERSIONS, scope_counters

FORMAT = "konsul-snapshot"
VERSION = 1
META_NAME = "meta.json"
SUMS_NAME = "SHA256SUMS"
STATE_NAME = "state/" + DB_NAME
OSCORE_DIR = "oscore"
OSCORE_FILES = ("secret.json", "sequence.json", "device")
_OSCORE_MEMBER = re.compile(r"oscore/([0-9a-f]{2,16})/(secret\.json|sequence\.json|device)")
# A hub's archive (snapshot_hub.py) holds one store per scope, under the name it has in the data directory.
SCOPES_DIR = "scopes"
SCOPE_MEMBER = re.compile(r"scopes/([A-Za-z0-9][A-Za-z0-9._-]{0,63})/" + re.escape(DB_NAME))
ROLES = ("edge", "hub")
# Pages per backup step (4 KiB each): a step is a few milliseconds.
BACKUP_STEP_PAGES = 256
# How far a restored OSCORE context's sender sequence number moves ahead.
OSCORE_SEQUENCE_MARGIN = 1 << 24
# Bounds for an archive from elsewhere (it is hostile input until checked).
MAX_MEMBERS = 100_000
MAX_SMALL_FILE = 64 * 1024
MAX_TOTAL_BYTES = 64 * 1024**3
CHUNK = 64 * 1024
# gzip level: 1 is several times faster than tarfile's default 9 (measured: bench/snapshot.py, docs/benchmarks.md).
COMPRESS_LEVEL = 1
PRIVATE_FILE_MODE = 0o600
PENDING_NAME = PENDING_RESTORE_NAME  # a restore accepted over HTTP, applied at the next start


class SnapshotInvalid(InvalidArgument):
    """An archive that is not a whole, intact Konsul snapshot (nothing was changed)."""

    code = "invalid_snapshot"


class RestoreRefused(KonsulError):
    """The target already holds data and the restore was not forced."""

    status = 409
    code = "has_data"


# -- saving ------------------------------------------------------------------------


def backup_database(source: Path, target: Path, pages: int = BACKUP_STEP_PAGES) -> None:
    """Copy the SQLite database ``source`` to ``target`` with the online backup API.

    One read transaction spans the whole copy, so the copy is the state of one
    commit however many writes land meanwhile (WAL: they do not wait for it).
    """
    src = sqlite3.connect(source, isolation_level=None)
    try:
        src.execute("PRAGMA busy_timeout = 5000")
        src.execute("BEGIN")
        src.execute("SELECT count(*) FROM sqlite_master").fetchone()  # takes the read snapshot
        dst = sqlite3.connect(target)
        try:
            src.backup(dst, pages=pages)
        finally:
            dst.close()
        src.execute("COMMIT")
    finally:
        src.close()
    os.chmod(target, PRIVATE_FILE_MODE)


def database_summary(path: Path) -> dict[str, Any]:
    """What a copy of a state store holds: replica id, scopes, their index and counts.

    ``path`` is a private copy: opening it may write to it (the schema check).
    """
    from .replica import Replica

    store = Store.open(path.parent)
    try:
        replica = Replica(store)
        scopes = {}
        for name, scope in sorted(replica.scopes.items()):
            scopes[name] = {
                "Index": scope.index.value,
                "Keys": len(scope.kv),
                "Services": len(scope.catalog.services()),
                "Devices": len(scope.devices.records()),
            }
        return {"Replica": replica.replica_id, "Scopes": scopes}
    finally:
        store.close()
        try:
            os.unlink(path.parent / LOCK_NAME)
        except FileNotFoundError:
            pass


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_oscore(data_dir: Path, into: Path) -> list[str]:
    """Copy every complete OSCORE context; the names of the files copied."""
    names = []
    source = data_dir / OSCORE_DIR
    if not source.is_dir():
        return names
    for context in sorted(source.iterdir()):
        if not context.is_dir() or not re.fullmatch(r"[0-9a-f]{2,16}", context.name):
            continue  # a partial context (".new-...") or something else
        if not (context / "secret.json").exists() or not (context / "device").exists():
            continue
        target = into / OSCORE_DIR / context.name
        target.mkdir(parents=True, mode=0o700)
        for name in OSCORE_FILES:
            try:
                shutil.copyfile(context / name, target / name)  # sequence.json is replaced atomically
            except FileNotFoundError:
                continue
            os.chmod(target / name, PRIVATE_FILE_MODE)
            names.append(f"{OSCORE_DIR}/{context.name}/{name}")
    return names


def _identity(state: Path, site: str) -> tuple[str | None, int]:
    """The copy's replica id and the site's index, read with SQL (cheap: nothing is loaded)."""
    conn = sqlite3.connect(f"file:{state}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM meta WHERE name = 'replica_id'").fetchone()
        index = scope_counters(lambda sql, *params: conn.execute(sql, params).fetchall(), site)[0]
    finally:
        conn.close()
    return (row[0] if row else None), index


def save(data_dir: Path, site: str, work_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Write a snapshot of ``data_dir`` to ``work_dir/snapshot.tar.gz``; its path and meta.

    What the store holds (counts of keys, services, devices) is not computed
    here: that means loading every document, which would compete with the
    agent's writers for the interpreter; :func:`inspect` counts offline.
    """
    state = work_dir / STATE_NAME
    state.parent.mkdir(mode=0o700)
    backup_database(data_dir / DB_NAME, state)
    replica, index = _identity(state, site)
    names = [STATE_NAME, *_copy_oscore(data_dir, work_dir)]
    files = file_entries(work_dir, names)
    meta = {
        "Format": FORMAT,
        "Version": VERSION,
        "Site": site,
        "Replica": replica,
        "Index": index,
        "CreatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "OscoreContexts": len({n.split("/")[1] for n in names if n.startswith(OSCORE_DIR + "/")}),
        "Files": files,
    }
    return write_archive(work_dir, meta, names), meta


def file_entries(work_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``meta.json``'s ``Files``: the size and SHA-256 of each named file under ``work_dir``."""
    return {name: {"Size": (work_dir / name).stat().st_size, "SHA256": _sha256(work_dir / name)} for name in names}


def write_archive(work_dir: Path, meta: dict[str, Any], names: list[str]) -> Path:
    """Pack ``meta``, the checksums and the named files of ``work_dir`` into ``work_dir/snapshot.tar.gz``."""
    files = meta["Files"]
    archive = work_dir / "snapshot.tar.gz"
    descriptor = os.open(archive, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    with os.fdopen(descriptor, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz", compresslevel=COMPRESS_LEVEL) as tar:
        _add_bytes(tar, META_NAME, json.dumps(meta, indent=2).encode() + b"\n")
        sums = "".join(f"{files[name]['SHA256']}  {name}\n" for name in names)
        _add_bytes(tar, SUMS_NAME, sums.encode())
        for name in names:
            tar.add(work_dir / name, arcname=name, recursive=False, filter=_plain)
    return archive


def _plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = PRIVATE_FILE_MODE
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = PRIVATE_FILE_MODE
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


# -- checking ----------------------------------------------------------------------


def check(archive: BinaryIO, into: Path) -> dict[str, Any]:
    """Unpack ``archive`` into the empty directory ``into`` and check all of it; its meta.

    Raises:
        SnapshotInvalid: not gzip, not tar, truncated, a foreign or newer format,
            a file missing or extra or differing from its checksum, a damaged database.
    """
    try:
        tar = tarfile.open(fileobj=archive, mode="r|gz")
    except (tarfile.TarError, OSError, EOFError) as error:
        raise SnapshotInvalid(f"not a Konsul snapshot (a gzip'd tar archive): {error}") from None
    digests: dict[str, str] = {}
    small: dict[str, bytes] = {}
    total = 0
    try:
        with tar:
            for count, member in enumerate(tar, 1):
                if count > MAX_MEMBERS:
                    raise SnapshotInvalid(f"the archive holds more than {MAX_MEMBERS} files")
                name = member.name
                if not member.isfile():
                    raise SnapshotInvalid(f"the archive holds {name!r}, which is not a regular file")
                if name in (META_NAME, SUMS_NAME):
                    if member.size > MAX_SMALL_FILE:
                        raise SnapshotInvalid(f"{name} is too large ({member.size} bytes)")
                    small[name] = tar.extractfile(member).read()
                    continue
                if name != STATE_NAME and not _OSCORE_MEMBER.fullmatch(name) and not SCOPE_MEMBER.fullmatch(name):
                    raise SnapshotInvalid(f"the archive holds {name!r}, which is no part of a Konsul snapshot")
                if name in digests:
                    raise SnapshotInvalid(f"the archive holds {name!r} twice")
                total += member.size
                if total > MAX_TOTAL_BYTES:
                    raise SnapshotInvalid("the archive is larger than any snapshot this agent writes")
                digests[name] = _unpack(tar.extractfile(member), into / name)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise SnapshotInvalid(f"the archive is damaged or truncated ({error}); nothing was changed") from None
    meta = _meta(small)
    sums = _sums(small)
    if set(sums) != set(digests):
        missing = sorted(set(sums) - set(digests)) or sorted(set(digests) - set(sums))
        raise SnapshotInvalid(f"the archive's files do not match its {SUMS_NAME} ({', '.join(missing)})")
    for name, digest in digests.items():
        if sums[name] != digest:
            raise SnapshotInvalid(f"{name} does not match its checksum: the archive is damaged")
    if STATE_NAME not in digests:
        raise SnapshotInvalid(f"the archive holds no state store ({STATE_NAME})")
    role = archive_role(meta)
    foreign = [n for n in digests if n.startswith(OSCORE_DIR + "/" if role == "hub" else SCOPES_DIR + "/")]
    if foreign:
        raise SnapshotInvalid(f"the archive is a {role}'s snapshot but holds {foreign[0]!r}, which is no part of one")
    for name in sorted(digests):
        if name == STATE_NAME or SCOPE_MEMBER.fullmatch(name):
            _check_database(into / name)
    return meta


def archive_role(meta: dict[str, Any]) -> str:
    """Whose data directory a snapshot is of: ``edge`` (one site's store) or ``hub`` (a store per scope)."""
    role = meta.get("Role", "edge")  # snapshots written before hubs had them are an edge's
    if role not in ROLES:
        raise SnapshotInvalid(f"the snapshot names an unknown role {role!r} (an edge's or a hub's, {ROLES})")
    return role


def _unpack(source: BinaryIO | None, target: Path) -> str:
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    digest = hashlib.sha256()
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    with os.fdopen(descriptor, "wb") as file:
        while source is not None and (chunk := source.read(CHUNK)):
            digest.update(chunk)
            file.write(chunk)
    return digest.hexdigest()


def _meta(small: dict[str, bytes]) -> dict[str, Any]:
    if META_NAME not in small:
        raise SnapshotInvalid(f"the archive has no {META_NAME}: it is not a Konsul snapshot")
    try:
        meta = json.loads(small[META_NAME])
    except ValueError:
        raise SnapshotInvalid(f"the archive's {META_NAME} is not JSON") from None
    if not isinstance(meta, dict) or meta.get("Format") != FORMAT:
        raise SnapshotInvalid(f"the archive is not a Konsul snapshot (its {META_NAME} names no {FORMAT!r} format)")
    if meta.get("Version") != VERSION:
        raise SnapshotInvalid(
            f"the snapshot is format version {meta.get('Version')!r}; this agent reads version {VERSION}: "
            "restore it with the agent version that wrote it, or a newer one"
        )
    return meta


def _sums(small: dict[str, bytes]) -> dict[str, str]:
    if SUMS_NAME not in small:
        raise SnapshotInvalid(f"the archive has no {SUMS_NAME}")
    sums = {}
    for line in small[SUMS_NAME].decode(errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        if not re.fullmatch(r"[0-9a-f]{64}", digest) or not name:
            raise SnapshotInvalid(f"the archive's {SUMS_NAME} is malformed")
        sums[name] = digest
    return sums


def _check_database(path: Path) -> None:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            result = conn.execute("PRAGMA integrity_check").fetchone()[0]
            row = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as error:
        raise SnapshotInvalid(f"the snapshot's state store is not a readable Konsul database ({error})") from None
    if result != "ok":
        raise SnapshotInvalid(f"the snapshot's state store failed its integrity check ({result})")
    if row is not None and row[0] not in KNOWN_VERSIONS:
        raise SnapshotInvalid(f"the snapshot's state store has schema version {row[0]}, which this agent does not read")


def inspect(path: Path) -> dict[str, Any]:
    """Check the snapshot file at ``path`` whole; its meta, with the archive's size."""
    with tempfile.TemporaryDirectory(prefix="konsul-inspect-") as work, open(path, "rb") as archive:
        meta = check(archive, Path(work))
        extra: dict[str, Any] = {}
        if archive_role(meta) == "hub":
            from .snapshot_hub import hub_summary

            scopes, extra = hub_summary(Path(work))
        else:
            scopes = database_summary(Path(work) / STATE_NAME)["Scopes"]
    counts = {
        "Keys": sum(s["Keys"] for s in scopes.values()),
        "Services": sum(s["Services"] for s in scopes.values()),
        "Devices": sum(s["Devices"] for s in scopes.values()),
        "OscoreContexts": meta.get("OscoreContexts", 0),
    }
    counts.update(extra)
    return {**meta, "Counts": counts, "Scopes": scopes, "ArchiveBytes": path.stat().st_size}


__all__ = [
    "FORMAT", "PENDING_NAME", "RestoreRefused", "SnapshotInvalid", "archive_role", "backup_database", "check",
    "database_summary", "file_entries", "inspect", "save", "write_archive",
]
