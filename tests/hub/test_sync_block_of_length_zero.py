"""An update holding a block of length 0, sent to a real hub over the sync WebSocket.

yrs 0.28 took the 7-byte update ``01 01 00 01 00 00 00`` (one garbage-collected
block of length 0) and the hub acknowledged it; every later diff of that
document then divided by zero, a Rust panic, so the hub closed every session
of the site that asked for one until it restarted. The update must be refused
with an error frame, and the site's next session gets its diff.
"""

from __future__ import annotations

import httpx
from agents import HubProcess
from test_hostile_sync import assert_up, data, error_codes, hello, kv_raw, talk

from konsul.sync.wire import encode

BLOCK_OF_LENGTH_ZERO = bytes.fromhex("01010001000000")


def _kinds(messages: list) -> list[str]:
    return [m["t"] for m in messages if isinstance(m, dict)]


def test_an_update_with_a_block_of_length_zero_is_refused_and_the_next_session_gets_its_diff(tmp_path):
    hub = HubProcess(tmp_path / "hub")
    try:
        refused, _closed = talk(hub.url, [hello(), data(BLOCK_OF_LENGTH_ZERO)],
                                until=lambda m: {"ack", "error"} & set(_kinds(m)))
        assert error_codes(refused) == ["bad_update"] and "ack" not in _kinds(refused), refused
        httpx.put(f"{hub.url}/v1/kv/acknowledged?dc=s1", content=b"after").raise_for_status()

        # The diff of the same document, which panicked once it held the block.
        state_vector = encode({"t": "sv", "s": "s1", "c": "kv", "e": 1, "sv": b"\x00"})
        answered, closed = talk(hub.url, [hello(), state_vector],
                                until=lambda m: any(x.get("t") == "data" for x in m if isinstance(x, dict)))
        assert not closed and not error_codes(answered), answered
        (diff,) = [m["u"] for m in answered if isinstance(m, dict) and (m.get("t"), m.get("s"), m.get("c")) == ("data", "s1", "kv")]
        assert b"acknowledged\x00" in diff

        assert_up(hub)
        assert kv_raw(hub.url, "acknowledged", "s1") == b"after"
    finally:
        hub.stop()
