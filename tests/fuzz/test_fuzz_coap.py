"""CoAP datagrams through the gateway of a running edge.

After every batch of datagrams the edge must still answer a CoAP GET and an
HTTP GET ``/v1/status/leader``, and still hold a value acknowledged before
(``fuzz_coap.CoapEdge.problem``). One edge serves the module; a test that
stops it fails, and the next test gets a fresh one. Failures are not shrunk
(each attempt would restart the edge): the datagrams are reported as found.
"""

from __future__ import annotations

import pytest
from aiocoap.numbers.codes import Code
from fuzz_coap import CoapEdge, datagram, seed_datagrams
from fuzz_strategies import budget, mutated
from hypothesis import example, given
from hypothesis import strategies as st

SEEDS = seed_datagrams()


class EdgeHolder:
    """The module's edge, restarted for the next test when one stops it."""

    def __init__(self, tmp_path) -> None:
        self.tmp_path = tmp_path
        self.edge: CoapEdge | None = None

    def get(self) -> CoapEdge:
        if self.edge is None:
            self.edge = CoapEdge(self.tmp_path)
        elif self.edge.problem() is not None:
            self.edge.restart()
        return self.edge

    def stop(self) -> None:
        if self.edge is not None:
            self.edge.stop()


@pytest.fixture(scope="module")
def holder(tmp_path_factory):
    found = EdgeHolder(tmp_path_factory.mktemp("coap-fuzz"))
    yield found
    found.stop()


def _check(edge: CoapEdge, datagrams: list[bytes], one_by_one: bool = False) -> None:
    """Send ``datagrams`` (each after the answer to the one before, with ``one_by_one``), then probe."""
    if one_by_one:
        for data in datagrams:
            edge.exchange(data)
    else:
        edge.send(datagrams)
    problem = edge.problem()
    assert problem is None, f"{problem}\n{edge.last_error()}"


@budget(40, shrink=False)
@given(st.lists(st.one_of(mutated(SEEDS), st.binary(min_size=4, max_size=64)), min_size=1, max_size=8))
@example([bytes.fromhex("40010001b1ff")])
def test_mutated_datagrams(holder, datagrams):
    _check(holder.get(), datagrams)


_SEGMENTS = st.text(st.characters(codec="utf-8"), max_size=12)
_PATHS = st.one_of(
    st.tuples(st.just("kv"), _SEGMENTS, _SEGMENTS),
    st.tuples(st.just("kv"), _SEGMENTS),
    st.just(("rd",)),
    st.tuples(st.just("rd"), _SEGMENTS),
    st.tuples(st.just("rd-lookup"), st.sampled_from(["ep", "res", "x"])),
    st.tuples(st.just("devices"), st.sampled_from(["dev-1", "dev-2", ""]) | _SEGMENTS,
              st.sampled_from(["telemetry", "reported", "desired", "x"])),
    st.lists(_SEGMENTS, max_size=3).map(tuple),
)
_QUERIES = st.lists(
    st.sampled_from(["ep=dev-1", "ep=dev-2", "lt=60", "lt=0", "lt=99999999999", "base=coap://[", "base=coap://127.0.0.1",
                     "dc=global", "dc=elsewhere", "rt=temp*", "page=1", "count=0", "count=x", "tk=bad", "ep="])
    | st.text(st.characters(codec="utf-8"), max_size=10),
    max_size=4,
).map(tuple)
_FORMATS = st.none() | st.sampled_from([0, 40, 42, 50, 60]) | st.integers(0, 65535)
_BLOCKS = st.none() | st.tuples(st.integers(0, 40), st.booleans(), st.integers(0, 7))
_PAYLOADS = st.one_of(
    st.binary(max_size=96),
    st.sampled_from([b'{"a":1}', b"\xa1aa\x01", b"</x>;rt=y", b"[" * 1100, b'{"a":NaN}', b"\xa1\x01\x01"]),
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    return datagram(
        draw(st.sampled_from([Code.GET, Code.POST, Code.PUT, Code.DELETE, Code.FETCH, Code.PATCH, Code.iPATCH])),
        draw(_PATHS),
        draw(_QUERIES),
        draw(_PAYLOADS),
        mid=draw(st.integers(0, 65535)),
        token=draw(st.binary(max_size=8)),
        confirmable=True,
        content_format=draw(_FORMATS),
        accept=draw(_FORMATS),
        observe=draw(st.none() | st.integers(0, 2)),
        block1=draw(_BLOCKS),
        block2=draw(_BLOCKS),
    )


@budget(60, shrink=False)
@given(st.lists(requests(), min_size=1, max_size=6))
def test_well_formed_requests(holder, datagrams):
    _check(holder.get(), datagrams, one_by_one=True)


@budget(60, shrink=False)
@given(st.lists(requests(), min_size=1, max_size=6))
@example([datagram(Code.POST, ("rd",), ("ep=dev-9",), b"<//[>", content_format=40),
          datagram(Code.GET, ("rd-lookup", "res"), (), mid=2, token=b"\x02")])
@example([datagram(Code.PUT, ("devices", "dev-8", "reported"), ("ep=dev-8",), b"[" * 1100, content_format=50)])
@example([datagram(Code.GET, ("devices", "dev-1", "nope"), (), observe=0)])
def test_no_request_is_an_internal_error(holder, datagrams):
    edge = holder.get()
    edge.answers.clear()
    _check(edge, datagrams, one_by_one=True)
    failed = [a for a in edge.answers if a.code.class_ == 5 and a.code != Code.SERVICE_UNAVAILABLE]
    assert not failed, [f"{a.code} {a.payload[:80]!r}" for a in failed]
