"""What an ACL check costs: resolving a secret and ``Authorizer.allows`` with 20 policies.

    .venv/bin/python bench/acl_check.py

Runs in-process on a temporary replica: 20 policies of 4 rules each (literal
prefixes, an exact deny, a service prefix and a glob prefix), one token
linking all of them. Prints microseconds per call.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path

import trio

from konsul.sync import acl
from konsul.sync.acl import AclPolicy
from konsul.sync.acl_resolver import AclResolver
from konsul.sync.replica import GLOBAL_SCOPE, Replica

CALLS = 100_000


def per_call_us(started: float, calls: int) -> float:
    return (time.perf_counter() - started) / calls * 1e6


async def main() -> None:
    with tempfile.TemporaryDirectory() as data:
        replica = Replica.open(Path(data) / "r")
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            scope = replica.scope(GLOBAL_SCOPE)
            ids = []
            for i in range(20):
                policy_id = str(uuid.uuid4())
                ids.append(policy_id)
                rules = (
                    f'key_prefix "team{i}/" {{ policy = "write" }}\nkey "team{i}/locked" {{ policy = "deny" }}\n'
                    f'service_prefix "svc{i}" {{ policy = "read" }}\nkey_prefix "sites/*/team{i}/" {{ policy = "read" }}'
                )
                await acl.put_policy(scope, AclPolicy(policy_id, f"p{i}", rules=rules))
            _, secret = await acl.create_token(scope, "bench", ids)
            resolver = AclResolver(replica, "s1")
            authorizer = resolver.authorizer(secret)

            known = [f"team{i % 25}/k{i % 1000}" for i in range(CALLS)]
            started = time.perf_counter()
            for name in known:
                authorizer.allows("key", name, "write")
            print(f"allows(), 20 policies, 1,000 names seen before: {per_call_us(started, CALLS):.2f} us")
            fresh = [f"team{i % 25}/u{i}" for i in range(CALLS)]
            started = time.perf_counter()
            for name in fresh:
                authorizer.allows("key", name, "write")
            print(f"allows(), 20 policies, every name new:          {per_call_us(started, CALLS):.2f} us")
            started = time.perf_counter()
            for name in known:
                resolver.authorizer(secret).allows("key", name, "write")
            print(f"resolve the secret + allows() (one request):    {per_call_us(started, CALLS):.2f} us")
            started = time.perf_counter()
            for _ in range(200):
                resolver._principals.clear()
                resolver.principal(secret)
            print(f"rebuild the authorizer after an ACL change:     {per_call_us(started, 200):.0f} us")
            nursery.cancel_scope.cancel()
        replica.close()


if __name__ == "__main__":
    trio.run(main)
