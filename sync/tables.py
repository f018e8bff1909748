"""The store's tables: schema, migrations, how a round's rows are written and read.

Theory of operation
-------------------
A commit round costs mostly its fsync, which grows with the pages the round
writes. So the tables are laid out for rounds that append:

- ``updates`` is the log: one row per CRDT update, in ``seq`` order (no
  AUTOINCREMENT, which cost a page of ``sqlite_sequence`` per round; a new row
  still gets a larger seq than every row kept). A compaction replaces a
  collection's log by a snapshot in ``docs``.
- The per-replica rows a round changes ride on the log too. A scope's counters
  (``idx``, ``kv_index``, ``conflicts``) go into columns of its update rows:
  they only ever rise, so the stored value is the largest in ``scope_state``
  and the log. The round's ``kv_index`` and ``kv_history`` changes go, as one
  CBOR value (``side``), onto the round's last KV update row of the scope. Read
  back, the tables come first and the log's ``side`` values follow in seq
  order, later ones winning.
- Before a compaction drops a log, what its rows carry is *folded* into the
  tables (``scope_state``, ``kv_index``, ``kv_history``), in the same
  transaction. A round with such changes but no KV update row of its scope (a
  TTL expiry) folds the scope's whole log first and then writes the tables, so
  nothing older can later override it.

So a put writes one update row in the common case, where version 1 also wrote
a ``kv_index`` row, a ``kv_history`` row (each on the page of its key), the
``scope_state`` row and ``sqlite_sequence``.

``kv_history`` is clustered by stamp: folded rows append, and the rows trimmed
past ``history_depth`` (the oldest) sit together. History is read whole, at
start-up only, so it needs no per-key index.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cbor2

from .batch import HistoryChange, IndexChange, SideChanges, WriteBatch
from .errors import StoreError

SCHEMA_VERSION = 2
KNOWN_VERSIONS = (1, 2)  # what a store opens; older ones are migrated to SCHEMA_VERSION

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS docs(
    scope TEXT, collection TEXT, epoch INTEGER NOT NULL, snapshot BLOB NOT NULL,
    PRIMARY KEY(scope, collection)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS updates(
    seq INTEGER PRIMARY KEY,
    scope TEXT NOT NULL, collection TEXT NOT NULL, epoch INTEGER NOT NULL, data BLOB NOT NULL,
    idx INTEGER, kv_index INTEGER, conflicts INTEGER, side BLOB);
CREATE TABLE IF NOT EXISTS scope_state(
    scope TEXT PRIMARY KEY, idx INTEGER NOT NULL, kv_index INTEGER NOT NULL,
    conflicts INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv_index(
    scope TEXT, key TEXT, create_index INTEGER NOT NULL, modify_index INTEGER NOT NULL,
    PRIMARY KEY(scope, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv_history(
    scope TEXT, key TEXT, stamp TEXT, op TEXT NOT NULL, flags INTEGER NOT NULL,
    size INTEGER NOT NULL, conflict INTEGER NOT NULL, value BLOB,
    PRIMARY KEY(scope, stamp, key)) WITHOUT ROWID;
"""

# Version 1 -> 2: the same tables; updates gains columns and loses
# AUTOINCREMENT, kv_history gets another primary key. The old tables are
# renamed, the new ones created from SCHEMA, the rows copied (the new columns
# NULL: the tables hold everything) and the old dropped, in one transaction.
_RENAME_V1 = (
    "ALTER TABLE kv_history RENAME TO kv_history_v1",
    "ALTER TABLE updates RENAME TO updates_v1",
)
_COPY_V1 = (
    "INSERT INTO kv_history(scope, key, stamp, op, flags, size, conflict, value) "
    "SELECT scope, key, stamp, op, flags, size, conflict, value FROM kv_history_v1",
    "DROP TABLE kv_history_v1",
    "INSERT INTO updates(seq, scope, collection, epoch, data) "
    "SELECT seq, scope, collection, epoch, data FROM updates_v1",
    "DROP TABLE updates_v1",
)


def prepare_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Create the tables of a new database, or bring an older one up to date."""
    found = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone()
    version = None
    if found:
        row = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
        version = row[0] if row else None
    if version == SCHEMA_VERSION:
        return
    if version is not None and version not in KNOWN_VERSIONS:  # checked read-only first
        raise StoreError(f"{path} has schema version {version}, which this agent does not know")
    with immediate(conn):
        if version == 1:
            for statement in _RENAME_V1:
                conn.execute(statement)
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        if version == 1:
            for statement in _COPY_V1:
                conn.execute(statement)
        conn.execute(
            "INSERT OR REPLACE INTO meta(name, value) VALUES ('schema_version', ?)",
            (SCHEMA_VERSION,),
        )


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction (``BEGIN IMMEDIATE``): committed at the end, rolled back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


# -- writing ------------------------------------------------------------------------


INSERT_UPDATE = (
    "INSERT INTO updates(scope, collection, epoch, data, idx, kv_index, conflicts, side) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def commit_rows(conn: sqlite3.Connection, batch: WriteBatch) -> None:
    """Write one merged batch as one transaction.

    A lone put's batch fits in one ``updates`` row: one update, its scope's
    counters and its index and history changes all ride on it. That round is
    a single ``INSERT`` outside ``BEGIN``, a transaction of its own committed
    (and synced) before execute() returns: the same durability as BEGIN ...
    COMMIT, two statements fewer.
    """
    # The scopes' changes, each to ride on a row or to go to the tables.
    side = {scope: changes for scope, changes in batch.side.items() if changes[0] or changes[1]}
    rows, logged = _update_rows(batch, side)
    alone = (
        len(batch.updates) == 1 and not (batch.snapshots or batch.meta or side)
        and all(scope in logged for scope in batch.scope_state)
    )
    if alone:
        conn.execute(INSERT_UPDATE, rows[0])
        return
    with immediate(conn):
        _write_rows(conn, batch, side, rows, logged)


def _write_rows(
    conn: sqlite3.Connection,
    batch: WriteBatch,
    side: dict[str, SideChanges],
    rows: list[tuple],
    logged: set[str],
) -> None:
    counters = batch.scope_state
    if rows:
        conn.executemany(INSERT_UPDATE, rows)
    for (scope, collection), (epoch, snapshot) in batch.snapshots.items():
        conn.execute(
            "INSERT OR REPLACE INTO docs(scope, collection, epoch, snapshot) VALUES (?, ?, ?, ?)",
            (scope, collection, epoch, snapshot),
        )
        # What the log carries moves to the tables before it goes.
        conn.execute(_FOLD_COUNTERS, (scope, scope))
        _fold_side(conn, scope, "collection = ? AND epoch != ?", (collection, epoch), deleting=True)
        # The snapshot holds everything the log of the epoch it replaces did.
        conn.execute(
            "DELETE FROM updates WHERE scope = ? AND collection = ? AND epoch != ?",
            (scope, collection, epoch),
        )
    for scope, changes in side.items():
        # No KV update row of this scope in the round: nothing older in the log
        # may override these, so the log's changes go to the tables first.
        _fold_side(conn, scope, "1", ())
        _apply_to_tables(conn, scope, *_replay([], [], [changes]))
    unlogged = [(scope, *v) for scope, v in counters.items() if scope not in logged]
    if unlogged:
        conn.executemany(
            "INSERT OR REPLACE INTO scope_state(scope, idx, kv_index, conflicts) VALUES (?, ?, ?, ?)",
            unlogged,
        )
    if batch.meta:
        conn.executemany(
            "INSERT OR REPLACE INTO meta(name, value) VALUES (?, ?)", list(batch.meta.items())
        )


def _update_rows(batch: WriteBatch, side: dict[str, SideChanges]) -> tuple[list[tuple], set[str]]:
    """The ``updates`` rows of ``batch``, and the scopes whose counters they carry.

    Takes from ``side`` the changes that ride on a row (see the module doc).
    """
    counters = batch.scope_state
    logged: set[str] = set()
    if not batch.updates:
        return [], logged
    last_kv = {scope: i for i, (scope, c, _, _) in enumerate(batch.updates) if c == "kv"}
    rows = []
    for i, (scope, collection, epoch, data) in enumerate(batch.updates):
        state = counters.get(scope)
        if state is not None:
            logged.add(scope)
        carried = None
        if last_kv.get(scope) == i and scope in side:
            carried = cbor2.dumps(side.pop(scope))
        rows.append((scope, collection, epoch, data, *(state or (None, None, None)), carried))
    return rows, logged


def _fold_side(
    conn: sqlite3.Connection, scope: str, where: str, params: tuple, *, deleting: bool = False
) -> None:
    """Apply the ``side`` values of a scope's log rows matching ``where`` to the tables.

    ``deleting``: the caller deletes those rows next, so their ``side`` is not
    cleared first (each row holds an update, often over several pages, which
    clearing would rewrite only for the delete to drop it).
    """
    found = conn.execute(
        f"SELECT seq, side FROM updates WHERE scope = ? AND side IS NOT NULL AND {where} ORDER BY seq",
        (scope, *params),
    ).fetchall()
    if not found:
        return
    index, history = _replay([], [], (cbor2.loads(side) for _, side in found))
    _apply_to_tables(conn, scope, index, history)
    if not deleting:
        conn.executemany("UPDATE updates SET side = NULL WHERE seq = ?", [(seq,) for seq, _ in found])


def _apply_to_tables(
    conn: sqlite3.Connection, scope: str, index: list[IndexChange], history: list[HistoryChange]
) -> None:
    """Write a scope's folded index and history changes (one row per key or key and stamp)."""
    _for_rows(
        conn,
        "INSERT OR REPLACE INTO kv_index(scope, key, create_index, modify_index) VALUES ",
        "(?1, ?, ?, ?)", scope, [row for row in index if len(row) == 3],
    )
    _for_rows(
        conn, "WITH gone(scope, key) AS (VALUES ", "(?1, ?)", scope,
        [row for row in index if len(row) == 1],
        tail=") DELETE FROM kv_index WHERE scope = ?1 AND key IN (SELECT key FROM gone)",
    )
    _for_rows(
        conn,
        "INSERT OR REPLACE INTO kv_history(scope, key, stamp, op, flags, size, conflict, value) VALUES ",
        "(?1, ?, ?, ?, ?, ?, ?, ?)", scope, [row for row in history if len(row) == 7], blob_at=6,
    )
    # (A CTE, so that the deletes seek the primary key: "(stamp, key) IN (VALUES ...)" scans the scope.)
    _for_rows(
        conn, "WITH gone(scope, key, stamp) AS (VALUES ", "(?1, ?, ?)", scope,
        [row for row in history if len(row) == 2],
        tail=") DELETE FROM kv_history WHERE scope = ?1 AND (stamp, key) IN (SELECT stamp, key FROM gone)",
    )


# At most this many rows per statement in _for_rows (SQLite also caps a
# VALUES list at 500 rows), fewer where the library allows fewer parameters
# (999 before SQLite 3.32), and a statement ends early once its values hold
# STATEMENT_BYTES (conflict losers keep values of up to 512 KiB, which SQLite
# copies when they are bound).
ROWS_PER_STATEMENT = 256
STATEMENT_BYTES = 4 * 1024 * 1024


def _for_rows(
    conn: sqlite3.Connection,
    head: str,
    each: str,
    scope: str,
    rows: list,
    tail: str = "",
    blob_at: int | None = None,
) -> None:
    """Run ``head``, ``each`` once per row, then ``tail``, for a few hundred rows at a time.

    A fold writes thousands of rows. Through ``executemany`` each costs a
    step of its own, with its bindings and a hand-over of the GIL; a multi-row
    statement costs a third (measured: 1,250 history rows in 7 ms against
    2.3 ms). ``?1`` is the scope, the other parameters are the rows', in order;
    ``blob_at`` is the position of a row's value that may be a large blob.
    """
    if not rows:
        return
    width = each.count("?") - 1
    most = min(ROWS_PER_STATEMENT, (conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) - 1) // width)
    params: list = [scope]
    count = size = 0
    for row in rows:
        params.extend(row)
        count += 1
        if blob_at is not None and row[blob_at]:
            size += len(row[blob_at])
        if count == most or size >= STATEMENT_BYTES:
            conn.execute(head + ", ".join([each] * count) + tail, params)
            params, count, size = [scope], 0, 0
    if count:
        conn.execute(head + ", ".join([each] * count) + tail, params)


# Raise a scope's scope_state row to the largest counters of its updates rows.
_FOLD_COUNTERS = """
INSERT INTO scope_state(scope, idx, kv_index, conflicts)
SELECT ?, coalesce(max(idx), 0), coalesce(max(kv_index), 0), coalesce(max(conflicts), 0)
FROM updates WHERE scope = ?
ON CONFLICT(scope) DO UPDATE SET
    idx = max(idx, excluded.idx),
    kv_index = max(kv_index, excluded.kv_index),
    conflicts = max(conflicts, excluded.conflicts)
"""


# -- reading ------------------------------------------------------------------------

Query = Callable[..., list[tuple[Any, ...]]]


def scope_counters(query: Query, scope: str) -> tuple[int, int, int]:
    """A scope's stored (idx, kv_index, conflicts): the largest of each."""
    found = [(0, 0, 0)]
    found += query("SELECT idx, kv_index, conflicts FROM scope_state WHERE scope = ?", scope)
    found += query(
        "SELECT coalesce(max(idx), 0), coalesce(max(kv_index), 0), coalesce(max(conflicts), 0) "
        "FROM updates WHERE scope = ?",
        scope,
    )
    return tuple(max(column) for column in zip(*found))  # type: ignore[return-value]


def kv_rows(query: Query, scope: str) -> tuple[list[tuple], list[tuple]]:
    """A scope's ``kv_index`` rows ``(key, create, modify)`` and ``kv_history`` rows
    ``(key, stamp, op, flags, size, conflict, value)``: the tables, then the log."""
    index = query("SELECT key, create_index, modify_index FROM kv_index WHERE scope = ?", scope)
    history = query(
        "SELECT key, stamp, op, flags, size, conflict, value FROM kv_history WHERE scope = ?", scope
    )
    sides = query(
        "SELECT side FROM updates WHERE scope = ? AND side IS NOT NULL ORDER BY seq", scope
    )
    if not sides:
        return index, history
    merged_index, merged_history = _replay(
        [list(row) for row in index],
        [list(row) for row in history],
        (cbor2.loads(side) for (side,) in sides),
    )
    return (
        [tuple(row) for row in merged_index if len(row) == 3],
        [tuple(row) for row in merged_history if len(row) == 7],
    )


def _replay(
    index: list[IndexChange], history: list[HistoryChange], sides: Iterable[SideChanges]
) -> tuple[list[IndexChange], list[HistoryChange]]:
    """``index`` and ``history`` with the changes of ``sides`` applied in order:
    one row per key (or key and stamp), the last one made."""
    by_key = {row[0]: row for row in index}
    by_stamp = {(row[0], row[1]): row for row in history}
    for changes, past in sides:
        for row in changes:
            by_key[row[0]] = row
        for row in past:
            by_stamp[(row[0], row[1])] = row
    return list(by_key.values()), list(by_stamp.values())
