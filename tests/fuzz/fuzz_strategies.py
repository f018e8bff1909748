"""The budget of the fuzz property tests, and inputs made from valid seeds.

Random bytes rarely get past a parser's first check, so most inputs here are
valid messages with a few bytes changed, inserted, deleted or repeated: they
reach the code behind the framing, where the interesting bugs are.
"""

from __future__ import annotations

import cbor2
from fuzz_seeds import SCOPES, seed_sync_frames, seed_updates
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from konsul.sync import wire


# Deterministic, no deadline (the machine is shared), and small: the whole
# folder runs in well under a minute. bench/fuzz.py is the long run.
def budget(examples: int, shrink: bool = True) -> settings:
    """``shrink`` False for targets in another process, where each attempt to shrink costs a restart."""
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if shrink else [])
    return settings(
        max_examples=examples,
        derandomize=True,
        deadline=None,
        database=None,
        phases=phases,
        suppress_health_check=list(HealthCheck),
    )


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes], max_edits: int = 6) -> bytes:
    """A seed with up to ``max_edits`` byte edits."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, max_edits))):
        edit = draw(st.sampled_from(("set", "insert", "delete", "repeat", "truncate")))
        at = draw(st.integers(0, len(data)))
        if edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif not data or at == len(data):
            continue
        elif edit == "set":
            data[at] = draw(st.integers(0, 255))
        elif edit == "delete":
            del data[at]
        elif edit == "repeat":
            piece = bytes(data[at : at + draw(st.integers(1, 8))])
            data[at:at] = piece * draw(st.integers(1, 3))
        else:
            del data[at:]
    return bytes(data)


def inputs(seeds: list[bytes], max_size: int = 256) -> st.SearchStrategy[bytes]:
    """Mutated seeds, mostly, and plain random bytes."""
    return st.one_of(mutated(seeds), mutated(seeds), st.binary(max_size=max_size))


# -- sync frames: messages of the schema, with values in and out of it --------------

cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=8,
)
_FIELD_VALUES = {
    "t": st.sampled_from(list(wire.SCHEMA)),
    "v": st.sampled_from([wire.PROTOCOL_VERSION, 1, -1, 2**64]),
    "site": st.sampled_from(SCOPES + ["", "other"]),
    "replica": st.text(max_size=8),
    "role": st.sampled_from(["edge", "hub", "observer"]),
    "now": st.integers(-1, 2**53) | st.integers(2**63, 2**65),
    "scopes": st.lists(st.sampled_from(SCOPES + ["", "x"]) | cbor_values, max_size=4),
    "s": st.sampled_from(SCOPES + ["x"]),
    "c": st.sampled_from(["kv", "catalog", "devices", "zz", ""]),
    "e": st.integers(-1, 3) | st.integers(2**63, 2**65),
    "n": st.integers(-1, 3) | st.integers(2**63, 2**65),
    "sv": st.sampled_from([b"\x00", b"\x01\x05\x02", b"\x01\xff", b"\x05", b"\x01\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01\x01"])
    | st.binary(max_size=12),
    "u": st.sampled_from(seed_updates()) | st.binary(max_size=24),
    "k": st.text(max_size=6),
    "d": cbor_values,
    "code": st.text(max_size=6),
    "detail": st.text(max_size=6),
}


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    kind = draw(_FIELD_VALUES["t"])
    message = {"t": kind}
    for name in wire.SCHEMA[kind]:
        if draw(st.integers(0, 20)):  # now and then a field is missing or of another type
            message[name] = draw(_FIELD_VALUES[name])
        elif draw(st.booleans()):
            message[name] = draw(cbor_values)
    return cbor2.dumps(message)


def sync_frames() -> st.SearchStrategy[bytes]:
    """Frames a peer might send: schema messages (mostly), mutated real frames, random bytes."""
    return st.one_of(messages(), messages(), inputs(seed_sync_frames(), max_size=64))
