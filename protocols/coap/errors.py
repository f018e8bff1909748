"""CoAP errors with a diagnostic payload, and how state-layer errors map to them.

DESIGN.md (decision 8) asks for a 4.xx with a diagnostic payload for every
bad request. RFC 7252 (5.5.2) makes a diagnostic payload UTF-8 text without a
Content-Format; ours reads ``<short code>: <what to do>``, the same pair the
HTTP API sends as ``{"error", "detail"}``.
"""

from __future__ import annotations

from aiocoap import error, resource
from aiocoap.numbers.codes import Code
from konsul.sync.errors import KonsulError

from ..gateway import AuthError

# state-layer error status (HTTP-like) -> CoAP response code
_STATUS_CODES = {
    400: Code.BAD_REQUEST,
    401: Code.UNAUTHORIZED,
    403: Code.FORBIDDEN,
    404: Code.NOT_FOUND,
    409: Code.PRECONDITION_FAILED,
    413: Code.REQUEST_ENTITY_TOO_LARGE,
    503: Code.SERVICE_UNAVAILABLE,
    507: Code.SERVICE_UNAVAILABLE,
}

# aiocoap raises some errors without a message (unknown path, method not
# allowed, a block out of order); these give them one.
_DEFAULT_DETAILS = {
    Code.NOT_FOUND: ("not_found", "no such resource; GET /.well-known/core lists them"),
    Code.METHOD_NOT_ALLOWED: ("method_not_allowed", "this resource does not take that method"),
    Code.REQUEST_ENTITY_INCOMPLETE: (
        "incomplete",
        "a block arrived without the blocks before it; restart the transfer at block 0",
    ),
    Code.BAD_OPTION: ("bad_option", "the request carries a critical option this server does not know"),
}


_MAX_DETAIL = 300  # characters


class CoapError(error.ConstructionRenderableError):
    """A response code with the diagnostic ``<code>: <detail>``."""

    def __init__(self, code: Code, short: str, detail: str, **options: object) -> None:
        if len(detail) > _MAX_DETAIL:  # details may quote the request: do not echo a peer's bytes back in bulk
            detail = detail[:_MAX_DETAIL] + "..."
        self.code = code
        self.short = short
        self.detail = detail
        self.options = options
        super().__init__(f"{short}: {detail}")

    def to_message(self):
        message = super().to_message()
        for name, value in self.options.items():
            setattr(message.opt, name, value)
        return message


def bad_request(detail: str, short: str = "bad_request") -> CoapError:
    return CoapError(Code.BAD_REQUEST, short, detail)


def from_konsul(exc: KonsulError) -> CoapError:
    """The CoAP form of a state-layer error (an :class:`AuthError` is 4.01)."""
    if isinstance(exc, AuthError):
        return CoapError(Code.UNAUTHORIZED, exc.code, str(exc))
    code = _STATUS_CODES.get(exc.status, Code.INTERNAL_SERVER_ERROR)
    return CoapError(code, exc.code, str(exc))


def with_diagnostic(exc: error.RenderableError) -> error.RenderableError:
    """``exc`` itself if it already explains itself, else one that does."""
    if not isinstance(exc, error.ConstructionRenderableError) or exc.message:
        return exc
    if exc.code.is_successful():  # 2.31 Continue during a Block1 upload
        return exc
    short, detail = _DEFAULT_DETAILS.get(exc.code, (exc.code.name.lower(), "request refused"))
    return CoapError(exc.code, short, detail)


class ExplainedResource(resource.Resource):
    """A resource whose state-layer errors reach the device as CoAP errors."""

    async def render(self, request):
        try:
            return await super().render(request)
        except KonsulError as exc:
            raise from_konsul(exc) from None
