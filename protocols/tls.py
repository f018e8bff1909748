"""TLS for the agent's listeners and its sync link, from the operator's files.

One ``ServerTls`` per process serves every TLS listener (HTTP, MQTT): each
new connection takes ``ServerTls.context`` as it is at that moment, so
``reload()`` (on SIGHUP) changes the certificate for new connections while
the connections already open keep theirs and the process keeps running. A
reload that fails (a missing file, a key that does not match) keeps the old
context and says why.

Only the standard library's ``ssl`` is used here; generating certificates
(``konsul dev``) needs ``cryptography`` and lives elsewhere, imported only
when it runs.
"""

from __future__ import annotations

import logging
import signal
import ssl
from dataclasses import dataclass
from pathlib import Path

import trio

log = logging.getLogger("konsul.tls")

# How long a client may take to finish its TLS handshake before the
# connection is dropped (a half-open handshake must not hold a slot forever).
HANDSHAKE_TIMEOUT_S = 10.0


class TlsError(ValueError):
    """A certificate, key or CA file that cannot be used; the message says which and why.

    A ``ValueError``, so that at start-up the CLI prints it and exits 2.
    """


@dataclass(frozen=True)
class TlsFiles:
    """What ``--tls-cert --tls-key [--tls-ca] [--tls-verify-client]`` name."""

    cert: Path
    key: Path
    # CA bundle for client certificates: with ``verify_client`` every client
    # must present a certificate it signed; without, one is checked if offered.
    ca: Path | None = None
    verify_client: bool = False


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """A server-side context from ``files``; ``TlsError`` naming the file that is wrong."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for path, flag in ((files.cert, "--tls-cert"), (files.key, "--tls-key")):
        if not Path(path).is_file():
            raise TlsError(f"{flag} {path}: no such file")
    try:
        context.load_cert_chain(str(files.cert), str(files.key))
    except (ssl.SSLError, OSError, ValueError) as error:
        raise TlsError(
            f"--tls-cert {files.cert} / --tls-key {files.key}: cannot load them ({error}); "
            "give a PEM certificate (chain) and the PEM private key that belongs to it"
        ) from None
    if files.ca is not None:
        try:
            context.load_verify_locations(cafile=str(files.ca))
        except (ssl.SSLError, OSError, ValueError) as error:
            raise TlsError(f"--tls-ca {files.ca}: cannot load it ({error}); give a PEM CA bundle") from None
        context.verify_mode = ssl.CERT_REQUIRED if files.verify_client else ssl.CERT_OPTIONAL
    elif files.verify_client:
        raise TlsError("--tls-verify-client needs --tls-ca: the CA that signs the clients' certificates")
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


class ServerTls:
    """The current server context for ``files``; ``reload()`` replaces it.

    Also what its listeners count: failed handshakes by listener (``http``,
    ``mqtt``) and reason, exported by ``TlsCollector``.
    """

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self.context = server_context(files)
        self.reloads = 0
        self.reload_failures = 0
        self.handshake_failures: dict[tuple[str, str], int] = {}

    def reload(self) -> None:
        """Read the files again; on failure the old context stays and ``TlsError`` says why."""
        try:
            self.context = server_context(self.files)
        except TlsError:
            self.reload_failures += 1
            raise
        self.reloads += 1

    def count_handshake_failure(self, interface: str, reason: str) -> None:
        """One failed handshake on listener ``interface`` (``http``, ``mqtt``) for ``reason``."""
        key = (interface, reason)
        self.handshake_failures[key] = self.handshake_failures.get(key, 0) + 1


# Why a server-side handshake failed, for every TLS listener (HTTP, MQTT): the
# ``reason`` label of konsul_tls_handshake_failures_total, and a few words for
# the log that say what the operator or the client can do.
_NOT_TLS_REASONS = frozenset({"HTTP_REQUEST", "WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE",
                              "PACKET_LENGTH_TOO_LONG", "UNEXPECTED_RECORD", "RECORD_LENGTH_MISMATCH"})
_CLIENT_CERT_REASONS = frozenset({"PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_VERIFY_FAILED",
                                  "NO_CERTIFICATE_RETURNED"})
# OpenSSL's reasons, in words; ``{protocol}`` is the listener's protocol (HTTP, MQTT).
_HANDSHAKE_REASONS = {
    "WRONG_VERSION_NUMBER": "not TLS (a plaintext {protocol} client on the TLS port?)",
    "HTTP_REQUEST": "not TLS (an HTTP request)",
    "UNSUPPORTED_PROTOCOL": "the client offers only TLS versions below 1.2",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no client certificate, and --tls-verify-client on requires one",
    "CERTIFICATE_VERIFY_FAILED": "the client certificate is not signed by --tls-ca (or has expired)",
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust our certificate (give it the CA that signed --tls-cert)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the client rejected our certificate (its name or dates?)",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the client rejected our certificate (its name or CA?)",
    "NO_SHARED_CIPHER": "no cipher both sides support",
}
_CLOSED = "the client closed the connection during the handshake"


def handshake_failure(error: BaseException | None, protocol: str) -> tuple[str, str]:
    """``(reason label, detail for the log)`` for what ``SSLStream.do_handshake`` raised.

    ``protocol`` (``HTTP``, ``MQTT``) names what a plaintext client on the port
    was probably speaking.
    """
    cause = error.__cause__ if isinstance(error, trio.BrokenResourceError) and error.__cause__ else error
    if isinstance(cause, ssl.SSLError):
        code = getattr(cause, "reason", None) or type(cause).__name__
        known = _HANDSHAKE_REASONS.get(code)
        detail = known.format(protocol=protocol) if known else f"{code} ({cause})"
        if code in _NOT_TLS_REASONS:
            return "not_tls", detail
        if code in _CLIENT_CERT_REASONS:
            return "client_certificate", detail
        if code == "UNEXPECTED_EOF_WHILE_READING" or isinstance(cause, ssl.SSLEOFError):
            return "closed", f"{_CLOSED}; does it trust this agent's CA?"
        if code.startswith(("SSLV3_ALERT", "TLSV1_ALERT", "TLSV13_ALERT")):
            # The client gave up on us: usually it does not trust our certificate.
            return "client_alert", detail
        return "protocol", detail
    if cause is None or isinstance(cause, (trio.BrokenResourceError, trio.ClosedResourceError, OSError)):
        return "closed", _CLOSED
    return "protocol", f"{type(cause).__name__}: {cause}"


class TlsCollector:
    """Prometheus metrics of a ``ServerTls``: failed handshakes per listener and reason, reloads."""

    def __init__(self, tls: ServerTls) -> None:
        self.tls = tls

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        failures = CounterMetricFamily(
            "konsul_tls_handshake_failures", "TLS handshakes that failed, by listener and reason "
            "(not_tls, timeout, client_certificate, client_alert, closed, protocol)", labels=["interface", "reason"],
        )
        for (interface, reason), count in sorted(self.tls.handshake_failures.items()):
            failures.add_metric([interface, reason], count)
        yield failures
        reloads = CounterMetricFamily("konsul_tls_reloads", "Certificate reloads (SIGHUP) by result", labels=["result"])
        reloads.add_metric(["ok"], self.tls.reloads)
        reloads.add_metric(["failed"], self.tls.reload_failures)
        yield reloads


def client_context(ca: Path | None = None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client context that trusts only ``ca`` when given (pinning), the system's CAs otherwise.

    ``cert``/``key``: a client certificate to present (mutual TLS).
    """
    try:
        context = ssl.create_default_context(cafile=None if ca is None else str(ca))
    except (ssl.SSLError, OSError, ValueError) as error:
        raise TlsError(f"CA file {ca}: cannot load it ({error}); give a PEM CA bundle") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        try:
            context.load_cert_chain(str(cert), None if key is None else str(key))
        except (ssl.SSLError, OSError, ValueError) as error:
            raise TlsError(f"client certificate {cert} / key {key}: cannot load them ({error})") from None
    return context


async def reload_on_sighup(tls: ServerTls, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Reload ``tls`` on every SIGHUP for as long as the process runs."""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        async for _ in signals:
            try:
                tls.reload()
            except TlsError as error:
                log.error("SIGHUP: kept the certificate in use: %s", error)
            else:
                log.info("SIGHUP: reloaded the TLS certificate %s", tls.files.cert)
