"""What a device's access check costs per message (MQTT and CoAP ask it for every one).

    .venv/bin/python bench/device_acl.py

Runs in-process on a temporary replica: a device with ``KVWrite`` shorthands
linking 5 policies (literal and glob prefixes, a device rule), checked the way
the gateways check a message: ``DeviceAccess.rights(record)`` (the cached
lookup against the record's stamp and the ACL generations) and then
``allows``. Also the ACLs-off path, the MQTT topic check, the rate limit's
``take`` and a rebuild after an ACL change. Prints microseconds per call.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path

import trio

from konsul.protocols.device_access import DeviceAccess
from konsul.protocols.gateway import GatewayContext
from konsul.protocols.mqtt.topics import check_publish
from konsul.protocols.rate_limit import TokenBuckets
from konsul.sync import acl
from konsul.sync.acl import AclPolicy
from konsul.sync.acl_resolver import AclResolver
from konsul.sync.devices import DeviceRecord, PresenceTable
from konsul.sync.replica import GLOBAL_SCOPE, Replica

from acl_check import per_call_us  # bench/acl_check.py, beside this script

CALLS = 200_000


async def main() -> None:
    with tempfile.TemporaryDirectory() as data:
        replica = Replica.open(Path(data) / "r")
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            scope = replica.scope(GLOBAL_SCOPE)
            ids = []
            for i in range(5):
                policy_id = str(uuid.uuid4())
                ids.append(policy_id)
                rules = (
                    f'key_prefix "team{i}/" {{ policy = "write" }}\n'
                    f'key_prefix "sensors/*/cfg{i}" {{ policy = "write" }}\n'
                    f'device_prefix "pump-{i}" {{ policy = "write" }}'
                )
                await acl.put_policy(scope, AclPolicy(policy_id, f"p{i}", rules=rules))
            site = replica.scope("s1")
            record, _token = await site.put_device(
                DeviceRecord("dev-1", kv_read=("cfg/",), kv_write=("app/",), policy_ids=tuple(ids))
            )
            for enabled in (True, False):
                ctx = GatewayContext(replica, "s1", PresenceTable(), acl=AclResolver(replica, "s1", enabled=enabled))
                access = DeviceAccess(ctx)
                keys = [f"sensors/s{i % 100}/cfg{i % 5}" for i in range(CALLS)]
                started = time.perf_counter()
                for key in keys:
                    access.rights(record).allows("key", key, "write")
                label = "on " if enabled else "off"
                print(f"ACLs {label}: rights(record) + allows(), 500 keys seen before: {per_call_us(started, CALLS):.2f} us")
                topics = [f"konsul/v1/kv/app/k{i % 1000}" for i in range(CALLS)]
                started = time.perf_counter()
                for topic in topics:
                    check_publish(record, topic, access.rights(record))
                print(f"ACLs {label}: MQTT check_publish with rights (parse + check):  {per_call_us(started, CALLS):.2f} us")
            bucket = TokenBuckets(20_000, 40_000, interface="mqtt", kind="device")
            started = time.perf_counter()
            for _ in range(CALLS):
                bucket.take("dev-1")
            print(f"rate limit take():                                         {per_call_us(started, CALLS):.2f} us")
            access = DeviceAccess(GatewayContext(replica, "s1", PresenceTable(), acl=AclResolver(replica, "s1")))
            rounds = 200
            started = time.perf_counter()
            for n in range(rounds):
                access._cache.clear()  # as after any ACL change: the next message rebuilds
                access.rights(record).allows("key", "app/x", "write")
            print(f"rebuild a device's rights (5 policies, parsed rules cached): {per_call_us(started, rounds):.1f} us")
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
