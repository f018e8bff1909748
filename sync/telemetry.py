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
from functools import partial
from pathlib import Path
from typing import Any

import cbor2

from .errors import InvalidArgument, KonsulError, StoreCorrupt, StoreError
from .limits import MAX_DOCUMENT_BYTES, MAX_DOCUMENT_DEPTH, check_document, decode_cbor_document
from .sqlite_writer import check_readable, connect_writer

MAX_SEQ = 2**63 - 1
MAX_DEVICE_ID_BYTES = 256
MAX_TIME_MS = 2**62  # the listings' upper bound for "until"
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
    """A sample to buffer, refused here unless the hub will store it (see :func:`check_sample`)."""
    # The shared document rules first: the edge must never buffer (and then
    # forward forever) something the hub refuses.
    check_document(document, "a telemetry sample")
    seq, time_ms = sample_fields(document)
    if seq is None:
        seq = numbers.next(device)
    try:
        data = cbor2.dumps(document)
    except (TypeError, ValueError, cbor2.CBOREncodeError) as error:
        raise InvalidArgument(f"a telemetry sample must encode as CBOR: {error}") from None
    sample = Sample(device, seq, now_ms if time_ms is None else time_ms, data)
    check_sample(sample)
    return sample


def check_sample(sample: Sample) -> None:
    """Raise :class:`KonsulError` unless the hub can store and list ``sample``.

    Its data decodes as a document within the shared limits (sync/limits.py)
    and is a map; device id, sequence number and time are in range. The hub
    checks every forwarded sample with this, the edge every sample it buffers.
    """
    if not isinstance(sample.device, str) or not 0 < len(sample.device.encode("utf-8", "replace")) <= MAX_DEVICE_ID_BYTES:
        raise InvalidArgument(f"a device id is 1 to {MAX_DEVICE_ID_BYTES} bytes")
    if not 0 <= sample.seq <= MAX_SEQ:
        raise InvalidArgument(f"seq is an integer from 0 to {MAX_SEQ}")
    if not 0 <= sample.time_ms < MAX_TIME_MS:
        raise InvalidArgument("a sample's time is milliseconds since 1970")
    if not isinstance(decode_cbor_document(sample.data, "a telemetry sample"), dict):
        raise InvalidArgument("a telemetry sample is a JSON object or CBOR map")


def batch_message(batch_id: int, samples: list[Sample]) -> dict:
    """The ``d`` field of a telemetry frame."""
    return {"b": batch_id, "x": [sample.row() for sample in samples]}


def parse_batch(data: Any) -> tuple[int, list[Sample], int]:
    """A telemetry frame's batch id, its samples fit to store, and how many were refused.

    Raises :class:`InvalidArgument` only when the frame has no batch id (it
    cannot be acknowledged). A sample that is malformed or that
    :func:`check_sample` refuses is left out and counted: the batch is still
    acknowledged, so the edge deletes it instead of sending it forever.
    """
    if not isinstance(data, dict) or type(data.get("b")) is not int or not isinstance(data.get("x"), list):
        raise InvalidArgument("a telemetry batch is {b: id, x: [samples]}")
    samples = []
    refused = 0
    for row in data["x"]:
        if (
            not isinstance(row, list)
            or len(row) != 4
            or not isinstance(row[0], str)
            or type(row[1]) is not int
            or type(row[2]) is not int
            or not isinstance(row[3], bytes)
        ):
            refused += 1
            continue
        sample = Sample(*row)
        try:
            check_sample(sample)
        except KonsulError:
            refused += 1
            continue
        samples.append(sample)
    return data["b"], samples, refused


def sample_json(site: str, sample: Sample) -> dict:
    """A sample as the HTTP API shows it; one whose data cannot be read shows ``Undecodable``.

    A listing never fails on one stored row: a sample stored before samples
    were checked (or damaged since) is listed with ``Data`` null and the reason.
    """
    found = {"Device": sample.device, "Site": site, "Seq": sample.seq, "Time": sample.time_ms / 1000}
    try:
        found["Data"] = readable_data(sample.data)
    except KonsulError as error:
        found["Data"] = None
        found["Undecodable"] = str(error)
    return found


def readable_data(data: bytes) -> Any:
    """A sample's data as JSON can carry it; raises :class:`InvalidArgument` if it cannot be read."""
    try:
        return decode_cbor_document(data, "the sample's data")
    except InvalidArgument:
        pass
    # Older samples may hold CBOR-only values (byte strings, say): shown as
    # json_safe shows them, within the same depth and size bounds.
    from .wire import WireError, scan_cbor

    if len(data) > MAX_DOCUMENT_BYTES:
        raise InvalidArgument(f"the sample's data is larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        if scan_cbor(data, 0, MAX_DOCUMENT_DEPTH, 10_000) != len(data):
            raise InvalidArgument("the sample's data has bytes after its CBOR value")
        return json_safe(cbor2.loads(data))
    except WireError as error:
        raise InvalidArgument(f"the sample's data is not readable CBOR: {error}") from None
    except Exception as error:  # noqa: BLE001 - cbor2 raises several types
        raise InvalidArgument(f"the sample's data is not readable CBOR: {error}") from None


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


# What to do with a telemetry file that cannot be read, in the message that stops start-up.
_ADVICE = "move it away to start with an empty telemetry store"


def open_database(path: Path, durability: str, schema: str) -> sqlite3.Connection:
    """Open (or create) a telemetry database for its one writer (``sqlite_writer.SqliteWriter``).

    A file that is not a healthy SQLite database stops start-up with
    :class:`StoreCorrupt` and is left untouched.
    """
    try:
        return connect_writer(
            path, durability, lambda conn: conn.executescript(schema + _COUNTERS),
            check=partial(check_readable, what="telemetry database", advice=_ADVICE),
        )
    except StoreCorrupt:
        raise
    except StoreError as error:
        raise StoreCorrupt(
            f"{path} is not a readable telemetry database ({error}). It was left untouched: {_ADVICE}."
        ) from error


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
