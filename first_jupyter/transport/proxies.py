"""Which HTTP forward proxy an outbound call goes through, read as curl reads it.

HPC login and compute nodes commonly reach the outside only through a site proxy, named in ``HTTP_PROXY`` /
``HTTPS_PROXY`` with ``NO_PROXY`` listing local names. Tools disagree on the details (Python's urllib ignores
CIDR entries, requests adds its own exceptions), so the gateway follows one well-known reading, curl's:
lower case before upper case, ``ALL_PROXY`` as the fallback, and ``NO_PROXY`` entries that are ``*``, host names
matching themselves and their subdomains, IP addresses, CIDR ranges, each optionally with a port, and nothing
exempt unless it is listed. The gateway's own loopback hops never ask here: they connect directly by design.

Standard library only: the node-side stream callback (``first_jupyter.remote.inference``) uses it too.
"""

from __future__ import annotations

import base64
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
"""Read in lower and upper case alike."""

NO_PROXY_SETTING = "none"
"""An endpoint's ``proxy:`` value that means: connect directly, whatever the environment says."""


DEFAULT_PORT = 1080
"""A proxy URL without a port means this one, as in curl."""


class ProxyError(ValueError):
    """A proxy setting that cannot be used; the message names where it came from and what to write instead."""


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP forward proxy: CONNECT tunnels for https, absolute-form requests for http."""

    host: str
    port: int
    authorization: str | None = field(default=None, repr=False)
    """The ``Proxy-Authorization`` value, from credentials in the proxy's URL (never shown)."""

    @property
    def display(self) -> str:
        """The proxy as errors and logs name it: without its credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def header_lines(self) -> bytes:
        """The header lines every request to the proxy carries (CRLF-terminated), empty without credentials."""
        if self.authorization is None:
            return b""
        return f"Proxy-Authorization: {self.authorization}\r\n".encode("latin-1")


def parse_proxy(text: str, source: str) -> Proxy:
    """A proxy URL (``http://user:pass@host:port``, or ``host:port`` as curl takes it) to a Proxy.

    ``source`` names where the text came from (an environment variable, a config key), for the error.
    """
    value = text.strip()
    parsed = urlsplit(value if "://" in value else f"http://{value}")
    if parsed.scheme != "http":
        raise ProxyError(f"{source} is {_without_credentials(value)!r}: only http:// forward proxies are supported "
                         f"(https targets still go through them, tunnelled with CONNECT)")
    try:
        port = parsed.port  # a port that is not a number raises here
    except ValueError:
        raise ProxyError(f"{source} is {_without_credentials(value)!r}: its port is not a number") from None
    if not parsed.hostname:
        raise ProxyError(f"{source} is {_without_credentials(value)!r}: it names no host; write "
                         f"http://proxy.example.org:3128")
    authorization = None
    if parsed.username is not None:
        pair = f"{unquote(parsed.username)}:{unquote(parsed.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    return Proxy(parsed.hostname, port or DEFAULT_PORT, authorization)


def _without_credentials(text: str) -> str:
    scheme, sep, rest = text.rpartition("://")
    host = rest.rpartition("@")[2]
    return f"{scheme}{sep}{host}"


def _variable(environ: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """The value of a proxy variable and the spelling it was found under: lower case first, as curl does."""
    for spelling in (name.lower(), name.upper()):
        value = environ.get(spelling, "").strip()
        if value:
            return spelling, value
    return None


def _host_key(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


def _matches(entry: str, host: str, port: int) -> bool:
    """One ``NO_PROXY`` entry against a target host (lower case, no brackets) and port."""
    if entry == "*":
        return True
    name, want_port = entry, None
    if entry.startswith("["):  # [v6]:port
        inside, _, after = entry[1:].partition("]")
        name, want_port = inside, after[1:] if after.startswith(":") else None
    elif entry.count(":") == 1:  # host:port or v4:port (a bare v6 address has several colons)
        name, _, want_port = entry.partition(":")
    if want_port is not None and (not want_port.isascii() or not want_port.isdigit() or int(want_port) != port):
        return False
    name = _host_key(name)
    try:
        target = ipaddress.ip_address(host)
    except ValueError:
        target = None
    if "/" in name:
        try:
            return target is not None and target in ipaddress.ip_network(name, strict=False)
        except ValueError:
            return False
    if target is not None:
        try:
            return ipaddress.ip_address(name) == target
        except ValueError:
            return False
    name = name.lstrip(".")
    return bool(name) and (host == name or host.endswith("." + name))


def bypassed(host: str, port: int, no_proxy: str) -> bool:
    """Whether ``NO_PROXY``'s value exempts this host and port (entries separated by commas or spaces)."""
    key = _host_key(host)
    return any(_matches(entry, key, port) for entry in no_proxy.replace(",", " ").split())


def from_environment(scheme: str, host: str, port: int, environ: Mapping[str, str] | None = None) -> Proxy | None:
    """The proxy the environment names for this target, or None to connect directly."""
    env = os.environ if environ is None else environ
    found = _variable(env, f"{scheme}_proxy") or _variable(env, "all_proxy")
    if found is None:
        return None
    exempt = _variable(env, "no_proxy")
    if exempt is not None and bypassed(host, port, exempt[1]):
        return None
    return parse_proxy(found[1], f"${found[0]}")


def snapshot(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The proxy variables as they are now: a gateway keeps what it started with, whatever is added later to
    the process's environment for others (the loopback names the Jupyter server adds to ``NO_PROXY`` for its
    kernels, say)."""
    env = os.environ if environ is None else environ
    return {name: env[name] for base in VARIABLES for name in (base, base.upper()) if name in env}


def choose(setting: str | None, scheme: str, host: str, port: int, *, source: str,
           environ: Mapping[str, str] | None = None) -> Proxy | None:
    """The proxy for one target: an endpoint's own ``proxy:`` setting (a URL, or ``none``) overrides the
    environment entirely, ``NO_PROXY`` included; without one, the environment decides."""
    if setting is None:
        return from_environment(scheme, host, port, environ)
    if setting.strip().lower() == NO_PROXY_SETTING:
        return None
    return parse_proxy(setting, source)


def is_loopback(host: str) -> bool:
    """Whether a host is this machine by name: ``localhost`` (and ``*.localhost``), 127.0.0.0/8 or ::1.

    The gateway's own hops to such a host (the nodes' callback to a loopback gateway, a kernel's client to
    ``FIRST_GATEWAY_URL``) never go through a proxy, whatever the environment says: a site proxy cannot reach this
    machine's loopback. Names are not resolved: what resolves to loopback elsewhere is ``NO_PROXY``'s business."""
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback
