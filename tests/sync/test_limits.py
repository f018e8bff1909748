"""Key, value and argument rules, as a writer sees them: a clear error, no change."""

from __future__ import annotations

import pytest

from konsul.sync.errors import InvalidArgument, InvalidKey, ValueTooLarge
from konsul.sync.limits import MAX_KEY_BYTES, MAX_VALUE_BYTES

BAD_KEYS = {
    "empty": "",
    "leading slash": "/a",
    "only a slash": "/",
    "NUL": "a\x00b",
    "dot-dot segment": "a/../b",
    "dot-dot alone": "..",
    "dot-dot last": "a/..",
    "dot-dot first": "../a",
    "not UTF-8 (lone surrogate)": "a\udc80",
    "513 ASCII bytes": "k" * (MAX_KEY_BYTES + 1),
    "514 bytes in 257 chars": "é" * 257,
}

GOOD_KEYS = {
    "512 ASCII bytes": "k" * MAX_KEY_BYTES,
    "512 bytes in 256 chars": "é" * 256,
    "one char": "a",
    "dots inside a segment": "a/..b/c..d/...",
    "single dot segment": "a/./b",
    "trailing slash": "a/",
    "double slash": "a//b",
    "unicode": "配置/温度",
}


def state(scope):
    """What a failed write must leave as it was."""
    return (
        scope.kv.last_index,
        scope.kv.list(""),
        scope.doc("kv").get_state(),
        scope.stored_bytes(),
    )


@pytest.fixture
async def scope(open_replica):
    replica = await open_replica()
    scope = replica.scope("site")
    await scope.kv_put("existing", b"v")
    return scope


@pytest.mark.parametrize("key", BAD_KEYS.values(), ids=BAD_KEYS.keys())
async def test_a_bad_key_is_refused_and_changes_nothing(scope, key):
    before = state(scope)
    with pytest.raises(InvalidKey):
        await scope.kv_put(key, b"v")
    with pytest.raises(InvalidKey):
        await scope.kv_delete(key)
    with pytest.raises(InvalidKey):
        scope.kv.get(key)
    with pytest.raises(InvalidKey):
        scope.kv.history(key)
    assert state(scope) == before


@pytest.mark.parametrize("key", GOOD_KEYS.values(), ids=GOOD_KEYS.keys())
async def test_a_good_key_round_trips(scope, key):
    assert await scope.kv_put(key, b"v")
    assert scope.kv.get(key).value == b"v"
    assert key in scope.kv.keys()


@pytest.mark.parametrize(
    "prefix",
    ["/a", "a\x00", "a/../", "k" * (MAX_KEY_BYTES + 1)],
    ids=["slash", "NUL", "dotdot", "long"],
)
async def test_a_bad_prefix_is_refused_by_list_keys_and_recursive_delete(scope, prefix):
    before = state(scope)
    with pytest.raises(InvalidKey):
        scope.kv.list(prefix)
    with pytest.raises(InvalidKey):
        scope.kv.keys(prefix, "/")
    with pytest.raises(InvalidKey):
        await scope.kv_delete(prefix, recurse=True)
    assert state(scope) == before


async def test_the_largest_value_is_accepted_and_one_more_byte_is_refused(scope):
    largest = bytes(range(256)) * (MAX_VALUE_BYTES // 256)
    assert len(largest) == 512 * 1024
    assert await scope.kv_put("big", largest)
    assert scope.kv.get("big").value == largest

    before = state(scope)
    with pytest.raises(ValueTooLarge) as raised:
        await scope.kv_put("big", largest + b"x")
    assert str(MAX_VALUE_BYTES) in str(raised.value)
    with pytest.raises(ValueTooLarge):
        await scope.kv_put("other", largest + b"x")
    assert state(scope) == before
    assert scope.kv.get("big").value == largest
    assert scope.kv.get("other") is None


@pytest.mark.parametrize(
    "kwargs",
    [{"flags": -1}, {"flags": 2**64}, {"ttl_ms": 0}, {"ttl_ms": -5}, {"cas": -1}],
    ids=["flags<0", "flags>=2**64", "ttl=0", "ttl<0", "cas<0"],
)
async def test_bad_arguments_are_refused_and_change_nothing(scope, kwargs):
    before = state(scope)
    with pytest.raises(InvalidArgument):
        await scope.kv_put("existing", b"new", **kwargs)
    assert state(scope) == before
    assert scope.kv.get("existing").value == b"v"


async def test_errors_carry_a_code_and_a_client_status(scope):
    with pytest.raises(InvalidKey) as bad_key:
        await scope.kv_put("/a", b"v")
    with pytest.raises(ValueTooLarge) as too_large:
        await scope.kv_put("a", b"x" * (MAX_VALUE_BYTES + 1))
    assert (bad_key.value.code, bad_key.value.status) == ("invalid_key", 400)
    assert (too_large.value.code, too_large.value.status) == ("value_too_large", 413)
    assert "'/'" in str(bad_key.value)
