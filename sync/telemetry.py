"""Telemetry samples: what a device sends, how it is numbered, how it travels.

Telemetry never enters the CRDT (DESIGN.md, decision 5): an edge keeps samples
in a bounded buffer (``edge/telemetry_buffer.py``) and forwards them to the hub
(``hub/telemetry_store.py``) over the sync connection, as ``eph`` frames of
kind ``telemetry`` answered by ``telemetry-ack``.

Numbering. The hub keeps one sample per (site, device, sequence number), so a
batch sent again after a crash or a lost acknowledgement is never counted
twice. A device that numbers its samples (a ``seq`` field: an integer, rising,
unique across its reboots) is deduplicated end to end, including the resend of
a QoS 1 message whose PUBACK was lost. A sample without ``seq`` gets one from
the edge when it is stored: the ingest time in microseconds, raised past the
last number given to the device, which stays unique across edge restarts as
long as the clock does not go back.
"""

from __future__ import annotations

import math
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2

from .errors import InvalidArgument, StoreCorrupt
from .store import DURABILITY_MODES

MAX_SEQ = 2**63 - 1
ACK_KIND = "telemetry-ack"
BATCH_KIND = "telemetry"


@dataclass(frozen=True, slots=True)
class Sample:
    device: str
    seq: int
    time_ms: int  # the device's ``ts`` if it sent one, else when the edge took it
    data: bytes  # the document as sent, CBOR-encoded

    def document(self) -> Any:
        return cbor2.loads(self.data)

    def row(self) -> list:
        return [self.device, self.seq, self.time_ms, self.data]


def sample_fields(document: Any) -> tuple[int | None, int | None]:
    """The ``seq`` and ``ts`` (as milliseconds) a sample carries; raises on bad ones."""
    if not isinstance(document, dict):
        raise InvalidArgument("a telemetry sample is a JSON object or CBOR map")
    seq = document.get("seq")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ):
        raise InvalidArgument(f"seq is an integer from 0 to {MAX_SEQ}")
    ts = document.get("ts")
    if ts is None:
        return seq, None
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or not 0 <= ts < 2**40:
        raise InvalidArgument("ts is the sample's time in seconds since 1970")
    return seq, int(ts * 1000)


class SequenceNumbers:
    """Sequence numbers for samples that came without one, per device."""

    def __init__(self, now_us=lambda: time.time_ns() // 1000) -> None:
        self.now_us = now_us
        self.last: dict[str, int] = {}

    def next(self, device: str) -> int:
        seq = max(self.last.get(device, 0) + 1, self.now_us())
        self.last[device] = seq
        return seq


def make_sample(device: str, document: Any, numbers: SequenceNumbers, now_ms: int) -> Sample:
    seq, time_ms = sample_fields(document)
    if seq is None:
        seq = numbers.next(device)
    try:
        data = cbor2.dumps(document)
    except (TypeError, ValueError, cbor2.CBOREncodeError) as error:
        raise InvalidArgument(f"a telemetry sample must encode as CBOR: {error}") from None
    return Sample(device, seq, now_ms if time_ms is None else time_ms, data)


def batch_message(batch_id: int, samples: list[Sample]) -> dict:
    """The ``d`` field of a telemetry frame."""
    return {"b": batch_id, "x": [sample.row() for sample in samples]}


def parse_batch(data: Any) -> tuple[int, list[Sample]]:
    """A telemetry frame's batch id and samples; raises :class:`InvalidArgument`."""
    if not isinstance(data, dict) or not isinstance(data.get("b"), int) or not isinstance(data.get("x"), list):
        raise InvalidArgument("a telemetry batch is {b: id, x: [samples]}")
    samples = []
    for row in data["x"]:
        if (
            not isinstance(row, list)
            or len(row) != 4
            or not isinstance(row[0], str)
            or not isinstance(row[1], int)
            or not isinstance(row[2], int)
            or not isinstance(row[3], bytes)
        ):
            raise InvalidArgument("a telemetry sample row is [device, seq, time_ms, data]")
        samples.append(Sample(*row))
    return data["b"], samples


def sample_json(site: str, sample: Sample) -> dict:
    """A sample as the HTTP API shows it."""
    return {
        "Device": sample.device,
        "Site": site,
        "Seq": sample.seq,
        "Time": sample.time_ms / 1000,
        "Data": json_safe(sample.document()),
    }


def json_safe(value: Any) -> Any:
    """A CBOR-decoded value as JSON can carry it (bytes as hex, other keys as strings)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def open_database(path: Path, durability: str, schema: str) -> sqlite3.Connection:
    """Open (or create) a telemetry database for one writer thread at a time.

    A file that is not a healthy SQLite database stops start-up with
    :class:`StoreCorrupt` and is left untouched.
    """
    existed = path.exists()
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        if existed:
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
            if result != "ok":
                conn.close()
                raise StoreCorrupt(
                    f"{path} failed its integrity check ({result}). It was left untouched: "
                    "move it away to start with an empty telemetry store."
                )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={DURABILITY_MODES[durability]}")
        conn.executescript(schema + _COUNTERS)
    except sqlite3.DatabaseError as error:
        raise StoreCorrupt(
            f"{path} is not a readable telemetry database ({error}). It was left untouched: "
            "move it away to start with an empty telemetry store."
        ) from error
    return conn


# Durable counters (add_counter, read_counters), in every telemetry database.
_COUNTERS = "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);"


def read_counters(db: sqlite3.Connection) -> dict[str, int]:
    return dict(db.execute("SELECT name, value FROM counters").fetchall())


def add_counter(db: sqlite3.Connection, name: str, amount: int) -> None:
    """Add to a durable counter (table ``counters``), inside the caller's transaction."""
    if amount:
        db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, amount),
        )
