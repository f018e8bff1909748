"""`konsul audit tail` on a log written by the audit log's own file sink."""

from __future__ import annotations

import json
import os

from agents import AgentProcess
from test_client_commands import fails, konsul, ok

from konsul.protocols.audit import AuditLog, RotatingFileSink


def line(number: int, result: str = "allowed", reason: str = "") -> bytes:
    return AuditLog.encode((1764943200.0 + number, f"acc-{number}", "10.0.0.7", "http", "kv:write",
                            f"app/k{number}", result, reason))


def test_audit_tail_lines_json_rotated_files_and_follow(tmp_path):
    sink = RotatingFileSink(tmp_path / "audit.log", max_bytes=2_000, keep=3)
    for number in range(20):  # ~190 bytes a line: audit.log.1 holds the older ones
        sink.write([line(number)])
    sink.write([line(20, "denied", "permission_denied: key:write on 'app/k20'")])
    assert (tmp_path / "audit.log.1").exists()

    shown = ok(konsul(None, "audit", "tail", "--data-dir", str(tmp_path), "--lines", "3")).splitlines()
    assert len(shown) == 3
    assert shown[0].startswith("2025-12-05T14:00:18.000Z  allowed") and "app/k18" in shown[0]
    assert "denied" in shown[2] and "by acc-20 from 10.0.0.7" in shown[2] and "(permission_denied:" in shown[2]

    every = ok(konsul(None, "audit", "tail", "--file", str(tmp_path / "audit.log"), "--lines", "100", "--json"))
    events = [json.loads(text) for text in every.splitlines()]
    assert [e["resource"] for e in events] == [f"app/k{n}" for n in range(21)]  # reached into audit.log.1

    assert "no audit log at" in fails(konsul(None, "audit", "tail", "--data-dir", str(tmp_path / "none")))
    assert "--data-dir" in fails(konsul(None, "audit", "tail"), 2)

    follower = AgentProcess(["audit", "tail", "--data-dir", str(tmp_path), "--lines", "0", "--follow", "--json"],
                            env={"KONSUL_DATA_DIR": ""})
    try:
        follower.wait_for("konsul: following")
        sink.write([line(21)])
        follower.wait_for(r'"resource":"app/k21"')
        # Past rotations (a file holds 10 lines): the follower reads the rest of the old
        # file, then the new one. Nine lines at a time cross at most one rotation.
        for first in (22, 31):
            for number in range(first, first + 9):
                sink.write([line(number)])
            follower.wait_for(rf'"resource":"app/k{first + 8}"')
    finally:
        assert follower.stop() == 0
    sink.close()
    followed = [json.loads(text)["resource"] for text in follower.lines if not text.startswith("konsul:")]
    assert followed == [f"app/k{n}" for n in range(21, 40)], follower.output
    assert oct(os.stat(tmp_path / "audit.log").st_mode & 0o777) == "0o600"
