"""The fuzz targets: one check per parser that takes bytes from outside the agent.

Each target is a function ``check(data: bytes) -> None`` that feeds ``data`` to
one parser the way the agent does and raises :class:`PropertyViolation` when
the parser breaks its contract: an exception of a type it does not document,
or an accepted input that a later reader of the same value cannot handle
(that is how a value poisons the store). The property tests in this folder
call the same functions with hypothesis-made inputs, ``bench/fuzz.py`` with
atheris or a mutational loop, so both check exactly the same thing.

Every target is in-process and deterministic; the CoAP gateway, which must be
checked in a running agent, has its own module (``coap_probe.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import cbor2
from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.util.linkformat import LinkFormat
from fuzz_seeds import (
    SCOPES,
    seed_documents,
    seed_http,
    seed_link_formats,
    seed_mqtt_agent,
    seed_mqtt_client,
    seed_sync_frames,
    seed_updates,
)
from pycrdt import Doc

from konsul.protocols.coap import formats, rd
from konsul.protocols.coap.directory import InvalidLink, Registration, check_links, matches
from konsul.protocols.coap.errors import CoapError
from konsul.protocols.http.agent_routes import service_json
from konsul.protocols.http.device_routes import device_json
from konsul.protocols.http.kv_fast_path import Incomplete, KvFastPath
from konsul.protocols.http.kv_routes import entry_json
from konsul.protocols.mqtt import codec
from konsul.protocols.mqtt.policy import PayloadRefused, decode_document
from konsul.sync import session as sync_session
from konsul.sync import wire
from konsul.sync.batch import WriteBatch
from konsul.sync.catalog import ServiceCatalog
from konsul.sync.devices import DeviceRegistry, Presence
from konsul.sync.errors import InvalidArgument, KonsulError, ValueTooLarge
from konsul.sync.hlc import HybridClock
from konsul.sync.kv import KvState, ScopeIndex
from konsul.sync.limits import check_document, decode_cbor_document, parse_json_document
from konsul.sync.twin import check_document as check_twin
from konsul.sync.update_check import check_update, refusing_panics
from konsul.sync.versioned import VersionedMap, ignore_update


class PropertyViolation(AssertionError):
    """A parser broke its contract on one input."""


def _unexpected(target: str, error: BaseException) -> PropertyViolation:
    violation = PropertyViolation(f"{target}: {type(error).__module__}.{type(error).__qualname__}: {error}")
    violation.__cause__ = error
    return violation


def _json_answer(document: object) -> None:
    """What an HTTP route does with a value it answers: it must be valid JSON."""
    json.dumps(document, allow_nan=False)


# -- HTTP fast path ------------------------------------------------------------------


def http_fast_path(data: bytes) -> None:
    """``KvFastPath.parse``: a plain request, ``None`` (hypercorn's turn) or :class:`Incomplete`."""
    try:
        parsed = KvFastPath.parse(None, data)  # parse uses no state
    except Incomplete:
        return
    except Exception as error:
        raise _unexpected("http_fast_path", error) from error
    if parsed is None:
        return
    method, key, query, body, consumed, _token = parsed
    if method not in (b"GET", b"PUT") or not key or not 0 < consumed <= len(data):
        raise PropertyViolation(f"http_fast_path: parsed {parsed[:3]!r} consumed {consumed} of {len(data)}")
    if body != data[consumed - len(body) : consumed]:
        raise PropertyViolation("http_fast_path: the body is not the request's last bytes")


# -- MQTT ------------------------------------------------------------------------------

MQTT_MAX_PAYLOAD = 256 * 1024  # the gateway's default


def mqtt_agent(data: bytes) -> None:
    """The broker's view of a client stream: frames, the CONNECT, then every packet as 3.1.1 and as 5.0.

    Any input ends in packets, "need more bytes" or :class:`codec.ProtocolViolation`.
    """
    splitter = codec.FrameSplitter(MQTT_MAX_PAYLOAD + codec.MAX_TOPIC_BYTES + 8)
    splitter.feed(data)
    first = True
    try:
        while (frame := splitter.next_frame()) is not None:
            if first:
                codec.decode_connect(frame)
                first = False
                continue
            for version in (codec.MQTT_311, codec.MQTT_5):
                try:
                    codec.decode(frame, version)
                except codec.ProtocolViolation:
                    pass
    except codec.ProtocolViolation:
        return
    except Exception as error:
        raise _unexpected("mqtt_agent", error) from error


def mqtt_device(data: bytes) -> None:
    """A client's view of a broker stream (the simulator, the external-broker client): packets or ProtocolViolation."""
    splitter = codec.FrameSplitter(1 << 20)
    splitter.feed(data)
    try:
        while (frame := splitter.next_frame()) is not None:
            for version in (codec.MQTT_311, codec.MQTT_5):
                try:
                    codec.decode(frame, version)
                except codec.ProtocolViolation:
                    pass
    except codec.ProtocolViolation:
        return
    except Exception as error:
        raise _unexpected("mqtt_device", error) from error


# -- sync frames -----------------------------------------------------------------------


def sync_wire(data: bytes) -> None:
    """``wire.decode``: a message of the schema or :class:`wire.WireError`."""
    try:
        message = wire.decode(data)
        if isinstance(message.get("sv"), bytes):  # the session decodes an ack's state vector
            wire.decode_state_vector(message["sv"])
    except wire.WireError:
        return
    except Exception as error:
        raise _unexpected("sync_wire", error) from error


def open_sessions() -> list[sync_session.SyncSession]:
    """A hub waiting for a hello, and an edge and a hub past the handshake."""
    waiting = sync_session.SyncSession("hub", "hub", "h1", [])
    edge = sync_session.SyncSession("edge", "s1", "e1", SCOPES)
    hub = sync_session.SyncSession("hub", "hub", "h1", [])
    hub.receive(edge.start())
    edge.receive(hub.start())
    # Something unacknowledged on each side, so that acks have a sent message to settle.
    state_vector = Doc().get_state()
    for side in (edge, hub):
        side.send_update("s1", "kv", 1, b"\x00\x00", state_vector, marker=None)
    return [waiting, edge, hub]


def sync_session_frames(frames_in: list[bytes], sessions: list[sync_session.SyncSession] | None = None) -> None:
    """``SyncSession.receive``: events or :class:`RemoteProtocolError`, in any state."""
    for session in sessions if sessions is not None else open_sessions():
        for frame in frames_in:
            if session.state is sync_session.State.CLOSED:
                break
            try:
                session.receive(frame)
            except sync_session.RemoteProtocolError:
                pass
            except Exception as error:
                raise _unexpected(f"sync_session[{session.role}]", error) from error


def sync_session_bytes(data: bytes) -> None:
    """One frame into each session state (the byte-oriented form for ``bench/fuzz.py``)."""
    sync_session_frames([data])


# -- Yjs updates through the apply path ------------------------------------------------

_CLOCK_REPLICA = "0123456789ab"


class _FixedWall:
    def __call__(self) -> int:
        return 1_700_000_000_000


def _collections() -> tuple[KvState, ServiceCatalog, DeviceRegistry]:
    clock = HybridClock(_CLOCK_REPLICA, wall_ms=_FixedWall())
    index = ScopeIndex()
    kv = KvState("s1", VersionedMap(Doc(), ignore_update), index, clock)
    catalog = ServiceCatalog(VersionedMap(Doc(), ignore_update), index, clock)
    devices = DeviceRegistry(VersionedMap(Doc(), ignore_update), index, clock)
    return kv, catalog, devices


_COLLECTION_NAMES = {"KvState": "kv", "ServiceCatalog": "catalog", "DeviceRegistry": "devices"}

# What a refusal of a bad update may raise: pycrdt's decoder raises ValueError,
# the state layer its KonsulError. Anything else is a bug in the apply path,
# even where a caller happens to catch it.
CLEAN_REFUSALS = (ValueError, KonsulError)


def yjs_update(data: bytes, strict: bool = True) -> None:
    """A remote update into each collection (``apply_remote``, as ``Scope.apply_remote`` calls it).

    Either refused with a clean error, or accepted; then every reader of the
    collection still works (the HTTP routes' JSON of every entry, record,
    service and twin), and the merged document loads again, as it would after
    a restart. ``strict`` False only asks that nothing escapes that would end
    the process (a ``BaseException`` that is not an ``Exception``, such as a
    pyo3 panic).
    """
    for collection in _collections():
        try:
            _apply_and_read(collection, data)
        except PropertyViolation:
            if strict:
                raise


def _apply_and_read(collection: KvState | ServiceCatalog | DeviceRegistry, data: bytes) -> None:
    name = type(collection).__name__
    try:
        # What Scope.apply_remote does before the store: check, then merge.
        check_update(data, _COLLECTION_NAMES[name])
        refusing_panics(lambda: collection.apply_remote(data, WriteBatch()))
    except CLEAN_REFUSALS:
        return
    except Exception as error:
        raise _unexpected(f"yjs_update[{name}]", error) from error
    try:
        _read_everything(collection)
        reloaded = Doc()
        reloaded.apply_update(collection.versions.doc.get_update())
        VersionedMap(reloaded, ignore_update)
    except Exception as error:
        raise _unexpected(f"yjs_update[{name}] accepted, then unreadable", error) from error


def _read_everything(collection: KvState | ServiceCatalog | DeviceRegistry) -> None:
    if isinstance(collection, KvState):
        for entry in collection.list(""):
            _json_answer(entry_json(entry))
    elif isinstance(collection, ServiceCatalog):
        for service in collection.services():
            _json_answer(service_json(service, "s1"))
        for record in collection.nodes():
            _json_answer({"Node": record.node, "Address": record.address, "Meta": record.meta,
                          "TaggedAddresses": record.tagged_addresses, "Checks": [c.to_wire() for c in record.checks]})
    else:
        for record in collection.records():
            _json_answer(device_json(record, Presence(), "s1"))
        for side in ("desired", "reported"):
            for device_id in collection.twin.devices(side):
                _json_answer(collection.twin.document(side, device_id))


# -- device documents ------------------------------------------------------------------

DOCUMENT_REFUSALS = (InvalidArgument, ValueTooLarge)


def _accepted_document(target: str, document: object) -> None:
    """An accepted document is one the store can hold and every reader can give back."""
    try:
        check_document(document, "document")
        _json_answer(document)
        cbor2.loads(cbor2.dumps(document))
    except Exception as error:
        raise _unexpected(f"{target} accepted a document it should refuse", error) from error


def documents_shared(data: bytes) -> None:
    """The shared rule set (sync/limits.py) and the twin check after it."""
    for name, parse in (("parse_json_document", parse_json_document), ("decode_cbor_document", decode_cbor_document)):
        try:
            document = parse(data, "document")
        except DOCUMENT_REFUSALS:
            continue
        except Exception as error:
            raise _unexpected(name, error) from error
        _accepted_document(name, document)
        try:
            check_twin(document, "desired")
        except DOCUMENT_REFUSALS:
            pass
        except Exception as error:
            raise _unexpected("twin.check_document", error) from error


def documents_mqtt(data: bytes, rule_set: bool = True) -> None:
    """``policy.decode_document``: a document or :class:`PayloadRefused`.

    With ``rule_set``, what it accepts must also pass the shared rule set
    (issue 14, finding 2: one rule set at every edge of the system).
    """
    try:
        document = decode_document(data, cbor=True)
    except PayloadRefused:
        return
    except Exception as error:
        raise _unexpected("mqtt decode_document", error) from error
    if rule_set:
        _accepted_document("mqtt decode_document", document)


def documents_coap(data: bytes, rule_set: bool = True) -> None:
    """``formats.document_from_payload`` and ``value_from_payload``: a value or a :class:`CoapError`."""
    for fmt in formats.VALUE_FORMATS:
        try:
            formats.value_from_payload(data, fmt)
        except CoapError:
            pass
        except Exception as error:
            raise _unexpected(f"coap value_from_payload({fmt})", error) from error
    for fmt in formats.DOCUMENT_FORMATS:
        try:
            document = formats.document_from_payload(data, fmt)
        except CoapError:
            continue
        except Exception as error:
            raise _unexpected(f"coap document_from_payload({fmt})", error) from error
        if rule_set:
            _accepted_document(f"coap document_from_payload({fmt})", document)


# -- link-format -----------------------------------------------------------------------


def link_format(data: bytes) -> None:
    """A registration's payload: links or a 4.xx; accepted links resolve, list and filter."""
    request = Message(code=Code.POST, payload=data, content_format=rd.LINK_FORMAT)
    base = "coap://192.0.2.1:5683"
    try:
        links = rd._links(request)
        check_links(base, links.links)  # what ResourceDirectory.register asks first (4.00 if not)
    except (CoapError, InvalidLink):
        return
    except Exception as error:
        raise _unexpected("link_format parse", error) from error
    try:
        registration = Registration("loc", "dev-1", "", base, 60, 60.0, list(links.links), {})
        resolved = registration.resource_links()
        for link in resolved:
            matches([*link.attr_pairs, ["href", link.href]], {"rt": "temp*", "if": "sensor"})
        str(LinkFormat(resolved))
        str(LinkFormat([registration.endpoint_link()]))
    except Exception as error:
        raise _unexpected("link_format accepted, then failed to list", error) from error
    if len(resolved) != len(links.links):
        raise PropertyViolation(f"link_format: {len(links.links) - len(resolved)} accepted links do not resolve")


# -- the table -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    check: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]]
    what: str


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("http_fast_path", http_fast_path, seed_http, "KvFastPath.parse: a request, None or Incomplete"),
        Target("mqtt_agent", mqtt_agent, seed_mqtt_client, "codec.FrameSplitter, decode_connect and decode (3.1.1 and 5.0): ProtocolViolation only"),
        Target("mqtt_device", mqtt_device, seed_mqtt_agent, "codec as a client reads a broker's stream: ProtocolViolation only"),
        Target("sync_wire", sync_wire, seed_sync_frames, "wire.decode and decode_state_vector: WireError only"),
        Target("sync_session", sync_session_bytes, seed_sync_frames, "SyncSession.receive in three states: RemoteProtocolError only"),
        Target("yjs_update", yjs_update, seed_updates, "apply_remote of KV, catalog, devices: clean refusal, or readable and reloadable"),
        Target("documents_shared", documents_shared, seed_documents, "sync/limits.py parsers and twin.check_document"),
        Target("documents_mqtt", documents_mqtt, seed_documents, "mqtt policy.decode_document, within the shared rule set"),
        Target("documents_coap", documents_coap, seed_documents, "coap formats payload decoders, within the shared rule set"),
        Target("link_format", link_format, seed_link_formats, "rd link-format parsing, resolution and listing"),
    )
}
