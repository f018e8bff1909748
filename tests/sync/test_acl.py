"""ACL tokens and policies as replicated records, through real replicas and their stores."""

from __future__ import annotations

import pytest
from sync_support import BASE_MS, WallClock, send

from konsul.sync import acl
from konsul.sync.acl import (
    ANONYMOUS_ACCESSOR,
    MANAGEMENT_POLICY_ID,
    AclNotFound,
    AclPolicy,
    BootstrapNotAllowed,
)
from konsul.sync.acl_resolver import AclResolver
from konsul.sync.errors import InvalidArgument, NotFound
from konsul.sync.replica import GLOBAL_SCOPE

APP_WRITE = 'key_prefix "app/" { policy = "write" }'
POLICY_ID = "6a1253d2-1785-24fd-91c2-f8e78c745511"


def stored_bytes(data_dir) -> bytes:
    """Every byte the replica keeps on disk (database, WAL and shared memory)."""
    return b"".join(path.read_bytes() for path in sorted(data_dir.rglob("*")) if path.is_file())


async def app_token(scope, **kwargs):
    await acl.put_policy(scope, AclPolicy(POLICY_ID, "app-write", rules=APP_WRITE))
    return await acl.create_token(scope, "app", [POLICY_ID], **kwargs)


async def test_bootstrap_once_and_the_token_manages(open_replica):
    replica = await open_replica("a")
    scope = replica.scope(GLOBAL_SCOPE)
    token, secret = await acl.bootstrap(scope)
    assert token.policy_ids == (MANAGEMENT_POLICY_ID,)
    with pytest.raises(BootstrapNotAllowed, match="no longer allowed"):
        await acl.bootstrap(scope)
    resolver = AclResolver(replica, "s1")
    assert resolver.authorizer(secret).allows("acl", "", "write")
    assert resolver.authorizer(secret).allows("key", "anything", "write")
    # The anonymous token exists and may do nothing until given policies.
    assert scope.acl.token(ANONYMOUS_ACCESSOR) is not None
    assert not resolver.authorizer(None).allows("key", "x", "read")


async def test_a_token_follows_its_policy_and_the_secret_is_only_hashed(open_replica, tmp_path):
    replica = await open_replica("a")
    scope = replica.scope(GLOBAL_SCOPE)
    token, secret = await app_token(scope)
    resolver = AclResolver(replica, "s1")
    principal = resolver.principal(secret)
    assert principal.token.accessor_id == token.accessor_id and principal.scope == GLOBAL_SCOPE
    assert principal.authorizer.allows("key", "app/x", "write")
    assert not principal.authorizer.allows("key", "other", "read")
    assert scope.acl.token(token.accessor_id).secret_hash != secret
    # Make sure the token is on disk, then look for the secret in every stored byte.
    assert token.accessor_id.encode() in stored_bytes(tmp_path / "a")
    assert secret.encode() not in stored_bytes(tmp_path / "a")


async def test_tokens_and_policies_survive_a_restart(tmp_path):
    from konsul.sync.replica import Replica
    from sync_support import running

    async with running(Replica.open(tmp_path / "r", wall_ms=WallClock())) as replica:
        token, secret = await app_token(replica.scope(GLOBAL_SCOPE))
        _, manager = await acl.bootstrap(replica.scope(GLOBAL_SCOPE))
    async with running(Replica.open(tmp_path / "r", wall_ms=WallClock())) as replica:
        resolver = AclResolver(replica, "s1")
        assert resolver.authorizer(secret).allows("key", "app/x", "write")
        assert resolver.principal(secret).token.accessor_id == token.accessor_id
        assert resolver.authorizer(manager).management
        assert replica.scope(GLOBAL_SCOPE).acl.policy_named("app-write").rules == APP_WRITE
        with pytest.raises(BootstrapNotAllowed):
            await acl.bootstrap(replica.scope(GLOBAL_SCOPE))


async def test_unknown_and_revoked_secrets_are_refused(open_replica):
    replica = await open_replica("a")
    scope = replica.scope(GLOBAL_SCOPE)
    token, secret = await app_token(scope)
    resolver = AclResolver(replica, "s1")
    with pytest.raises(AclNotFound):
        resolver.principal("00000000-1111-2222-3333-444444444444")
    assert resolver.authorizer(secret).allows("key", "app/x", "write")  # cached from here on
    await acl.delete_token(scope, token.accessor_id)
    with pytest.raises(AclNotFound):
        resolver.principal(secret)
    with pytest.raises(NotFound):
        await acl.delete_token(scope, token.accessor_id)


async def test_policy_changes_reach_cached_authorizers(open_replica):
    replica = await open_replica("a")
    scope = replica.scope(GLOBAL_SCOPE)
    _, secret = await app_token(scope)
    resolver = AclResolver(replica, "s1")
    assert not resolver.authorizer(secret).allows("key", "ops/x", "read")
    await acl.put_policy(scope, AclPolicy(POLICY_ID, "app-write", rules='key_prefix "ops/" { policy = "read" }'))
    assert resolver.authorizer(secret).allows("key", "ops/x", "read")
    assert not resolver.authorizer(secret).allows("key", "app/x", "write")
    await acl.delete_policy(scope, POLICY_ID)
    assert not resolver.authorizer(secret).allows("key", "ops/x", "read")


async def test_token_update_keeps_the_secret(open_replica):
    replica = await open_replica("a")
    scope = replica.scope(GLOBAL_SCOPE)
    token, secret = await app_token(scope)
    updated = await acl.update_token(scope, token.accessor_id, "no rights", [])
    assert updated.secret_hash == token.secret_hash and updated.description == "no rights"
    resolver = AclResolver(replica, "s1")
    assert not resolver.authorizer(secret).allows("key", "app/x", "read")


async def test_policy_names_are_unique_and_rules_checked(open_replica):
    replica = await open_replica("a")
    scope = replica.scope(GLOBAL_SCOPE)
    await acl.put_policy(scope, AclPolicy(POLICY_ID, "ops", rules=APP_WRITE))
    with pytest.raises(InvalidArgument, match="already exists"):
        await acl.put_policy(scope, AclPolicy("7a1253d2-1785-24fd-91c2-f8e78c745511", "ops"))
    with pytest.raises(InvalidArgument, match="raed"):
        await acl.put_policy(scope, AclPolicy("7a1253d2-1785-24fd-91c2-f8e78c745511", "other", rules='key "a" { policy = "raed" }'))
    with pytest.raises(InvalidArgument, match="built-in"):
        await acl.put_policy(scope, AclPolicy(MANAGEMENT_POLICY_ID, "x"))
    with pytest.raises(InvalidArgument, match="built-in"):
        await acl.delete_policy(scope, MANAGEMENT_POLICY_ID)
    assert scope.acl.policy_named("global-management").policy_id == MANAGEMENT_POLICY_ID
    assert [p.name for p in scope.acl.policies()] == ["ops"]  # nothing refused was stored


async def test_a_policy_limited_to_other_datacenters_grants_nothing_here(open_replica):
    replica = await open_replica("a")
    scope = replica.scope(GLOBAL_SCOPE)
    await acl.put_policy(scope, AclPolicy(POLICY_ID, "elsewhere", rules=APP_WRITE, datacenters=("s2",)))
    _, secret = await acl.create_token(scope, "", [POLICY_ID])
    assert not AclResolver(replica, "s1").authorizer(secret).allows("key", "app/x", "write")
    assert AclResolver(replica, "s2").authorizer(secret).allows("key", "app/x", "write")


async def test_local_tokens_live_in_the_site_scope(open_replica):
    replica = await open_replica("a")
    await acl.put_policy(replica.scope(GLOBAL_SCOPE), AclPolicy(POLICY_ID, "app-write", rules=APP_WRITE))
    token, secret = await acl.create_token(replica.scope("s1"), "site token", [POLICY_ID], local=True)
    assert replica.scope(GLOBAL_SCOPE).acl.token(token.accessor_id) is None
    principal = AclResolver(replica, "s1").principal(secret)
    assert principal.scope == "s1" and principal.authorizer.allows("key", "app/x", "write")
    with pytest.raises(AclNotFound):
        AclResolver(replica, "s2").principal(secret)  # another site's agent does not know it


async def test_the_anonymous_token_can_be_given_policies(open_replica):
    replica = await open_replica("a")
    scope = replica.scope(GLOBAL_SCOPE)
    await acl.bootstrap(scope)
    await acl.put_policy(scope, AclPolicy(POLICY_ID, "public", rules='key_prefix "pub/" { policy = "read" }'))
    await acl.update_token(scope, ANONYMOUS_ACCESSOR, "Anonymous Token", [POLICY_ID])
    anonymous = AclResolver(replica, "s1").authorizer(None)
    assert anonymous.allows("key", "pub/x", "read") and not anonymous.allows("key", "x", "read")
    with pytest.raises(InvalidArgument):
        await acl.delete_token(scope, ANONYMOUS_ACCESSOR)


# -- replication ----------------------------------------------------------------------


async def test_a_token_made_on_one_replica_works_on_another_and_revocation_follows(open_replica):
    hub = (await open_replica("hub")).scope(GLOBAL_SCOPE)
    edge_replica = await open_replica("edge")
    edge = edge_replica.scope(GLOBAL_SCOPE)
    token, secret = await app_token(hub)
    resolver = AclResolver(edge_replica, "s1")
    with pytest.raises(AclNotFound):
        resolver.principal(secret)
    await send(hub, edge, "acl")
    assert resolver.authorizer(secret).allows("key", "app/x", "write")
    await acl.delete_token(hub, token.accessor_id)
    await send(hub, edge, "acl")
    with pytest.raises(AclNotFound):
        resolver.principal(secret)


async def test_concurrent_policy_edits_converge_to_the_later_stamp_and_count_the_loser(open_replica):
    a = (await open_replica("a", wall_ms=WallClock(BASE_MS + 1_000))).scope(GLOBAL_SCOPE)
    b = (await open_replica("b", wall_ms=WallClock(BASE_MS + 2_000))).scope(GLOBAL_SCOPE)
    await acl.put_policy(a, AclPolicy(POLICY_ID, "p", rules='key_prefix "a/" { policy = "read" }'))
    await send(a, b, "acl")
    await acl.put_policy(a, AclPolicy(POLICY_ID, "p", rules='key_prefix "early/" { policy = "read" }'))
    await acl.put_policy(b, AclPolicy(POLICY_ID, "p", rules='key_prefix "late/" { policy = "read" }'))
    await send(a, b, "acl")
    await send(b, a, "acl")
    for scope in (a, b):
        assert "late/" in scope.acl.policy(POLICY_ID).rules
        assert scope.acl.conflicts == 1
        assert scope.conflicts() == 1


async def test_partitioned_bootstraps_both_work_after_sync(open_replica):
    ra, rb = await open_replica("a"), await open_replica("b")
    a, b = ra.scope(GLOBAL_SCOPE), rb.scope(GLOBAL_SCOPE)
    _, secret_a = await acl.bootstrap(a)
    _, secret_b = await acl.bootstrap(b)
    await send(a, b, "acl")
    await send(b, a, "acl")
    for replica in (ra, rb):
        resolver = AclResolver(replica, "s1")
        assert resolver.authorizer(secret_a).management and resolver.authorizer(secret_b).management
        with pytest.raises(BootstrapNotAllowed):
            await acl.bootstrap(replica.scope(GLOBAL_SCOPE))


async def test_lookups_follow_a_compaction(open_replica):
    replica = await open_replica("a")
    scope = replica.scope(GLOBAL_SCOPE)
    token, secret = await app_token(scope)
    await scope.compact("acl")
    resolver = AclResolver(replica, "s1")
    assert resolver.principal(secret).token.accessor_id == token.accessor_id
    await acl.delete_token(scope, token.accessor_id)
    with pytest.raises(AclNotFound):
        resolver.principal(secret)
