"""A device's rights (protocols/device_access.py): shorthands, policies, caching, ACLs off."""

from __future__ import annotations

import uuid

import trio

from konsul.protocols.device_access import DeviceAccess, LegacyRights
from konsul.protocols.gateway import GatewayContext
from konsul.protocols.mqtt.topics import TopicRefused, check_publish, check_subscribe
from konsul.sync import acl
from konsul.sync.acl import MANAGEMENT_POLICY_ID, AclPolicy
from konsul.sync.acl_resolver import AclResolver
from konsul.sync.devices import DeviceRecord, PresenceTable
from konsul.sync.replica import GLOBAL_SCOPE, Replica


async def _run(tmp_path, scenario) -> None:
    replica = Replica.open(tmp_path / "r")
    async with trio.open_nursery() as nursery:
        await nursery.start(replica.run)
        try:
            await scenario(replica)
        finally:
            nursery.cancel_scope.cancel()
    replica.close()


def _access(replica: Replica, enabled: bool = True) -> DeviceAccess:
    return GatewayContext(replica, "s1", PresenceTable(), acl=AclResolver(replica, "s1", enabled=enabled)).device_access


async def test_shorthands_and_policies_make_one_authorizer_that_follows_changes(tmp_path):
    async def scenario(replica: Replica):
        policy_id = str(uuid.uuid4())
        await acl.put_policy(replica.scope(GLOBAL_SCOPE), AclPolicy(policy_id, "cfg", rules='key_prefix "sensors/*/cfg" { policy = "write" }'))
        site = replica.scope("s1")
        record, _ = await site.put_device(DeviceRecord("d1", kv_read=(), kv_write=("app/",), policy_ids=(policy_id,)))
        access = _access(replica)
        rights = access.rights(record)
        assert rights.allows("key", "app/x", "write") and rights.allows("key", "sensors/a/cfg", "write")
        assert not rights.allows("key", "sensors/a/b/cfg", "write") and not rights.allows("key", "other", "read")
        assert rights.allows("device", "d1", "write") and not rights.allows("device", "d2", "write")
        assert access.rights(record) is rights  # cached: a dict lookup per message
        # A policy edit is seen on the next check, without a new record.
        await acl.put_policy(replica.scope(GLOBAL_SCOPE), AclPolicy(policy_id, "cfg", rules='device "d2" { policy = "write" }'))
        changed = access.rights(record)
        assert changed is not rights and changed.allows("device", "d2", "write") and not changed.allows("key", "sensors/a/cfg", "write")
        # A new record version (policies unlinked) too.
        record, _ = await site.put_device(DeviceRecord("d1", kv_read=(), kv_write=("app/",)))
        assert not access.rights(record).allows("device", "d2", "write")
        # A deleted policy grants nothing; the management policy everything.
        gone, _ = await site.put_device(DeviceRecord("d3", kv_read=(), policy_ids=(str(uuid.uuid4()),)))
        assert not access.rights(gone).allows("key", "x", "read")
        boss, _ = await site.put_device(DeviceRecord("d4", kv_read=(), policy_ids=(MANAGEMENT_POLICY_ID,)))
        assert access.rights(boss).allows("key", "anything", "write")

    await _run(tmp_path, scenario)


async def test_topics_follow_the_rights_and_acl_off_keeps_the_old_rules(tmp_path):
    async def scenario(replica: Replica):
        policy_id = str(uuid.uuid4())
        await acl.put_policy(replica.scope(GLOBAL_SCOPE), AclPolicy(
            policy_id, "gw", rules='device_prefix "pump-" { policy = "write" }\nkey_prefix "fleet/*/cfg" { policy = "read" }'))
        record, _ = await replica.scope("s1").put_device(DeviceRecord("gw", kv_read=("conf",), policy_ids=(policy_id,)))
        rights = _access(replica).rights(record)
        assert check_publish(record, "konsul/v1/devices/pump-7/reported", rights).device_id == "pump-7"
        check_subscribe(record, "konsul/v1/devices/pump-7/desired", rights)
        check_subscribe(record, "konsul/v1/kv/fleet/#", rights)  # a glob below the filter's literal part
        for refused in ("konsul/v1/kv/other/#", "konsul/v1/devices/+/desired"):
            try:
                check_subscribe(record, refused, rights)
                raise AssertionError(refused)
            except TopicRefused as error:
                assert error.reason == "forbidden"
        # With ACLs off: the record's prefixes and its own topics, policies or not.
        legacy = _access(replica, enabled=False).rights(record)
        assert isinstance(legacy, LegacyRights)
        try:
            check_publish(record, "konsul/v1/devices/pump-7/reported", legacy)
            raise AssertionError("published for another device with ACLs off")
        except TopicRefused as error:
            assert error.reason == "forbidden"
        assert legacy.allows("key", "config/x", "read") and not legacy.allows("key", "config/x", "write")

    await _run(tmp_path, scenario)
