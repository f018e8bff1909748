"""Flags and their environment variables, shared by the `konsul` commands.

Every flag can also come from an environment variable, ``KONSUL_`` plus the
flag's name in capitals (``--http-addr`` -> ``KONSUL_HTTP_ADDR``). The helpers
that turn flag values into agent configuration (sizes, on|off, limits, TLS,
access control) live here too, so that `konsul edge`, `konsul hub` and
`konsul dev` read them one way. Only the standard library is imported at
import time: ``konsul --help`` starts fast.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from konsul.protocols.admission import NetworkLimits

DEFAULT_HTTP_ADDR = "127.0.0.1:8500"
DEFAULT_MQTT_ADDR = "127.0.0.1:1883"
DEFAULT_COAP_ADDR = "127.0.0.1:5683"
DEFAULT_HUB_ADDR = "127.0.0.1:8700"
DEFAULT_DNS_ADDR = "127.0.0.1:8600"
DEFAULT_MQTTS_ADDR = "127.0.0.1:8883"


def env_default(flag: str, default: str | None = None) -> str | None:
    return os.environ.get("KONSUL_" + flag.lstrip("-").replace("-", "_").upper(), default)


def add_flag(parser: argparse.ArgumentParser, flag: str, help: str, default: str | None = None, **kwargs) -> None:
    """Add ``flag`` with its environment variable named in the help."""
    env = "KONSUL_" + flag.lstrip("-").replace("-", "_").upper()
    value = env_default(flag, default)
    shown = f" (env {env}; default {default})" if default is not None else f" (env {env})"
    parser.add_argument(flag, default=value, help=help + shown, **kwargs)


def env_bool(flag: str) -> bool:
    return (env_default(flag, "") or "").lower() in ("1", "true", "yes", "on")


def add_limit_flags(parser: argparse.ArgumentParser, role: str) -> None:
    """A flag for each bound in ``NetworkLimits`` that applies to ``role`` (docs/operations.md)."""
    import dataclasses

    from konsul.protocols.admission import NetworkLimits

    group = parser.add_argument_group("limits", "bounds on what peers may hold or send (docs/operations.md)")
    for limit in dataclasses.fields(NetworkLimits):
        if role in limit.metadata["roles"]:
            add_flag(group, limit.metadata["flag"], limit.metadata["help"], str(limit.default),
                     type=type(limit.default), dest=f"limit_{limit.name}",
                     metavar="SECONDS" if isinstance(limit.default, float) else "N")


def add_security_flags(parser: argparse.ArgumentParser) -> None:
    """Access control and the audit log (docs/acl.md), for `konsul edge` and `konsul hub`."""
    group = parser.add_argument_group("access control and audit (docs/acl.md)")
    add_flag(group, "--acl", "'on': every request needs a token its policies allow; 'off' lets anyone who "
             "reaches a port read, write and delete everything (a closed test bench only)", "on",
             metavar="on|off")
    add_flag(group, "--acl-initial-management", "a management token's secret (a UUID) made at start if missing, "
             "instead of calling bootstrap (Consul's initial_management; keep it out of shell history)", "",
             metavar="UUID")
    add_flag(group, "--audit-log", "where every write and refusal is logged as JSON lines: a file, '-' for "
             "stdout, 'off' for nowhere; empty means <data-dir>/audit.log", "", metavar="PATH")
    add_flag(group, "--audit-max-bytes", "size at which the audit log file is rotated (bytes, or e.g. 64MiB)", "64MiB",
             metavar="SIZE")
    add_flag(group, "--audit-keep", "rotated audit log files kept (audit.log.1 newest); 0 keeps none", "5", type=int,
             metavar="N")


def add_tls_flags(parser: argparse.ArgumentParser, role: str) -> None:
    """TLS for the listeners and, at an edge, the sync link and its site credential (docs/security.md)."""
    group = parser.add_argument_group("TLS and site credentials (docs/security.md)")
    add_flag(group, "--tls-cert", "PEM certificate (chain) to serve HTTPS" + (" and MQTT over TLS" if role == "edge" else "")
             + " with; reloaded on SIGHUP", "", metavar="PATH")
    add_flag(group, "--tls-key", "PEM private key of --tls-cert", "", metavar="PATH")
    add_flag(group, "--tls-ca", "PEM CA bundle that signs clients' certificates", "", metavar="PATH")
    add_flag(group, "--tls-verify-client", "'on': every TLS client must present a certificate --tls-ca signed", "off",
             metavar="on|off")
    if role != "edge":
        return
    add_flag(group, "--mqtts-addr", "MQTT over TLS address; default 127.0.0.1:8883 when --tls-cert is given, "
             "'off' for none", "", metavar="HOST:PORT")
    add_flag(group, "--hub-ca", "the only CA the hub's certificate may chain to (pinning); empty trusts the "
             "system's CAs", "", metavar="PATH")
    add_flag(group, "--site-token", "this site's join token at the hub (`konsul sites add SITE` prints it)", "",
             metavar="SECRET")
    add_flag(group, "--site-cert", "a client certificate for this site (mutual TLS with the hub), instead of "
             "--site-token", "", metavar="PATH")
    add_flag(group, "--site-key", "PEM private key of --site-cert", "", metavar="PATH")


def tls_config(args: argparse.Namespace, role: str) -> dict:
    """The TLS fields of EdgeConfig / HubConfig from the parsed flags."""
    from konsul.protocols.tls import TlsFiles

    verify = str(args.tls_verify_client).strip().lower()
    if verify not in ("on", "off", "true", "false", "1", "0", "yes", "no"):
        raise SystemExit(f"konsul: --tls-verify-client must be on or off, not {args.tls_verify_client!r}")
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise SystemExit("konsul: --tls-cert and --tls-key go together")
        tls = TlsFiles(
            Path(args.tls_cert), Path(args.tls_key), Path(args.tls_ca) if args.tls_ca else None,
            verify in ("on", "true", "1", "yes"),
        )
    elif args.tls_ca or verify in ("on", "true", "1", "yes"):
        raise SystemExit("konsul: --tls-ca and --tls-verify-client need --tls-cert and --tls-key")
    config: dict = {"tls": tls}
    if role == "edge":
        mqtts = (args.mqtts_addr or "").strip()
        if mqtts.lower() == "off":
            mqtts = ""
        elif not mqtts and tls is not None:
            mqtts = DEFAULT_MQTTS_ADDR
        elif mqtts and tls is None:
            raise SystemExit("konsul: --mqtts-addr needs --tls-cert and --tls-key")
        if bool(args.site_cert) != bool(args.site_key):
            raise SystemExit("konsul: --site-cert and --site-key go together")
        config.update(
            mqtts_addr=mqtts, hub_ca=args.hub_ca, site_token=(args.site_token or "").strip(),
            site_cert=args.site_cert, site_key=args.site_key,
        )
    return config


def security_config(args: argparse.Namespace) -> dict:
    """The ``acl`` and ``audit_*`` fields of EdgeConfig / HubConfig from the parsed flags."""
    acl = on_off(args.acl, "--acl")
    max_bytes = parse_size(args.audit_max_bytes, "--audit-max-bytes")
    if max_bytes < 1 or args.audit_keep < 0:
        raise SystemExit("konsul: --audit-max-bytes must be positive and --audit-keep not negative")
    return {
        "acl": acl,
        "acl_initial_management": check_initial_management(args.acl_initial_management),
        "audit_log": args.audit_log,
        "audit_max_bytes": max_bytes,
        "audit_keep": args.audit_keep,
    }


def check_initial_management(secret: str) -> str:
    from konsul.sync.acl import check_uuid
    from konsul.sync.errors import InvalidArgument

    secret = (secret or "").strip()
    try:
        return check_uuid(secret, "--acl-initial-management") if secret else ""
    except InvalidArgument as error:
        raise SystemExit(f"konsul: {error}") from None


def network_limits(args: argparse.Namespace) -> NetworkLimits:
    """The ``NetworkLimits`` the parsed flags give; a usage error for a bound below zero."""
    import dataclasses

    from konsul.protocols.admission import NetworkLimits

    values = {}
    for limit in dataclasses.fields(NetworkLimits):
        value = getattr(args, f"limit_{limit.name}", None)
        if value is None:
            continue
        if value < 0:
            raise SystemExit(f"konsul: {limit.metadata['flag']} must not be negative, got {value}")
        values[limit.name] = value
    return NetworkLimits(**values)


def on_off(value: str, flag: str) -> bool:
    """An on|off flag's value; a usage error for anything else."""
    text = str(value).strip().lower()
    if text not in ("on", "off", "true", "false", "1", "0", "yes", "no"):
        raise SystemExit(f"konsul: {flag} must be on or off, not {value!r}")
    return text in ("on", "true", "1", "yes")


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str, flag: str) -> int:
    """Bytes from ``65536``, ``64MiB``, ``1GB``...; a usage error otherwise."""
    import re

    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    unit = _SIZE_UNITS.get(match.group(2).lower()) if match else None
    if unit is None:
        raise SystemExit(f"konsul: {flag} must be a size like 65536, 64MiB or 1GB, not {text!r}")
    return int(match.group(1)) * unit

