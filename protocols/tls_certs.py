"""Certificates made on this machine: ``konsul dev``'s own CA and the certificates it signs.

Only ``konsul dev`` (and whatever explicitly asks for generated certificates)
imports this module: it needs ``cryptography``, which an agent given the
operator's files never loads.

``ensure_dev_certificates`` keeps, in one directory (mode 0700),

- ``ca.pem`` / ``ca-key.pem``: a self-signed CA, made once;
- ``server.pem`` / ``server-key.pem``: a server certificate for 127.0.0.1,
  ::1 and localhost, signed by that CA;

private keys mode 0600. Files that are there, parse, belong together and are
valid for at least ``RENEW_WITHIN`` more are reused, so a client that trusts
``ca.pem`` once keeps trusting the dev agents across restarts; anything
missing, broken or about to expire is made again (a new CA also means a new
server certificate). ``issue`` signs further certificates with the same CA
(a site's client certificate, for instance).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALIDITY = datetime.timedelta(days=5 * 365)
CERT_VALIDITY = datetime.timedelta(days=365)
# Renewed when less than this is left, so a dev setup never fails on an expiry mid-session.
RENEW_WITHIN = datetime.timedelta(days=30)
DEV_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class DevCertificates:
    """Where the dev CA and server certificate are; ``created`` what this call (re)made."""

    directory: Path
    ca: Path
    ca_key: Path
    cert: Path
    key: Path
    created: tuple[str, ...] = ()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: what every TLS client takes, and a handshake far cheaper than RSA's.
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode`` from the start (a key is never readable by others), atomically."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    os.replace(temporary, path)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    _write(path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption(),
    ), 0o600)


def _load(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The certificate and key at these paths if both parse and belong together; None otherwise."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        return None
    return cert, key


def _fresh(cert: x509.Certificate) -> bool:
    return cert.not_valid_after_utc - _now() > RENEW_WITHIN


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Konsul dev"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def new_ca(common_name: str = "Konsul dev CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(
    ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str, *,
    hosts: tuple[str, ...] = (), server: bool = True, client: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for ``common_name`` signed by ``ca``: a server's for ``hosts`` (IPs or DNS names), a client's, or both."""
    key = _new_key()
    now = _now()
    names: list[x509.GeneralName] = []
    for host in hosts or (common_name,):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] * server + [ExtendedKeyUsageOID.CLIENT_AUTH] * client
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + CERT_VALIDITY, ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _serves(cert: x509.Certificate, ca: x509.Certificate, hosts: tuple[str, ...]) -> bool:
    """Whether ``cert`` was issued by ``ca`` (same key) and names every one of ``hosts``."""
    try:
        cert.verify_directly_issued_by(ca)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except Exception:  # noqa: BLE001 - a signature that does not verify, a missing SAN: reissue
        return False
    named = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} | set(sans.get_values_for_type(x509.DNSName))
    return all(str(ipaddress.ip_address(h)) in named if _is_ip(h) else h in named for h in hosts)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def ensure_dev_certificates(directory: Path, hosts: tuple[str, ...] = DEV_HOSTS) -> DevCertificates:
    """The dev CA and server certificate in ``directory``: reused when good, made when not."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory.chmod(0o700)
    paths = DevCertificates(
        directory, directory / "ca.pem", directory / "ca-key.pem", directory / "server.pem",
        directory / "server-key.pem",
    )
    created: list[str] = []
    loaded = _load(paths.ca, paths.ca_key)
    if loaded is None or not _fresh(loaded[0]):
        loaded = new_ca()
        _write_key(paths.ca_key, loaded[1])
        _write(paths.ca, loaded[0].public_bytes(serialization.Encoding.PEM), 0o644)
        created.append("ca")
    ca, ca_key = loaded
    server = _load(paths.cert, paths.key)
    if server is None or not _fresh(server[0]) or not _serves(server[0], ca, hosts):
        cert, key = issue(ca, ca_key, "konsul dev", hosts=hosts, server=True)
        _write_key(paths.key, key)
        _write(paths.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        created.append("server")
    return DevCertificates(paths.directory, paths.ca, paths.ca_key, paths.cert, paths.key, tuple(created))
