"""``Scope.kv_submit``: the device gateways' KV writes go through the scope's one put group."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from konsul.sync.errors import InvalidKey
from konsul.sync.replica import Replica


async def test_submitted_writes_share_a_group_with_http_puts_and_report_in_order_once_durable(tmp_path):
    replica = Replica.open(tmp_path / "data")
    reports: list[tuple[str, BaseException | None]] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            scope = replica.scope("s1")
            await scope.kv_put("warm", b"up")
            rounds = replica.store.rounds
            for i in range(50):
                scope.kv_submit(("set", f"dev/{i}", b"v%d" % i, 0), lambda error, i=i: reports.append((f"dev/{i}", error)))
            assert scope.kv.get("dev/49").value == b"v49"  # visible at once, as a kv_put is
            assert reports == []  # but reported only once durable
            nursery.start_soon(scope.kv_put, "http/1", b"h")  # an HTTP put arriving with them joins
            await trio.testing.wait_all_tasks_blocked()
            with trio.fail_after(10):
                while len(reports) < 50 or scope.kv.get("http/1") is None:
                    await trio.sleep(0.01)  # polling under a deadline
            assert [key for key, _ in reports] == [f"dev/{i}" for i in range(50)]
            assert all(error is None for _, error in reports)
            assert replica.store.rounds - rounds == 1  # fifty-one writes, one commit
            nursery.cancel_scope.cancel()
    finally:
        replica.close()
    again = Replica.open(tmp_path / "data")
    try:
        scope = again.scope("s1")
        assert [scope.kv.get(f"dev/{i}").value for i in range(50)] == [b"v%d" % i for i in range(50)]
        assert scope.kv.get("http/1").value == b"h"
    finally:
        again.close()


async def test_a_submitted_delete_keeps_its_place_and_a_bad_write_changes_nothing(tmp_path):
    replica = Replica.open(tmp_path / "data")
    order: list[str] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            scope = replica.scope("s1")
            scope.kv_submit(("set", "a", b"1", 0), lambda error: order.append("set a"))
            scope.kv_submit(("delete", "a"), lambda error: order.append("delete a"))
            scope.kv_submit(("delete", "never-there"), lambda error: order.append("delete nothing"))
            scope.kv_submit(("set", "b", b"2", 0), lambda error: order.append("set b"))
            with pytest.raises(InvalidKey):
                scope.kv_submit(("set", "/bad", b"x", 0), lambda error: order.append("bad"))
            with trio.fail_after(10):
                while len(order) < 4:
                    await trio.sleep(0.01)
            assert order == ["set a", "delete a", "delete nothing", "set b"]
            assert scope.kv.get("a") is None and scope.kv.get("b").value == b"2"
            nursery.cancel_scope.cancel()
    finally:
        replica.close()
