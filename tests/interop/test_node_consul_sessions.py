"""node-consul (npm ``consul``, installed by scripts/setup) sessions and locks against a real edge."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from agents import EdgeProcess

NODE_CLIENTS = Path(__file__).resolve().parent / "node"


def test_node_consul_sessions_and_a_lock(tmp_path):
    """node-consul's session calls and kv.set acquire/release against a real edge (tests/interop/node/sessions.js)."""
    assert (NODE_CLIENTS / "node_modules" / "consul").is_dir(), "run scripts/setup (npm install in tests/interop/node)"
    edge = EdgeProcess(tmp_path / "edge", node="n1")
    try:
        result = subprocess.run(["node", str(NODE_CLIENTS / "sessions.js"), str(edge.port)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        seen = json.loads(result.stdout)
    finally:
        edge.stop()
    a, b = seen["a"], seen["b"]
    assert seen["info"] == {"Name": "node-a", "TTL": "30s", "Behavior": "release", "Node": "n1"}
    assert set(seen["listed"]) == set(seen["onNode"]) == {a, b} and seen["renewed"] == [a]
    # Never two holders: b's acquire is refused while a holds the lock, and b cannot release it.
    assert seen["acquiredByA"] is True and seen["acquiredByB"] is False
    assert seen["held"] == {"Session": a, "LockIndex": 1, "Value": "held by a"}
    assert seen["releasedByB"] is False and seen["releasedByA"] is True
    assert seen["free"] == {"Session": None, "Value": "free"}
    # Destroying b releases what it held (behavior release); its info is gone.
    assert seen["reacquiredByB"] is True and seen["afterDestroy"] == {"Session": None, "LockIndex": 2}
    assert seen["infoAfterDestroy"] is None and seen["left"] == []
