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
    """The current server context for ``files``; ``reload()`` replaces it."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self.context = server_context(files)
        self.reloads = 0

    def reload(self) -> None:
        """Read the files again; on failure the old context stays and ``TlsError`` says why."""
        self.context = server_context(self.files)
        self.reloads += 1


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
