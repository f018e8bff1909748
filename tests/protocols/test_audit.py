"""The audit log (protocols/audit.py): lines, rotation, drops with a slow sink, no secrets."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import trio
from prometheus_client import CollectorRegistry

from konsul.protocols.audit import BATCH, FIELDS, AuditLog, RotatingFileSink, StdoutSink, open_audit_log


class ListSink:
    """Collects lines; ``gate`` (when given) holds every write until it is set."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.lines: list[bytes] = []
        self.gate = gate
        self.entered = threading.Event()

    def write(self, lines: list[bytes]) -> None:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30), "the test never released the sink"
        self.lines.extend(lines)

    def close(self) -> None:
        pass


def record(audit: AuditLog, number: int = 0, **overrides) -> None:
    event = dict(
        accessor="9c0e1d2a-0000-4000-8000-000000000001", source="10.0.0.7", interface="http",
        operation="kv:write", resource=f"app/key-{number}", result="allowed", reason="",
    )
    event.update(overrides)
    audit.record(**event)


async def until(condition, what: str) -> None:
    with trio.fail_after(10):
        while not condition():
            await trio.sleep(0.005)  # polling a condition, not waiting for time to pass
    assert condition(), what


async def test_events_become_json_lines_in_field_order() -> None:
    sink = ListSink()
    registry = CollectorRegistry()
    audit = AuditLog(sink, registry, clock=lambda: 1764943200.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(audit.run)
        record(audit)
        record(audit, accessor=None, result="denied", reason="permission_denied: key:write on 'x'")
        await until(lambda: len(sink.lines) == 2, "both lines written")
        nursery.cancel_scope.cancel()
    first, second = (json.loads(line) for line in sink.lines)
    assert list(first) == list(FIELDS)
    assert first["time"] == "2025-12-05T14:00:00.500Z" and first["resource"] == "app/key-0"
    assert second["accessor"] == "anonymous" and second["result"] == "denied"
    assert registry.get_sample_value("konsul_audit_events_total", {"interface": "http", "result": "denied"}) == 1
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in sink.lines)


async def test_a_slow_sink_drops_and_counts_and_never_blocks_the_loop() -> None:
    gate = threading.Event()
    sink = ListSink(gate)
    registry = CollectorRegistry()
    audit = AuditLog(sink, registry, queue_size=100)
    async with trio.open_nursery() as nursery:
        await nursery.start(audit.run)
        record(audit, 0)
        await trio.to_thread.run_sync(sink.entered.wait)  # the first batch is stuck in the sink
        for number in range(1, 1001):  # returns at once each time, though the disk is stuck
            record(audit, number)
        assert audit.dropped == 1000 - 100
        assert registry.get_sample_value("konsul_audit_dropped_total") == 900
        gate.set()
        await until(lambda: audit.written == 101, "the queued events written once the sink frees up")
        nursery.cancel_scope.cancel()
    assert audit.recorded == audit.written + audit.dropped == 1001
    assert registry.get_sample_value("konsul_audit_events_total", {"interface": "http", "result": "allowed"}) == 1001
    written = [json.loads(line)["resource"] for line in sink.lines]
    assert written == [f"app/key-{n}" for n in range(101)]  # the oldest kept, in order


async def test_a_failing_sink_counts_its_batch_as_dropped_and_the_log_goes_on() -> None:
    class FullDisk(ListSink):
        fail = True

        def write(self, lines):
            if self.fail:
                self.fail = False
                raise OSError(28, "No space left on device")
            super().write(lines)

    sink = FullDisk()
    audit = AuditLog(sink)
    async with trio.open_nursery() as nursery:
        await nursery.start(audit.run)
        record(audit, 0)
        await until(lambda: audit.dropped == 1, "the failed batch counted")
        record(audit, 1)
        await until(lambda: audit.written == 1, "the next event written")
        nursery.cancel_scope.cancel()
    assert [json.loads(line)["resource"] for line in sink.lines] == ["app/key-1"]


def test_any_text_encodes_to_one_valid_json_line() -> None:
    hostile = 'a"b\\c\n\r\x00\u2028\udcff' + "é" * 3
    line = AuditLog.encode((0.0, hostile, hostile, "http", hostile, hostile, "denied", hostile))
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    decoded = json.loads(line)
    assert decoded["resource"] == hostile and decoded["reason"] == hostile and list(decoded) == list(FIELDS)


def test_rotation_keeps_n_files_by_size(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    sink = RotatingFileSink(path, max_bytes=1000, keep=2)
    line = b"x" * 99 + b"\n"
    for number in range(35):  # 3,500 bytes: the file rotates three times
        sink.write([line[:-3] + b"%02d\n" % number])
    sink.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["audit.log", "audit.log.1", "audit.log.2"]  # the oldest file was dropped
    assert all(p.stat().st_size <= 1000 for p in tmp_path.iterdir())
    newest = path.read_bytes().splitlines()
    assert newest[-1].endswith(b"34") and path.with_name("audit.log.1").read_bytes().splitlines()[-1].endswith(b"29")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    # Reopening appends where it left off.
    again = RotatingFileSink(path, max_bytes=1000, keep=2)
    again.write([b"more\n"])
    again.close()
    assert path.read_bytes().endswith(b"34\nmore\n")


def test_keep_zero_starts_the_file_again(tmp_path: Path) -> None:
    sink = RotatingFileSink(tmp_path / "audit.log", max_bytes=10, keep=0)
    sink.write([b"123456789\n"])
    sink.write([b"abc\n"])
    sink.close()
    assert [p.name for p in tmp_path.iterdir()] == ["audit.log"]
    assert (tmp_path / "audit.log").read_bytes() == b"abc\n"


async def test_no_secret_is_ever_written(tmp_path: Path) -> None:
    secret = "5b8e2b7c-61f4-4c6a-9d8a-3f0b7d1c2e9a"
    audit = open_audit_log("", tmp_path, 1 << 20, 2)
    async with trio.open_nursery() as nursery:
        await nursery.start(audit.run)
        # What a route has in hand when it records: the path with the query string
        # (?token=), and the accessor, never the secret.
        record(audit, resource=f"/v1/kv/app/x?token={secret}&recurse")
        record(audit, operation="acl:token:read", resource=f"app/y?token={secret}")
        await until(lambda: audit.written == 2, "both events written")
        nursery.cancel_scope.cancel()
    audit.close()
    stored = (tmp_path / "audit.log").read_text()
    assert secret not in stored
    assert [json.loads(line)["resource"] for line in stored.splitlines()] == ["/v1/kv/app/x", "app/y"]


async def test_long_fields_are_cut_and_queued_events_are_written_on_shutdown(tmp_path: Path) -> None:
    audit = open_audit_log(str(tmp_path / "sub" / "a.log"), tmp_path, 1 << 20, 1)
    async with trio.open_nursery() as nursery:
        await nursery.start(audit.run)
        nursery.cancel_scope.cancel()
        record(audit, resource="k" * 100_000)  # queued as the task is being cancelled
    audit.close()
    line = json.loads((tmp_path / "sub" / "a.log").read_text())
    assert line["resource"] == "k" * 1024 + "..."


def test_open_audit_log_choices(tmp_path: Path) -> None:
    assert open_audit_log("off", tmp_path, 10, 1) is None
    assert isinstance(open_audit_log("-", tmp_path, 10, 1).sink, StdoutSink)
    assert open_audit_log("", tmp_path, 10, 1).sink.path == tmp_path / "audit.log"


async def test_a_burst_of_several_batches_is_written_whole_in_one_gathering() -> None:
    # The writer waits FLUSH_DELAY_S once, then writes everything gathered, BATCH at a time:
    # at thousands of writes a second it must not fall behind one batch per wait and drop.
    sink = ListSink()
    audit = AuditLog(sink, queue_size=10_000)
    async with trio.open_nursery() as nursery:
        await nursery.start(audit.run)
        for number in range(5 * BATCH):
            record(audit, number)
        await until(lambda: len(sink.lines) == 5 * BATCH, "the whole burst written")
        nursery.cancel_scope.cancel()
    assert audit.dropped == 0 and audit.written == 5 * BATCH
