"""The DNS interface's answers, sans-IO: query bytes in, response bytes out.

Names served (Consul's DNS interface, docs/dns.md), under ``consul.`` and
``konsul.`` alike, case-insensitively:

- ``<service>.service[.<site>].<domain>`` and ``<tag>.<service>.service...``:
  A/AAAA of the healthy instances' addresses, SRV with their ports (target
  ``<hex address>.addr.<site>.<domain>.``, its A/AAAA in the additional section,
  or the service's host name when it registered one);
- ``_<service>._<tag>.service[.<site>].<domain>`` (RFC 2782; ``_tcp`` means no tag);
- ``<node>.node[.<site>].<domain>``: the node's address;
- ``<hex>.addr.<site>.<domain>``: the address an SRV target names.

Healthy means no check of the instance is critical (Consul's default: warning
still answers). Unknown names, sites this edge does not hold and services with
no healthy instance are NXDOMAIN with the zone's SOA; a known name asked for a
type it has none of is an empty NOERROR with the SOA; names outside the two
domains are REFUSED (no recursion). Records have TTL 0, as Consul's default, and
come in random order so that clients spread their load.

Over UDP an answer larger than 512 bytes (or the client's EDNS payload size)
is cut to what fits and flagged TC, so the client asks again over TCP.
Anything malformed is FORMERR when a header can be read, else dropped; no input
can raise out of :func:`answer`.

:class:`AnswerCache` keeps rendered answers: dnspython takes 200-500 us to
parse a query and render an answer, the catalog does not change between most
queries, and a hit costs a dict lookup. An entry is used only while the
catalog and check status are what they were when it was rendered (the view's
``generation``) and for at most :data:`CACHE_MAX_AGE_S` (a TTL check that
lapses changes status only when read). Each question keeps a few renderings,
each in its own random order, so clients still spread their load.
"""

from __future__ import annotations

import ipaddress
import random
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.SOA
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rdtypes.IN.SRV
import dns.rrset

DOMAINS = ("consul", "konsul")
UDP_DEFAULT_SIZE = 512
UDP_MAX_SIZE = 4096  # the most a client's EDNS payload size is honoured up to
TTL = 0
CACHE_MAX_AGE_S = 1.0
CACHE_MAX_QUESTIONS = 4096  # past this the cache starts over: many distinct names cost memory, never growth
CACHE_ORDERS = 4  # renderings (random orders) kept per question
CACHED_OUTCOMES = frozenset({"service", "node", "addr", "apex", "nodata", "nxdomain", "refused", "truncated"})


@dataclass(frozen=True, slots=True)
class Instance:
    """One service instance as DNS sees it."""

    node: str
    address: str  # an IP address, a host name, or "" (unknown here)
    port: int
    tags: tuple[str, ...]
    healthy: bool


@dataclass
class DnsView:
    """What the answers read: the site's name and its catalog, through callables.

    Args:
        site: the site this edge serves (Consul's datacenter in names).
        instances: a service name -> its instances (any health).
        node_address: a node name -> its address, or None if unknown.
    """

    site: str
    instances: Callable[[str], list[Instance]]
    node_address: Callable[[str], str | None]
    generation: Callable[[], Hashable] = lambda: None  # changes whenever an answer could


@dataclass
class AnswerCache:
    """Rendered answers by query (all but its ID) and transport; see the module doc."""

    view: DnsView
    clock: Callable[[], float] = time.monotonic
    _entries: dict[tuple[bytes, bool], tuple[Hashable, float, list[tuple[bytes, str]]]] = field(default_factory=dict)
    hits: int = 0

    def answer(self, wire: bytes, *, udp: bool) -> tuple[bytes | None, str]:
        if len(wire) < 12:
            return answer(wire, self.view, udp=udp)
        key = (wire[2:], udp)
        generation = self.view.generation()
        now = self.clock()
        entry = self._entries.get(key)
        if entry is not None and entry[0] == generation and now - entry[1] < CACHE_MAX_AGE_S:
            renderings = entry[2]
            if len(renderings) >= CACHE_ORDERS:
                out, outcome = random.choice(renderings)
                self.hits += 1
                return wire[:2] + out[2:], outcome
        else:
            entry = None
        out, outcome = answer(wire, self.view, udp=udp)
        if out is not None and outcome in CACHED_OUTCOMES:
            if entry is None:
                if len(self._entries) >= CACHE_MAX_QUESTIONS:
                    self._entries.clear()
                entry = self._entries[key] = (generation, now, [])
            entry[2].append((out, outcome))
        return out, outcome


class Refused(Exception):
    """Outside the domains this server answers for."""


def answer(wire: bytes, view: DnsView, *, udp: bool) -> tuple[bytes | None, str]:
    """The response to ``wire`` and what it was (a metric label); None: send nothing."""
    try:
        query = dns.message.from_wire(wire)
    except Exception:  # noqa: BLE001 - dnspython raises many kinds on malformed input
        return _formerr(wire), "malformed"
    if query.flags & dns.flags.QR:
        return None, "not_a_query"  # a response sent to us: never answer one (no loops)
    try:
        response = dns.message.make_response(query, our_payload=UDP_MAX_SIZE)
    except Exception:  # noqa: BLE001
        return _formerr(wire), "malformed"
    response.flags &= ~dns.flags.RA  # no recursion offered
    if query.opcode() != dns.opcode.QUERY:
        response.set_rcode(dns.rcode.NOTIMP)
        return response.to_wire(), "notimp"
    if len(query.question) != 1:
        response.set_rcode(dns.rcode.FORMERR)
        return response.to_wire(), "malformed"
    response.flags |= dns.flags.AA
    question = query.question[0]
    try:
        kind = _resolve(response, question.name, question.rdtype, view)
    except Refused:
        response.flags &= ~dns.flags.AA
        response.set_rcode(dns.rcode.REFUSED)
        kind = "refused"
    if not udp:
        try:
            return response.to_wire(max_size=65535), kind
        except dns.exception.TooBig:
            return _truncated(response, 65535), "truncated"
    size = UDP_DEFAULT_SIZE
    if query.edns >= 0:
        size = max(UDP_DEFAULT_SIZE, min(query.payload, UDP_MAX_SIZE))
    try:
        return response.to_wire(max_size=size), kind
    except dns.exception.TooBig:
        return _truncated(response, size), "truncated"


def _truncated(response: dns.message.Message, size: int) -> bytes:
    """As many answer records as fit in ``size`` bytes, flagged TC (as Consul trims its UDP answers).

    The additional section goes first; then answer records are dropped from
    the end, the most that fit found by bisection (records were shuffled).
    """
    records = [(rrset.name, rrset.rdtype, rdata) for rrset in response.answer for rdata in rrset]
    response.additional = []
    response.flags |= dns.flags.TC

    def wire_with(count: int) -> bytes | None:
        kept: dict[tuple[dns.name.Name, int], dns.rrset.RRset] = {}
        for name, rdtype, rdata in records[:count]:
            rrset = kept.get((name, rdtype))
            if rrset is None:
                rrset = kept[(name, rdtype)] = dns.rrset.RRset(name, dns.rdataclass.IN, rdtype)
                rrset.update_ttl(TTL)
            rrset.add(rdata)
        response.answer = list(kept.values())
        try:
            return response.to_wire(max_size=size)
        except dns.exception.TooBig:
            return None

    low, high = 0, len(records)  # wire_with(low) fits (0: the question alone always does)
    while low < high:
        middle = (low + high + 1) // 2
        if wire_with(middle) is None:
            high = middle - 1
        else:
            low = middle
    return wire_with(low) or b""


def _formerr(wire: bytes) -> bytes | None:
    """A bare FORMERR echoing the query's ID, when there are at least 12 header bytes."""
    if len(wire) < 12 or wire[2] & 0x80:  # too short, or a response (QR)
        return None
    flags = 0x8000 | (wire[2] & 0x79) << 8 | dns.rcode.FORMERR  # QR, the opcode and RD echoed
    return wire[:2] + flags.to_bytes(2, "big") + bytes(8)


def _resolve(response: dns.message.Message, qname: dns.name.Name, rdtype: int, view: DnsView) -> str:
    labels = [label.decode("ascii", "replace").lower() for label in qname.relativize(dns.name.root).labels]
    if not labels or labels[-1] not in DOMAINS:
        raise Refused()
    domain = labels[-1]
    zone = dns.name.from_text(domain + ".")
    parts = labels[:-1]
    if parts and parts[-1] == view.site:
        parts = parts[:-1]  # an explicit datacenter: this site's
    elif len(parts) >= 2 and parts[-1] not in ("service", "node", "addr") and parts[-2] in ("service", "node", "addr"):
        return _nxdomain(response, zone, view)  # another site's name: not held at this edge
    if not parts:  # the zone apex
        if rdtype in (dns.rdatatype.SOA, dns.rdatatype.ANY):
            response.answer.append(_soa(zone, zone, view))
        else:
            response.authority.append(_soa(zone, zone, view))
        return "apex"
    kind = parts[-1]
    if kind == "service" and len(parts) in (2, 3):
        return _service(response, qname, rdtype, view, zone, parts)
    if kind == "node" and len(parts) == 2:
        address = view.node_address(parts[0])
        if address is None:
            return _nxdomain(response, zone, view)
        _address_answer(response, qname, rdtype, address, zone, view)
        return "node"
    if kind == "addr" and len(parts) == 2:
        address = _unhex(parts[0])
        if address is None:
            return _nxdomain(response, zone, view)
        _address_answer(response, qname, rdtype, address, zone, view)
        return "addr"
    return _nxdomain(response, zone, view)


def _service(
    response: dns.message.Message, qname: dns.name.Name, rdtype: int, view: DnsView, zone: dns.name.Name,
    parts: list[str],
) -> str:
    if len(parts) == 3 and parts[0].startswith("_") and parts[1].startswith("_"):
        service, tag = parts[0][1:], parts[1][1:]  # RFC 2782: _service._tag
        if tag == "tcp":
            tag = ""
    elif len(parts) == 3:
        tag, service = parts[0], parts[1]
    else:
        tag, service = "", parts[0]
    found = [
        i for i in view.instances(service)
        if i.healthy and (not tag or tag in (t.lower() for t in i.tags))
    ]
    if not found:
        return _nxdomain(response, zone, view)
    random.shuffle(found)
    if rdtype == dns.rdatatype.SRV:
        srv = dns.rrset.RRset(qname, dns.rdataclass.IN, dns.rdatatype.SRV)
        srv.update_ttl(TTL)
        for instance in found:
            target = _target(instance, zone, view)
            srv.add(dns.rdtypes.IN.SRV.SRV(dns.rdataclass.IN, dns.rdatatype.SRV, 1, 1, instance.port, target))
            if _ip(instance.address) is not None:
                for rrset in _address_rrsets(target, instance.address, None):
                    response.additional.append(rrset)
        response.answer.append(srv)
        return "service"
    if rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.ANY):
        response.authority.append(_soa(zone, zone, view))
        return "nodata"
    added = False
    for rrset in _address_rrsets(qname, None, rdtype, [i.address for i in found]):
        response.answer.append(rrset)
        added = True
    if not added:
        response.authority.append(_soa(zone, zone, view))
    return "service"


def _address_answer(
    response: dns.message.Message, qname: dns.name.Name, rdtype: int, address: str, zone: dns.name.Name,
    view: DnsView,
) -> None:
    rrsets = _address_rrsets(qname, None, rdtype, [address])
    response.answer.extend(rrsets)
    if not rrsets:
        response.authority.append(_soa(zone, zone, view))


def _address_rrsets(
    name: dns.name.Name, address: str | None, rdtype: int | None, addresses: list[str] | None = None
) -> list[dns.rrset.RRset]:
    """A and AAAA rrsets of ``name`` for the IP addresses given (of ``rdtype`` only, unless ANY/None)."""
    a = dns.rrset.RRset(name, dns.rdataclass.IN, dns.rdatatype.A)
    aaaa = dns.rrset.RRset(name, dns.rdataclass.IN, dns.rdatatype.AAAA)
    for text in addresses if addresses is not None else [address or ""]:
        ip = _ip(text)
        if ip is None:
            continue
        if ip.version == 4:
            a.add(dns.rdtypes.IN.A.A(dns.rdataclass.IN, dns.rdatatype.A, str(ip)))
        else:
            aaaa.add(dns.rdtypes.IN.AAAA.AAAA(dns.rdataclass.IN, dns.rdatatype.AAAA, str(ip)))
    found = []
    for rrset, kind in ((a, dns.rdatatype.A), (aaaa, dns.rdatatype.AAAA)):
        if len(rrset) and rdtype in (None, kind, dns.rdatatype.ANY):
            rrset.update_ttl(TTL)
            found.append(rrset)
    return found


def _target(instance: Instance, zone: dns.name.Name, view: DnsView) -> dns.name.Name:
    ip = _ip(instance.address)
    if ip is not None:
        return dns.name.from_text(f"{ip.packed.hex()}.addr.{view.site}", zone)
    if instance.address:  # a host name the service registered
        try:
            return dns.name.from_text(instance.address.rstrip(".") + ".")
        except dns.exception.DNSException:
            pass
    return dns.name.from_text(f"{instance.node}.node.{view.site}", zone)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _unhex(label: str) -> str | None:
    try:
        raw = bytes.fromhex(label)
    except ValueError:
        return None
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw))
    if len(raw) == 16:
        return str(ipaddress.IPv6Address(raw))
    return None


def _soa(name: dns.name.Name, zone: dns.name.Name, view: DnsView) -> dns.rrset.RRset:
    rrset = dns.rrset.RRset(name, dns.rdataclass.IN, dns.rdatatype.SOA)
    rrset.update_ttl(TTL)
    rrset.add(dns.rdtypes.ANY.SOA.SOA(
        dns.rdataclass.IN, dns.rdatatype.SOA, dns.name.from_text("ns", zone),
        dns.name.from_text("hostmaster", zone), 1, 3600, 600, 86400, 0,
    ))
    return rrset


def _nxdomain(response: dns.message.Message, zone: dns.name.Name, view: DnsView) -> str:
    response.set_rcode(dns.rcode.NXDOMAIN)
    response.authority.append(_soa(zone, zone, view))
    return "nxdomain"
