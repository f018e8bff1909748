"""Client commands: ``konsul kv ...`` and ``konsul services ...`` (``devices``: ``device_commands.py``).

They talk HTTP to a running agent (an edge, or the hub with ``--dc``) through its
Consul-compatible API, like the ``consul`` CLI does. Every client command takes

- ``--http-addr`` (env ``KONSUL_HTTP_ADDR``): the agent, ``HOST:PORT`` or a URL;
- ``--dc`` (env ``KONSUL_DC``): the datacenter (site) to ask about;
- ``--format table|json`` (env ``KONSUL_FORMAT``): a readable table, or the API's JSON;
- ``--token`` (env ``KONSUL_HTTP_TOKEN``, then ``CONSUL_HTTP_TOKEN``): the ACL token's
  SecretID, sent as ``X-Consul-Token`` on every request;
- ``--ca-file`` (env ``KONSUL_CACERT``, then ``CONSUL_CACERT``): for an ``https://``
  agent, the CA its certificate must chain to (the system's CAs otherwise);
  ``--client-cert``/``--client-key`` (env ``KONSUL_CLIENT_CERT``/``CONSUL_CLIENT_CERT``,
  ``..._KEY``): a certificate to present to an agent run with ``--tls-verify-client on``.

Exit codes: 0 success, 1 when the request failed (the server's error is printed as
``konsul: <error>: <detail>``, a missing key, a failed check-and-set, an
unreachable agent), 2 for usage errors.

This module imports only the standard library at import time, so that
``konsul --help`` stays fast; ``httpx`` is imported by the commands that use it.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

DEFAULT_HTTP_ADDR = "127.0.0.1:8500"
FORMATS = ("table", "json")
# Where the ACL token comes from when --token is not given, first found wins
# (CONSUL_HTTP_TOKEN: scripts written for Consul work unchanged).
TOKEN_ENVIRONMENT = ("KONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN")
# The same for the TLS files, named as Consul's CLI names them.
TLS_ENVIRONMENT = {
    "ca_file": ("KONSUL_CACERT", "CONSUL_CACERT"),
    "client_cert": ("KONSUL_CLIENT_CERT", "CONSUL_CLIENT_CERT"),
    "client_key": ("KONSUL_CLIENT_KEY", "CONSUL_CLIENT_KEY"),
}

# Blocking queries used by `kv watch`: how long the server may hold one, and how
# long the client waits for the answer (the server adds up to wait/16 of jitter).
WATCH_WAIT_S = 30
WATCH_READ_TIMEOUT_S = WATCH_WAIT_S * 17 / 16 + 15
REQUEST_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5.0
MAX_RETRY_DELAY_S = 30.0
LIST_VALUE_WIDTH = 60


class CommandError(Exception):
    """A failure to report as ``konsul: <message>`` with exit code ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class Unreachable(CommandError):
    """The agent could not be reached (worth retrying in ``kv watch``)."""


class UsageError(Exception):
    """Arguments that parse but do not make sense together (exit code 2)."""


# -- the parser -------------------------------------------------------------------


def add_commands(commands: argparse._SubParsersAction, add_flag: Callable[..., None]) -> None:
    """Add ``kv``, ``services`` and ``devices`` to the ``konsul`` parser's subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("agent connection and output")
    add_flag(
        group,
        "--http-addr",
        "the agent's HTTP API, HOST:PORT or http(s)://HOST:PORT",
        DEFAULT_HTTP_ADDR,
    )
    add_flag(group, "--dc", "the datacenter (site) to query; the agent's own by default")
    add_flag(
        group,
        "--format",
        "output: 'table' (readable, aligned) or 'json' (the API's JSON)",
        "table",
        choices=FORMATS,
    )
    group.add_argument(
        "--token",
        default=None,
        metavar="SECRET",
        help="the ACL token (its SecretID), sent as X-Consul-Token (env KONSUL_HTTP_TOKEN, then CONSUL_HTTP_TOKEN)",
    )
    for dest, flag, what in (
        ("ca_file", "--ca-file", "for an https:// agent: the PEM CA its certificate must chain to (instead of the "
         "system's CAs)"),
        ("client_cert", "--client-cert", "a PEM client certificate, for an agent run with --tls-verify-client on"),
        ("client_key", "--client-key", "the PEM private key of --client-cert"),
    ):
        first, second = TLS_ENVIRONMENT[dest]
        group.add_argument(flag, dest=dest, default=None, metavar="PATH", help=f"{what} (env {first}, then {second})")

    def sub(parent, name: str, run, help: str, description: str | None = None, epilog: str | None = None):
        parser = parent.add_parser(
            name,
            help=help,
            description=description or help[:1].upper() + help[1:] + ".",
            epilog=epilog,
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.set_defaults(run=_runner(run, parser))
        return parser

    # -- kv
    kv = commands.add_parser(
        "kv",
        help="read, write and watch configuration (the KV store)",
        description="Read, write and watch the KV store of a Konsul agent (Consul's /v1/kv API).",
    )
    kv_commands = kv.add_subparsers(dest="kv_command", metavar="SUBCOMMAND", required=True)

    get = sub(
        kv_commands,
        "get",
        cmd_kv_get,
        "show a key",
        "Show a key: its value, flags and indexes. Exits 1 if the key does not exist.",
    )
    get.add_argument("key", metavar="KEY", help="the key")
    get.add_argument("--raw", action="store_true", help="print only the value, byte for byte (for scripts)")

    put = sub(
        kv_commands,
        "put",
        cmd_kv_put,
        "write a key",
        "Write a key.",
        "VALUE '-' reads the value from stdin, '@FILE' reads it from FILE (to write a value\n"
        "starting with '@', pass it on stdin). Exits 1 when a --cas write does not match.",
    )
    put.add_argument("key", metavar="KEY", help="the key")
    put.add_argument("value", metavar="VALUE", help="the value; '-' reads stdin, '@FILE' reads a file")
    put.add_argument("--flags", type=int, default=None, help="an opaque unsigned integer stored with the key")
    put.add_argument(
        "--cas",
        type=int,
        default=None,
        metavar="INDEX",
        help="check-and-set: write only if the key's ModifyIndex is INDEX (0: only if it does not exist)",
    )
    put.add_argument("--ttl", default=None, metavar="DURATION", help="delete the key after DURATION (e.g. 30s, 5m) unless rewritten")

    delete = sub(
        kv_commands,
        "delete",
        cmd_kv_delete,
        "delete a key, or every key under a prefix",
        "Delete a key, or with --recurse every key under a prefix. Exits 1 when a --cas delete does not match.",
    )
    delete.add_argument("key", metavar="KEY", help="the key (the prefix with --recurse)")
    delete.add_argument("--recurse", action="store_true", help="delete every key starting with KEY")
    delete.add_argument(
        "--cas", type=int, default=None, metavar="INDEX", help="delete only if the key's ModifyIndex is INDEX"
    )

    listing = sub(
        kv_commands,
        "list",
        cmd_kv_list,
        "list the keys under a prefix",
        "List the keys under a prefix (all keys without one), with their values.",
    )
    listing.add_argument("prefix", metavar="PREFIX", nargs="?", default="", help="only keys starting with PREFIX")
    listing.add_argument("--keys", action="store_true", help="list key names only")
    listing.add_argument(
        "--separator",
        default=None,
        help="with --keys (implied), stop at SEPARATOR after the prefix, like a directory listing (e.g. /)",
    )

    watch = sub(
        kv_commands,
        "watch",
        cmd_kv_watch,
        "print a key (or a prefix) every time it changes",
        "Print a key's value every time it changes, until Ctrl-C or SIGTERM (exit status 0).",
        "With --recurse, the first output is a line per key under the prefix, then a line per\n"
        "key that changed ('KEY (deleted)' for a deleted one). A key that does not exist, or\n"
        "is deleted, is reported on stderr. With --format json, every change prints the API's\n"
        "JSON on one line (null, or [] for a prefix, when nothing exists).",
    )
    watch.add_argument("key", metavar="KEY_OR_PREFIX", help="the key, or the prefix with --recurse")
    watch.add_argument("--recurse", action="store_true", help="watch every key starting with KEY_OR_PREFIX")
    from .snapshot_commands import add_kv_transfer_commands

    add_kv_transfer_commands(kv_commands, sub)

    # -- services
    services = commands.add_parser(
        "services",
        help="register, list and deregister this agent's services",
        description="Register, list and deregister the services of a Konsul agent (Consul's /v1/agent API).",
    )
    service_commands = services.add_subparsers(dest="services_command", metavar="SUBCOMMAND", required=True)

    sub(
        service_commands,
        "list",
        cmd_services_list,
        "list the services registered on the agent, with their health",
    )

    register = sub(
        service_commands,
        "register",
        cmd_services_register,
        "register (or update) a service on the agent",
        "Register a service on the agent, or update it (same ID).",
        "examples:\n"
        "  konsul services register --name web --port 8080 --tag v1 --http http://127.0.0.1:8080/health --interval 10s\n"
        "  konsul services register --name worker --ttl 30s --deregister-after 5m\n"
        "  konsul services register --file service.json   (Consul's JSON, '-' reads stdin)",
    )
    register.add_argument("--file", default=None, metavar="FILE", help="a service definition in Consul's JSON ('-': stdin)")
    register.add_argument("--name", default=None, help="the service name (required without --file)")
    register.add_argument("--id", default=None, help="the service ID (default: the name)")
    register.add_argument("--address", default=None, help="the service's address (default: the agent's)")
    register.add_argument("--port", type=int, default=None, help="the service's port")
    register.add_argument("--tag", action="append", default=[], metavar="TAG", help="a tag (repeat for several)")
    register.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE", help="a metadata entry (repeat for several)")
    check = register.add_mutually_exclusive_group()
    check.add_argument("--ttl", default=None, metavar="DURATION", help="a TTL check: the service reports in every DURATION")
    check.add_argument("--http", default=None, metavar="URL", help="an HTTP check: GET URL every --interval (2xx passes)")
    check.add_argument("--tcp", default=None, metavar="HOST:PORT", help="a TCP check: connect to HOST:PORT every --interval")
    register.add_argument("--interval", default=None, metavar="DURATION", help="how often to run the --http/--tcp check (default 10s)")
    register.add_argument("--timeout", default=None, metavar="DURATION", help="the --http/--tcp check's timeout (default 10s)")
    register.add_argument(
        "--deregister-after",
        default=None,
        metavar="DURATION",
        help="deregister the service once its check has been critical this long",
    )

    deregister = sub(
        service_commands,
        "deregister",
        cmd_services_deregister,
        "remove a service from the agent",
    )
    deregister.add_argument("service_id", metavar="ID", help="the service ID")

    from .acl_commands import add_acl_commands
    from .device_commands import add_device_commands
    from .site_commands import add_site_commands

    add_device_commands(commands, sub)
    add_acl_commands(commands, sub)
    add_site_commands(commands, sub)
    from .snapshot_commands import add_snapshot_commands

    add_snapshot_commands(commands, sub)


def _runner(command: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser):
    """Wrap a command: usage errors exit 2, request errors print ``konsul: ...`` and exit 1."""

    def run(args: argparse.Namespace) -> int:
        if args.format not in FORMATS:  # from KONSUL_FORMAT, which argparse does not check
            parser.error(f"--format must be one of {', '.join(FORMATS)}, not {args.format!r}")
        _quiet_http_logging()
        return run_command(command, args, parser)

    return run


def run_command(
    command: Callable[[argparse.Namespace], int], args: argparse.Namespace, parser: argparse.ArgumentParser,
    interrupted: int = 130,
) -> int:
    """Run a CLI command the way every ``konsul`` command reports: a :class:`UsageError` is
    argparse's usage error (exit 2), a :class:`CommandError` prints ``konsul: ...`` and exits with
    its code, a closed stdout ends quietly, Ctrl-C exits with ``interrupted``."""
    try:
        return command(args)
    except UsageError as error:
        parser.error(str(error))
    except CommandError as error:
        print(f"konsul: {error}", file=sys.stderr)
        return error.code
    except BrokenPipeError:
        # The reader went away (`konsul kv list | head`); not an error of ours.
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        return interrupted


def _quiet_http_logging() -> None:
    # httpx logs every request at INFO; that is noise for a CLI unless debugging.
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _silence_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


# -- talking to the agent ------------------------------------------------------------


def normalize_addr(addr: str) -> str:
    """``HOST:PORT`` or a URL to a base URL without a trailing slash."""
    addr = (addr or "").strip()
    if not addr:
        raise UsageError(f"--http-addr is empty; give HOST:PORT (e.g. {DEFAULT_HTTP_ADDR})")
    if "://" not in addr:
        addr = "http://" + addr
    scheme = addr.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise UsageError(f"--http-addr must be HOST:PORT or an http:// or https:// URL, not {addr!r}")
    return addr.rstrip("/")


def token_of(args: argparse.Namespace) -> str | None:
    """The ACL token to send: ``--token``, else the first of :data:`TOKEN_ENVIRONMENT` set."""
    for token in (getattr(args, "token", None), *(os.environ.get(name) for name in TOKEN_ENVIRONMENT)):
        if token and token.strip():
            return token.strip()
    return None


def tls_file(args: argparse.Namespace, dest: str) -> str | None:
    """``--ca-file`` / ``--client-cert`` / ``--client-key``, else the first of their environment variables set."""
    for value in (getattr(args, dest, None), *(os.environ.get(name) for name in TLS_ENVIRONMENT[dest])):
        if value and value.strip():
            return value.strip()
    return None


def tls_verify(args: argparse.Namespace):
    """What httpx's ``verify`` takes: an SSL context from the TLS files, or True (the system's CAs)."""
    ca, cert, key = (tls_file(args, dest) for dest in ("ca_file", "client_cert", "client_key"))
    if not (ca or cert):
        return True
    if key and not cert:
        raise UsageError("--client-key needs --client-cert")
    from pathlib import Path

    from konsul.protocols.tls import TlsError, client_context

    try:
        return client_context(Path(ca) if ca else None, Path(cert) if cert else None, Path(key) if key else None)
    except TlsError as error:
        raise UsageError(str(error)) from None


class Client:
    """A small synchronous client for the agent's HTTP API (every request carries the token)."""

    def __init__(self, args: argparse.Namespace) -> None:
        import httpx

        self._httpx = httpx
        self.base = normalize_addr(args.http_addr)
        self.dc = args.dc or None
        token = token_of(args)
        if token is not None and not (token.isascii() and token.isprintable()):
            raise UsageError("the token must be printable ASCII: give its SecretID as printed")
        self.http = httpx.Client(
            base_url=self.base,
            timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            headers={"X-Consul-Token": token} if token else None,
            verify=tls_verify(args),
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        content: bytes | None = None,
        body: Any = None,
        read_timeout: float | None = None,
    ):
        """Send one request; raises :class:`Unreachable` when the agent cannot be reached."""
        httpx = self._httpx
        query = dict(params or {})
        if self.dc:
            query["dc"] = self.dc
        if body is not None:
            content = json.dumps(body).encode()
        timeout = httpx.Timeout(read_timeout or REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        try:
            return self.http.request(method, path, params=query, content=content, timeout=timeout)
        except httpx.ConnectError as error:
            if "CERTIFICATE_VERIFY_FAILED" in str(error):
                # Not worth retrying: the agent answered with a certificate we do not trust.
                raise CommandError(
                    f"the agent at {self.base} has a certificate this client does not trust ({_reason(error)}); "
                    "give --ca-file or set CONSUL_CACERT to the CA that signed it"
                ) from None
            if self.base.startswith("https:") and ("WRONG_VERSION_NUMBER" in str(error) or "RECORD_LAYER" in str(error).upper()):
                raise CommandError(f"the agent at {self.base} does not speak TLS: use http://") from None
            raise Unreachable(
                f"cannot connect to the agent at {self.base} ({_reason(error)}); "
                "is it running? Set --http-addr or KONSUL_HTTP_ADDR to its HTTP address"
            ) from None
        except httpx.TimeoutException:
            raise Unreachable(f"the agent at {self.base} did not answer {method} {path} in time") from None
        except httpx.HTTPError as error:
            # With TLS 1.3 the agent's verdict on our certificate arrives as an
            # alert on the first read, after the handshake seemed to succeed.
            if "CERTIFICATE_REQUIRED" in str(error):
                raise CommandError(
                    f"the agent at {self.base} requires a client certificate (it runs with --tls-verify-client on): "
                    "give --client-cert and --client-key, or set CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY"
                ) from None
            if any(alert in str(error) for alert in ("ALERT_UNKNOWN_CA", "ALERT_BAD_CERTIFICATE",
                                                     "ALERT_CERTIFICATE_UNKNOWN")):
                raise CommandError(
                    f"the agent at {self.base} refused the client certificate ({_reason(error)}); "
                    "is --client-cert signed by the CA the agent trusts (its --tls-ca)?"
                ) from None
            hint = ""
            if self.base.startswith("https:") and isinstance(error, httpx.RemoteProtocolError):
                # A closed connection without an alert (an older agent, a proxy).
                hint = "; if the agent runs with --tls-verify-client on, give --client-cert and --client-key"
            raise Unreachable(f"request to the agent at {self.base} failed: {_reason(error)}{hint}") from None

    def call(self, method: str, path: str, **kwargs):
        """Like :meth:`request`, but a 4xx/5xx answer raises :class:`CommandError`."""
        response = self.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise api_error(response)
        return response

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reason(error: BaseException) -> str:
    text = (str(error) or type(error).__name__).rstrip(".")
    if "Connection refused" in text or "Errno 111" in text:
        return "connection refused"
    return text


def error_body(response) -> dict | None:
    """The ``{"error", "detail"}`` body of an error answer, if it has one."""
    try:
        body = json.loads(response.content)
    except ValueError:
        return None
    if isinstance(body, dict) and "error" in body:
        return body
    return None


def api_error(response) -> CommandError:
    body = error_body(response)
    if body is not None:
        detail = body.get("detail")
        message = f"{body['error']}: {detail}" if detail else str(body["error"])
        if body["error"] == "permission_denied" and not _sent_token(response):
            message += " (no token was sent: give --token or set KONSUL_HTTP_TOKEN)"
        return CommandError(message)
    text = response.text.strip()
    return CommandError(f"HTTP {response.status_code}: {text[:200] or response.reason_phrase or 'error'}")


def _sent_token(response) -> bool:
    try:
        return "X-Consul-Token" in response.request.headers
    except RuntimeError:  # a response built without a request
        return False


def is_missing(response) -> bool:
    """A 404 that means "no such key", as opposed to an error such as an unknown dc."""
    return response.status_code == 404 and error_body(response) is None


def kv_path(key: str) -> str:
    """The URL path of a key: "/" travels raw, as Consul clients send it; the rest is escaped.

    Segments "." and ".." are escaped too, or the HTTP client would resolve them
    (``a/../b`` would silently become ``b``).
    """
    segments = (s.replace(".", "%2E") if s in (".", "..") else quote(s, safe="") for s in key.split("/"))
    return "/v1/kv/" + "/".join(segments)


def index_of(response) -> int:
    try:
        return int(response.headers.get("X-Consul-Index", "0"))
    except ValueError:
        return 0


# -- output -------------------------------------------------------------------------


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def note(text: str) -> None:
    print(f"konsul: {text}", file=sys.stderr, flush=True)


def print_json(body: Any, compact: bool = False) -> None:
    if compact:
        out(json.dumps(body, separators=(",", ":"), ensure_ascii=False))
    else:
        out(json.dumps(body, indent=2, ensure_ascii=False))


def table(rows: list[list[str]], header: list[str] | None = None) -> str:
    """Rows as aligned columns (two spaces apart); the last column is not padded."""
    lines = ([header] if header else []) + rows
    if not lines:
        return ""
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    rendered = []
    for row in lines:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        rendered.append("  ".join(cells).rstrip())
    return "\n".join(rendered)


def decode_value(encoded: str | None) -> bytes:
    return base64.b64decode(encoded) if encoded else b""


def show_value(value: bytes, limit: int | None = None) -> str:
    """A value on one line: text with control characters escaped, or a note for binary."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return f"<binary, {len(value)} bytes>"
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def text_value(value: bytes) -> str:
    """A value as text, for `kv watch` (multi-line values stay multi-line)."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return f"<binary, {len(value)} bytes>"


# -- kv -----------------------------------------------------------------------------


def cmd_kv_get(args: argparse.Namespace) -> int:
    with Client(args) as client:
        params = {"raw": "true"} if args.raw else None
        response = client.request("GET", kv_path(args.key), params=params)
        if is_missing(response):
            raise CommandError(f"key {args.key!r} does not exist (asked {client.base})")
        if response.status_code >= 400:
            raise api_error(response)
    if args.raw:
        sys.stdout.buffer.write(response.content)
        sys.stdout.buffer.flush()
        return 0
    entries = response.json()
    if args.format == "json":
        print_json(entries)
        return 0
    entry = entries[0]
    rows = [
        ["Key", entry["Key"]],
        ["Value", show_value(decode_value(entry.get("Value")))],
        ["Flags", str(entry.get("Flags", 0))],
        ["CreateIndex", str(entry.get("CreateIndex", ""))],
        ["ModifyIndex", str(entry.get("ModifyIndex", ""))],
        ["LockIndex", str(entry.get("LockIndex", 0))],
    ]
    out(table(rows))
    return 0


def read_value(spec: str) -> bytes:
    """VALUE as given: ``-`` reads stdin, ``@FILE`` reads a file, anything else is the value."""
    if spec == "-":
        return sys.stdin.buffer.read()
    if spec.startswith("@") and len(spec) > 1:
        path = spec[1:]
        try:
            with open(path, "rb") as file:
                return file.read()
        except OSError as error:
            raise CommandError(f"cannot read the value from {path}: {error.strerror or error}") from None
    return spec.encode()


def cmd_kv_put(args: argparse.Namespace) -> int:
    value = read_value(args.value)
    params = {}
    if args.flags is not None:
        params["flags"] = str(args.flags)
    if args.cas is not None:
        params["cas"] = str(args.cas)
    if args.ttl is not None:
        params["ttl"] = args.ttl
    with Client(args) as client:
        ok = client.call("PUT", kv_path(args.key), params=params, content=value).json()
    if args.format == "json":
        print_json(ok)
    _require_done(ok, args, "written")
    if args.format == "table":
        out(f"Success! Data written to: {args.key}")
    return 0


def _require_done(ok: object, args: argparse.Namespace, done: str) -> None:
    """Turn the agent's ``false`` into an error that says why (a CAS mismatch, usually)."""
    if ok is True:
        return
    if args.cas is not None:
        raise CommandError(
            f"cas_mismatch: {args.key!r} was not {done}: its ModifyIndex is not {args.cas} "
            "(it changed since you read it); read it again and retry"
        )
    raise CommandError(f"{args.key!r} was not {done} (the agent answered {ok!r})")


def cmd_kv_delete(args: argparse.Namespace) -> int:
    params = {}
    if args.recurse:
        params["recurse"] = "true"
    if args.cas is not None:
        if args.recurse:
            raise UsageError("--cas and --recurse cannot be combined")
        params["cas"] = str(args.cas)
    with Client(args) as client:
        ok = client.call("DELETE", kv_path(args.key), params=params).json()
    if args.format == "json":
        print_json(ok)
    _require_done(ok, args, "deleted")
    if args.format == "table":
        out(f"Success! Deleted keys with prefix: {args.key}" if args.recurse else f"Success! Deleted key: {args.key}")
    return 0


def cmd_kv_list(args: argparse.Namespace) -> int:
    keys_only = args.keys or args.separator is not None
    params = {"keys": "true"} if keys_only else {"recurse": "true"}
    if args.separator is not None:
        params["separator"] = args.separator
    with Client(args) as client:
        response = client.request("GET", kv_path(args.prefix), params=params)
        if response.status_code >= 400 and not is_missing(response):
            raise api_error(response)
    found = [] if is_missing(response) else response.json()
    if args.format == "json":
        print_json(found)
        return 0
    if not found:
        where = f"under {args.prefix!r}" if args.prefix else "in the store"
        note(f"no keys {where}")
        return 0
    if keys_only:
        out("\n".join(found))
        return 0
    rows = [
        [
            entry["Key"],
            str(entry.get("Flags", 0)),
            str(entry.get("ModifyIndex", "")),
            show_value(decode_value(entry.get("Value")), LIST_VALUE_WIDTH),
        ]
        for entry in found
    ]
    out(table(rows, ["KEY", "FLAGS", "INDEX", "VALUE"]))
    return 0


_NOTHING = object()  # `kv watch` has printed nothing yet


def cmd_kv_watch(args: argparse.Namespace) -> int:
    """Blocking queries in a loop; prints only real changes, exits 0 on SIGINT/SIGTERM."""

    def stop(signum, frame) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        with Client(args) as client:
            _watch(client, args)
    except KeyboardInterrupt:
        return 0
    return 0


def _watch(client: Client, args: argparse.Namespace) -> None:
    path = kv_path(args.key)
    recurse = args.recurse
    index = 0
    shown: Any = _NOTHING  # the state last printed
    failures = 0
    while True:
        params = {"recurse": "true"} if recurse else {}
        if index:
            params.update(index=str(index), wait=f"{WATCH_WAIT_S}s")
        started = time.monotonic()
        try:
            response = client.request("GET", path, params=params, read_timeout=WATCH_READ_TIMEOUT_S)
            if response.status_code >= 500:
                raise Unreachable(str(api_error(response)))
        except Unreachable as error:
            if shown is _NOTHING:
                raise  # never worked: most likely a wrong address
            failures += 1
            delay = min(2 ** (failures - 1), MAX_RETRY_DELAY_S)
            if failures == 1:
                note(f"{error}; retrying")
            time.sleep(delay)
            index = 0
            continue
        if failures:
            note(f"reconnected to {client.base}")
            failures = 0
        if response.status_code >= 400 and not is_missing(response):
            raise api_error(response)
        entries = [] if is_missing(response) else response.json()
        new_index = index_of(response)
        state = _watch_state(entries)
        if state != shown:
            _print_change(args, entries, shown, state)
            shown = state
        elif new_index == index and time.monotonic() - started < 1.0:
            # The server answered at once without anything new: do not spin.
            time.sleep(1.0)
        index = max(new_index, 1)



def _watch_state(entries: list[dict]) -> dict[str, tuple]:
    return {e["Key"]: (e.get("ModifyIndex"), e.get("Value"), e.get("Flags")) for e in entries}


def _print_change(args: argparse.Namespace, entries: list[dict], before: Any, after: dict[str, tuple]) -> None:
    first = before is _NOTHING
    if args.format == "json":
        if args.recurse:
            print_json(entries, compact=True)
        else:
            print_json(entries or None, compact=True)
        return
    if not args.recurse:
        entry = next((e for e in entries if e["Key"] == args.key), None)
        if entry is None:
            note(f"key {args.key!r} does not exist yet; waiting for it" if first else f"key {args.key!r} was deleted")
        else:
            out(text_value(decode_value(entry.get("Value"))))
        return
    by_key = {e["Key"]: e for e in entries}
    if first:
        if not entries:
            note(f"no keys under {args.key!r} yet; waiting for changes")
            return
        changed = list(by_key)
        gone: list[str] = []
    else:
        changed = [k for k, v in after.items() if before.get(k) != v]
        gone = [k for k in before if k not in after]
    rows = [[k, show_value(decode_value(by_key[k].get("Value")))] for k in changed]
    rows += [[k, "(deleted)"] for k in gone]
    rows.sort(key=lambda row: row[0])
    out(table(rows))


# -- services -------------------------------------------------------------------------

_SEVERITY = {"passing": 0, "warning": 1, "critical": 2}


def cmd_services_list(args: argparse.Namespace) -> int:
    with Client(args) as client:
        services = client.call("GET", "/v1/agent/services").json()
        if args.format == "json":
            print_json(services)
            return 0
        checks = client.call("GET", "/v1/agent/checks").json()
    if not services:
        note("no services are registered on this agent")
        return 0
    health: dict[str, list[str]] = {}
    for check in checks.values():
        health.setdefault(check.get("ServiceID", ""), []).append(check.get("Status", ""))
    rows = []
    for service_id in sorted(services):
        service = services[service_id]
        statuses = health.get(service_id, [])
        worst = max(statuses, key=lambda s: _SEVERITY.get(s, 3)) if statuses else "-"
        meta = service.get("Meta") or {}
        rows.append(
            [
                service_id,
                service.get("Service", ""),
                service.get("Address") or "-",
                str(service.get("Port") or "-"),
                worst,
                ",".join(service.get("Tags") or []) or "-",
                ",".join(f"{k}={v}" for k, v in sorted(meta.items())) or "-",
            ]
        )
    out(table(rows, ["ID", "NAME", "ADDRESS", "PORT", "HEALTH", "TAGS", "META"]))
    return 0


def cmd_services_register(args: argparse.Namespace) -> int:
    if args.file is not None:
        given = [
            flag
            for flag, value in (
                ("--name", args.name),
                ("--id", args.id),
                ("--address", args.address),
                ("--port", args.port),
                ("--tag", args.tag),
                ("--meta", args.meta),
                ("--ttl", args.ttl),
                ("--http", args.http),
                ("--tcp", args.tcp),
                ("--interval", args.interval),
                ("--timeout", args.timeout),
                ("--deregister-after", args.deregister_after),
            )
            if value not in (None, [])
        ]
        if given:
            raise UsageError(f"--file describes the whole service; do not combine it with {', '.join(given)}")
        body = service_from_file(args.file)
    else:
        body = service_from_flags(args)
    with Client(args) as client:
        client.call("PUT", "/v1/agent/service/register", body=body)
    if args.format == "json":
        print_json(body)
    else:
        out(f"Registered service: {body.get('ID') or body.get('Name')}")
    return 0


def service_from_flags(args: argparse.Namespace) -> dict:
    if not args.name:
        raise UsageError("give the service's --name (or a definition with --file)")
    body: dict[str, Any] = {"Name": args.name}
    if args.id:
        body["ID"] = args.id
    if args.address is not None:
        body["Address"] = args.address
    if args.port is not None:
        if not 0 <= args.port <= 65535:
            raise UsageError(f"--port must be between 0 and 65535, not {args.port}")
        body["Port"] = args.port
    if args.tag:
        body["Tags"] = list(args.tag)
    if args.meta:
        meta = {}
        for item in args.meta:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UsageError(f"--meta takes KEY=VALUE, not {item!r}")
            meta[key] = value
        body["Meta"] = meta
    kind = "TTL" if args.ttl else "HTTP" if args.http else "TCP" if args.tcp else None
    if kind is None:
        for flag, value in (
            ("--interval", args.interval),
            ("--timeout", args.timeout),
            ("--deregister-after", args.deregister_after),
        ):
            if value is not None:
                raise UsageError(f"{flag} needs a check: add --ttl, --http or --tcp")
        return body
    if kind == "TTL" and (args.interval is not None or args.timeout is not None):
        raise UsageError("--interval and --timeout are for --http and --tcp checks; a --ttl check has none")
    check: dict[str, Any] = {kind: args.ttl or args.http or args.tcp}
    if args.interval is not None:
        check["Interval"] = args.interval
    if args.timeout is not None:
        check["Timeout"] = args.timeout
    if args.deregister_after is not None:
        check["DeregisterCriticalServiceAfter"] = args.deregister_after
    body["Check"] = check
    return body


# Consul's service files may spell fields in snake_case (`deregister_critical_service_after`);
# the API wants CamelCase. Unknown fields pass unchanged, so the agent judges them.
_SERVICE_FIELDS = ["ID", "Name", "Tags", "Address", "Port", "Meta", "Check", "Checks", "Kind",
                   "EnableTagOverride", "Weights", "TaggedAddresses"]
_CHECK_FIELDS = ["ID", "CheckID", "Name", "TTL", "HTTP", "TCP", "Interval", "Timeout",
                 "DeregisterCriticalServiceAfter", "Notes", "Status", "Method", "Header",
                 "TLSSkipVerify", "Body", "ServiceID"]


def _canonical(fields: list[str]) -> dict[str, str]:
    return {name.lower(): name for name in fields}


def _rename(body: dict, fields: dict[str, str]) -> dict:
    return {fields.get(str(key).replace("_", "").lower(), key): value for key, value in body.items()}


def service_from_file(path: str) -> dict:
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as file:
                text = file.read()
    except (OSError, UnicodeDecodeError) as error:
        raise CommandError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
    try:
        data = json.loads(text)
    except ValueError as error:
        raise CommandError(f"{path} is not valid JSON: {error}") from None
    if isinstance(data, dict) and len(data) == 1:
        (outer, inner), = data.items()
        if outer.lower() == "service":
            data = inner
        elif outer.lower() == "services":
            raise CommandError(f"{path} holds several services; register them one file at a time")
    if not isinstance(data, dict):
        raise CommandError(f"{path} must hold a JSON object: the service (optionally as {{\"Service\": {{...}}}})")
    body = _rename(data, _canonical(_SERVICE_FIELDS))
    checks = _canonical(_CHECK_FIELDS)
    if isinstance(body.get("Check"), dict):
        body["Check"] = _rename(body["Check"], checks)
    if isinstance(body.get("Checks"), list):
        body["Checks"] = [_rename(c, checks) if isinstance(c, dict) else c for c in body["Checks"]]
    return body


def cmd_services_deregister(args: argparse.Namespace) -> int:
    with Client(args) as client:
        client.call("PUT", "/v1/agent/service/deregister/" + quote(args.service_id, safe=""))
    if args.format == "json":
        print_json(True)
    else:
        out(f"Deregistered service: {args.service_id}")
    return 0
