"""``/ui/``: the web console's static files (protocols/http/ui/), served by the hub and each edge.

The console is plain ES modules and CSS shipped in the package: no build step.
Every file is read once, at import, with its ETag (a hash of the content) and a
gzip copy; a browser revalidates (``Cache-Control: no-cache``) and gets a 304
while the file is unchanged, so an upgrade is seen at once and a reload costs
a round trip, not the bytes. The page runs under a strict Content-Security-Policy:
scripts and styles from this origin only, nothing inline, no frames, requests
to this origin only. The files hold no data: the console reads the API with the
token the user logs in with, so these routes need no token (authz.OPEN).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
from dataclasses import dataclass
from importlib import resources

from konsul.sync.errors import NotFound

from .request import request
from .responses import Response
from .router import Routes

ui_api = Routes("ui")

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}
_SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
    "Vary": "Accept-Encoding",
}


@dataclass(frozen=True)
class Asset:
    content_type: str
    body: bytes
    gzipped: bytes
    etag: str


@functools.cache
def _assets() -> dict[str, Asset]:
    """The console's files, read and compressed on first use rather than at every agent start."""
    found: dict[str, Asset] = {}
    folder = resources.files("konsul.protocols.http.ui")
    for item in folder.iterdir():
        suffix = "." + item.name.rsplit(".", 1)[-1] if "." in item.name else ""
        if not item.is_file() or suffix not in _TYPES:
            continue
        body = item.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        found[item.name] = Asset(_TYPES[suffix], body, gzip.compress(body, 9, mtime=0), etag)
    return found



def _serve(name: str) -> Response:
    asset = _assets().get(name)
    if asset is None:
        raise NotFound(f"the console has no file {name!r}; open /ui/")
    headers = dict(_SECURITY_HEADERS, ETag=asset.etag)
    if asset.etag in (request.headers.get("if-none-match") or ""):
        return Response(b"", 304, headers, asset.content_type)
    if "gzip" in (request.headers.get("accept-encoding") or ""):
        headers["Content-Encoding"] = "gzip"
        return Response(asset.gzipped, 200, headers, asset.content_type)
    return Response(asset.body, 200, headers, asset.content_type)


@ui_api.route("/ui", methods=["GET"])
async def ui_root() -> Response:
    return Response(b"", 308, {"Location": "/ui/"})


@ui_api.route("/ui/", methods=["GET"])
async def ui_index() -> Response:
    return _serve("index.html")


@ui_api.route("/ui/<name>", methods=["GET"])
async def ui_asset(name: str) -> Response:
    return _serve(name)
