"""TLS client contexts: the system's trust store plus what a site adds, and per-endpoint CAs and client certificates.

Institutions run their own certificate authorities and point tools at them with ``SSL_CERT_FILE`` /
``SSL_CERT_DIR`` (OpenSSL's variables) or ``REQUESTS_CA_BUNDLE`` (set for requests-based tools, globus-sdk among
them). OpenSSL lets ``SSL_CERT_FILE`` replace the system store rather than add to it, and ignores
``REQUESTS_CA_BUNDLE``; here every source adds to the system store, so a site CA never costs the public ones.

A context is costly to build (it parses the whole store), so one is built per distinct setting and reused by
every connection with that setting.

Standard library only: the node-side stream callback (``first_jupyter.remote.inference``) uses it too.
"""

from __future__ import annotations

import functools
import logging
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

TRUST_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE")

log = logging.getLogger(__name__)


class TlsSettingError(ValueError):
    """A TLS setting that cannot be used (a file that is missing or not PEM); the message names the setting."""


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """One endpoint's TLS options; the defaults are the environment's trust and full verification."""

    ca_bundle: str | None = None
    verify: bool = True
    client_cert: str | None = None
    client_key: str | None = None
    source: str = field(default="tls", compare=False)
    """Where the settings come from (a config key path), for errors; not part of what makes two settings one."""


def _load_locations(context: ssl.SSLContext, path: str, setting: str) -> None:
    try:
        if os.path.isdir(path):
            context.load_verify_locations(capath=path)
        else:
            context.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise TlsSettingError(f"{setting} is {path!r}, which cannot be read as PEM certificates "
                              f"({getattr(exc, 'strerror', None) or exc}); point it at the CA bundle file") from None


def _trust(context: ssl.SSLContext, environ: Mapping[str, str]) -> None:
    """The system store, then each site variable that is set, in addition."""
    defaults = ssl.get_default_verify_paths()
    for cafile, capath in ((defaults.openssl_cafile, None), (None, defaults.openssl_capath)):
        try:
            context.load_verify_locations(cafile=cafile, capath=capath)
        except (OSError, ssl.SSLError):
            continue  # a system without that part of the store
    for name in TRUST_VARIABLES:
        value = environ.get(name, "").strip()
        if not value:
            continue
        try:
            _load_locations(context, value, f"${name}")
        except TlsSettingError as exc:  # a stale variable must not stop the gateway: say so, and go on
            log.warning("%s; ignoring it", exc)


@functools.lru_cache(maxsize=64)
def _context(settings: TlsSettings, trust_env: tuple[tuple[str, str], ...]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.verify:
        _trust(context, dict(trust_env))
        if settings.ca_bundle:
            _load_locations(context, os.path.expanduser(settings.ca_bundle), f"{settings.source}.ca_bundle")
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if settings.client_cert:
        try:
            context.load_cert_chain(os.path.expanduser(settings.client_cert),
                                    os.path.expanduser(settings.client_key) if settings.client_key else None)
        except (OSError, ssl.SSLError) as exc:
            raise TlsSettingError(
                f"{settings.source}.client_cert ({settings.client_cert}) and client_key cannot be loaded "
                f"({getattr(exc, 'strerror', None) or exc}); give a PEM certificate and its unencrypted key") from None
    return context


def trust_snapshot(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The trust variables that are set, as they are now."""
    env = os.environ if environ is None else environ
    return {name: env[name] for name in TRUST_VARIABLES if name in env}


def client_context(settings: TlsSettings | None = None, environ: Mapping[str, str] | None = None) -> ssl.SSLContext:
    """The shared context for these settings and the environment's trust variables as they are now."""
    env = os.environ if environ is None else environ
    trust_env = tuple((name, env.get(name, "")) for name in TRUST_VARIABLES)
    return _context(settings or TlsSettings(), trust_env)


def describe_tls_failure(exc: ssl.SSLError, host: str) -> str:
    """What failed in a TLS exchange with ``host``, and the setting that fixes it."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or exc.reason or str(exc)
        if "hostname" in why.lower() or "ip address mismatch" in why.lower():
            return (f"the TLS certificate of {host} is not valid for that name ({why}); check the host in "
                    f"base_url")
        return (f"the TLS certificate of {host} was not accepted ({why}). If your site uses its own certificate "
                f"authority, give its CA certificate in this endpoint's tls.ca_bundle, or in SSL_CERT_FILE or "
                f"REQUESTS_CA_BUNDLE")
    reason = (exc.reason or str(exc)).upper()
    if "CERTIFICATE_REQUIRED" in reason:
        return (f"{host} demands a client certificate (mutual TLS) that was not given; set this endpoint's "
                f"tls.client_cert and tls.client_key")
    if "HANDSHAKE_FAILURE" in reason:
        return (f"{host} ended the TLS handshake ({exc.reason}): it may demand a client certificate (set "
                f"tls.client_cert and tls.client_key) or share no TLS version or cipher with this gateway")
    if "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason or "CERTIFICATE_UNKNOWN" in reason:
        return (f"{host} refused this endpoint's client certificate ({exc.reason}); check tls.client_cert and "
                f"tls.client_key")
    if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason:
        return f"{host} does not speak TLS on that port ({exc.reason}); should base_url start with http://?"
    return f"the TLS exchange with {host} failed ({exc.reason or exc})"
