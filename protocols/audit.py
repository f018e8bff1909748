"""The audit log: every write and every refusal, as JSON lines.

Theory of operation: an interface calls :meth:`AuditLog.record` (synchronous,
never blocks, never raises) when it has decided a request. The event goes into
a bounded in-memory queue; one trio task (:meth:`AuditLog.run`) drains the
queue in batches and hands each batch to the sink in a worker thread, so the
event loop never waits for the disk. When the sink is slower than the events
arrive, the queue fills and further events are dropped and counted
(``konsul_audit_dropped_total``) instead of slowing the agent or growing its
memory; a sink that fails (disk full) drops its batch, counted the same way.

A line (keys in this order)::

    {"time": "2026-12-05T14:00:00.123Z", "accessor": "9c0e...", "source": "10.0.0.7",
     "interface": "http", "operation": "kv:write", "resource": "app/config",
     "result": "denied", "reason": "permission_denied: key:write on 'app/config'"}

``accessor`` is the token's AccessorID (``anonymous`` without a token, the
device id for a device): never the secret. ``record`` takes no secret, and a
resource is cut at ``?`` so a query string (``?token=...``) cannot carry one in.

Sinks: a file with size-based rotation (``audit.log``, ``audit.log.1`` ...
``audit.log.<keep>``), or stdout (``-``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import trio

from konsul.sync.log_limits import peer_log

log = logging.getLogger("konsul.audit")

DEFAULT_QUEUE = 10_000  # events waiting for the sink, at most (~300 bytes each)
DEFAULT_MAX_BYTES = 64 * 2**20
DEFAULT_KEEP = 5
BATCH = 512  # events written per worker-thread call
# After an event arrives the writer waits this long for more before handing a
# batch to a worker thread: a thread round trip costs more CPU than a durable
# KV write, so one per event would make every write much dearer (measured with
# bench/http_kv.py: ~+100 us per PUT). An event is on disk within this delay.
FLUSH_DELAY_S = 0.2
MAX_FIELD_CHARS = 1024  # a resource or reason longer than this is cut (a line stays bounded)

FIELDS = ("time", "accessor", "source", "interface", "operation", "resource", "result", "reason")
_NAMES = [f'"{name}":' for name in FIELDS]
_quote = json.encoder.encode_basestring  # a JSON string literal; escapes quotes and control characters


class AuditSink(Protocol):
    def write(self, lines: list[bytes]) -> None: ...

    def close(self) -> None: ...


class StdoutSink:
    """Lines to the process's standard output (``--audit-log -``)."""

    def __init__(self, stream: Any = None) -> None:
        self._stream = stream if stream is not None else sys.stdout.buffer

    def write(self, lines: list[bytes]) -> None:
        self._stream.write(b"".join(lines))
        self._stream.flush()

    def close(self) -> None:
        self._stream.flush()


class RotatingFileSink:
    """Lines appended to ``path``; past ``max_bytes`` it becomes ``path.1`` and so on.

    ``keep`` rotated files are kept (``path.1`` newest, ``path.<keep>`` oldest);
    with ``keep`` 0 the file is simply started again. A single batch may take
    the file past ``max_bytes`` by at most one batch: rotation happens between
    batches, never inside a line.
    """

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP) -> None:
        if max_bytes < 1 or keep < 0:
            raise ValueError("--audit-max-bytes must be positive and --audit-keep not negative")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # 0o600: the log names who did what; other users of the machine need not read it.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = os.fstat(self._fd).st_size

    def write(self, lines: list[bytes]) -> None:
        data = b"".join(lines)
        if self._size and self._size + len(data) > self.max_bytes:
            self._rotate()
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._size += len(data)

    def _rotate(self) -> None:
        os.close(self._fd)
        if self.keep:
            for number in range(self.keep - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{number}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{number + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        else:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC
        self._fd = os.open(self.path, flags, 0o600)
        self._size = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _field(value: object) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= MAX_FIELD_CHARS else text[:MAX_FIELD_CHARS] + "..."


_second: list = [None, ""]  # the last whole second formatted (events come many per second)


def format_time(epoch_s: float) -> str:
    ms = int(epoch_s * 1000)
    second = ms // 1000
    if _second[0] != second:
        _second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_second[1]}.{ms % 1000:03d}Z"


class AuditLog:
    """The agent's audit log: :meth:`record` from anywhere in the trio thread, :meth:`run` as a task.

    Args:
        sink: where lines go (:class:`RotatingFileSink`, :class:`StdoutSink`, or a test's own).
        registry: a Prometheus registry for ``konsul_audit_events_total`` and
            ``konsul_audit_dropped_total``, or None.
        queue_size: events held while the sink catches up; past it, events are dropped.
        clock: wall-clock seconds for the ``time`` field.
    """

    def __init__(
        self, sink: AuditSink, registry: Any = None, queue_size: int = DEFAULT_QUEUE, clock: Callable[[], float] = time.time
    ) -> None:
        self.sink = sink
        self._clock = clock
        # A plain deque and a wake-up, not a memory channel: record() runs once per device
        # message (MQTT, CoAP) and a channel's send_nowait cost a few times an append.
        self._queue: deque[tuple] = deque()
        self._queue_size = queue_size
        self._wake: trio.Event | None = None  # set while run() waits for a first event
        self.recorded = 0
        self.written = 0
        self.dropped = 0
        self._events = self._dropped = None
        self._event_counters: dict[tuple[str, str], Any] = {}
        if registry is not None:
            from prometheus_client import Counter

            self._events = Counter(
                "konsul_audit_events", "Audit events recorded (written or dropped), by interface and result",
                ["interface", "result"], registry=registry,
            )
            self._dropped = Counter(
                "konsul_audit_dropped", "Audit events lost: the queue was full (slow sink) or the sink failed",
                registry=registry,
            )

    def record(
        self,
        *,
        accessor: str | None,
        source: str,
        interface: str,
        operation: str,
        resource: str,
        result: str,
        reason: str = "",
    ) -> None:
        """Log one decided request; returns at once (drops and counts it if the queue is full).

        ``accessor`` is the principal's AccessorID (None: anonymous), ``operation``
        what was asked (``kv:write``, ``acl:token:create``...), ``result``
        ``allowed``, ``denied``, ``rate_limited`` or ``failed``, ``reason`` why
        (the error code and detail of a refusal).
        """
        self.recorded += 1
        if self._events is not None:
            counter = self._event_counters.get((interface, result))
            if counter is None:  # labels() costs more than the rest of record(): once per pair
                counter = self._event_counters[(interface, result)] = self._events.labels(interface, result)
            counter.inc()
        event = (
            self._clock(),
            accessor or "anonymous",
            source,
            interface,
            operation,
            resource.split("?", 1)[0],  # a query string may hold ?token=<secret>
            result,
            reason,
        )
        if len(self._queue) >= self._queue_size:
            self._drop(1)
            return
        self._queue.append(event)
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set()

    def _drop(self, count: int) -> None:
        self.dropped += count
        if self._dropped is not None:
            self._dropped.inc(count)

    @staticmethod
    def encode(event: tuple) -> bytes:
        """One JSON line, fields in :data:`FIELDS` order (built by hand: 4x faster than json.dumps)."""
        when, *rest = event
        values = (format_time(when), *(_field(value) for value in rest))
        body = ",".join(f"{_NAMES[i]}{_quote(value)}" for i, value in enumerate(values))
        # backslashreplace: a lone surrogate (from a path decoded with surrogateescape)
        # becomes the JSON escape \udcXX instead of an error in the writer.
        return ("{" + body + "}\n").encode("utf-8", "backslashreplace")

    def _write(self, events: list[tuple]) -> None:
        self.sink.write([self.encode(event) for event in events])

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drain the queue into the sink until cancelled; what is queued then is written first."""
        task_status.started()
        batch: list[tuple] = []  # taken from the queue, not yet written: written on the way out too
        queue = self._queue
        try:
            while True:
                if not queue:
                    self._wake = trio.Event()
                    await self._wake.wait()
                await trio.sleep(FLUSH_DELAY_S)
                while queue:  # everything gathered meanwhile, BATCH at a time, before waiting again
                    batch = [queue.popleft() for _ in range(min(BATCH, len(queue)))]
                    await self._flush(batch)
                    batch = []
        finally:
            with trio.CancelScope(shield=True):
                await self._drain_rest(batch)

    async def _flush(self, batch: list[tuple]) -> None:
        try:
            await trio.to_thread.run_sync(self._write, batch)
        except Exception as error:  # noqa: BLE001 - a failing sink loses its batch, never the agent
            self._drop(len(batch))
            peer_log.log(log, logging.WARNING, ("audit", "sink"), "audit log: %d events lost: %s", len(batch), error)
        else:
            self.written += len(batch)

    async def _drain_rest(self, rest: list[tuple]) -> None:
        rest.extend(self._queue)
        self._queue.clear()
        if rest:
            with trio.move_on_after(5):  # shutdown must not hang on a stuck disk
                await self._flush(rest)

    def close(self) -> None:
        self.sink.close()


def open_audit_log(spec: str, data_dir: Path, max_bytes: int, keep: int, registry: Any = None) -> AuditLog | None:
    """The log ``--audit-log`` names: ``-`` stdout, ``off`` none, empty ``<data-dir>/audit.log``, else a path."""
    if spec == "off":
        return None
    if spec == "-":
        return AuditLog(StdoutSink(), registry)
    path = Path(spec) if spec else Path(data_dir) / "audit.log"
    return AuditLog(RotatingFileSink(path, max_bytes, keep), registry)
