"""What one CoAP peer, and all of them together, may make the gateway keep.

CoAP runs over UDP without a handshake, so every piece of state a datagram
creates is state an unauthenticated peer can multiply: Observe registrations
(each some 10 KB with its request, task and pipe, and each a notification per
write), resource-directory registrations, block-wise transfers being
assembled or served, and the duplicate-detection cache. Each is bounded per
source address and in total (``NetworkLimits``, protocols/admission.py); what
goes past a bound is refused or degraded as each class's docstring says, and
counted in ``konsul_coap_refused_total{reason}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..admission import ConnectionLimit

Refused = Callable[[str, str], None]  # (reason, source)


def peer_source(remote: Any) -> str:
    """The source a CoAP peer counts against: its IP address (IPv4 without the IPv6 mapping)."""
    remote = getattr(remote, "underlying_address", remote)  # an OSCORE request's: its UDP peer
    sockaddr = getattr(remote, "sockaddr", remote)
    host = str(sockaddr[0]) if isinstance(sockaddr, (tuple, list)) and sockaddr else str(sockaddr)
    return host.removeprefix("::ffff:")


def serve_without_observing(serverobservation: Any) -> None:
    """Answer this Observe GET as a plain GET.

    aiocoap's way to decline an observation in ``add_observation``: accept it
    and deregister it before the first response, which then goes out without
    the Observe option. (Returning without accepting leaves the observation
    without the cancellation callback aiocoap calls at the end, and the
    AttributeError that raises replaces the response.)
    """
    serverobservation.accept(_nothing)
    serverobservation.deregister()


def _nothing() -> None:
    pass


class ObserverAdmission:
    """Observe registrations per source and in total.

    Past either bound the GET is served as a plain GET (RFC 7641 2: a server
    that cannot add an observer answers without the Observe option, and the
    client sees a one-off response it can repeat later). The client is not
    refused the representation, only the registration; the refusal is counted
    as ``observers_per_source`` or ``observers_total``.
    """

    def __init__(self, total: int, per_source: int, refused: Refused) -> None:
        self.limit = ConnectionLimit(total, per_source)
        self.refused = refused

    def admit(self, request: Any) -> str | None:
        """The source to release later if ``request`` may register, else None."""
        source = peer_source(request.remote)
        bound = self.limit.try_admit(source)
        if bound is not None:
            self.refused(f"observers_{bound}", source)
            return None
        return source

    def release(self, source: str) -> None:
        self.limit.release(source)

    @property
    def count(self) -> int:
        return self.limit.count
