"""Device documents (JSON and CBOR) from HTTP, MQTT and CoAP, and link-format from devices.

- the shared rule set (``sync/limits.py``): any bytes give a document within
  the limits or ``InvalidArgument`` / ``ValueTooLarge``; the twin check after it
  the same;
- the MQTT and CoAP payload decoders: any bytes give a document or their own
  refusal (``PayloadRefused``, ``CoapError``), and what they accept also passes
  the shared rule set (issue 14, finding 2);
- link-format in an RD registration: links or a 4.00, and the links a device
  registered can be listed by ``/rd-lookup``.
"""

from __future__ import annotations

import cbor2
from fuzz_strategies import budget, inputs
from fuzz_targets import TARGETS, documents_coap, documents_mqtt, documents_shared, link_format
from hypothesis import example, given
from hypothesis import strategies as st

from konsul.sync.errors import InvalidArgument, ValueTooLarge
from konsul.sync.limits import check_document
from konsul.sync.twin import check_document as check_twin

DOCUMENT_SEEDS = TARGETS["documents_shared"].seeds()
LINK_SEEDS = TARGETS["link_format"].seeds()
# Nested 40 levels, past the shared limit (MAX_DOCUMENT_DEPTH, 32).
DEEP_JSON = b'{"a":' * 40 + b"1" + b"}" * 40
DEEP_CBOR = b"\xa1\x61a" * 40 + b"\x01"


@budget(300)
@given(inputs(DOCUMENT_SEEDS))
@example(b"[" * 100_000)
@example(DEEP_JSON)
@example(DEEP_CBOR)
@example(b"\x9f" * 50_000)  # indefinite-length arrays, never closed
def test_shared_rule_set_takes_any_bytes(data):
    documents_shared(data)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=30,
)


@budget(200)
@given(st.dictionaries(st.text(max_size=300), _JSON, max_size=4))
def test_twin_check_takes_any_object(document):
    # What the HTTP and sync paths hand it: a parsed object, checked against the rule set first.
    try:
        check_document(document, "desired")
    except InvalidArgument:
        return
    try:
        check_twin(document, "desired")
    except (InvalidArgument, ValueTooLarge):
        pass


@budget(300)
@given(inputs(DOCUMENT_SEEDS))
@example(b"[" * 100_000)
@example(b"\xa1" + b"\x9f" * 50_000)
def test_mqtt_decoder_refuses_with_its_own_error(data):
    documents_mqtt(data, rule_set=False)


@budget(300)
@given(inputs(DOCUMENT_SEEDS))
@example(bytes.fromhex("a10101"))
@example(b'{"a":NaN}')
@example(DEEP_JSON)
def test_mqtt_decoder_keeps_the_shared_rules(data):
    documents_mqtt(data)


@budget(300)
@given(inputs(DOCUMENT_SEEDS))
@example(b"[" * 100_000)
def test_coap_decoders_refuse_with_their_own_error(data):
    documents_coap(data, rule_set=False)


@budget(300)
@given(inputs(DOCUMENT_SEEDS))
@example(cbor2.dumps({"a": float("nan")}))
@example(DEEP_CBOR)
def test_coap_decoders_keep_the_shared_rules(data):
    documents_coap(data)


@budget(300)
@given(inputs(LINK_SEEDS))
@example(b"<//[>")
@example(b'</a>;anchor="//][",<//[::1]/b>')
def test_link_format_takes_any_bytes(data):
    link_format(data)
