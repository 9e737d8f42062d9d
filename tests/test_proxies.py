"""Which proxy an outbound call takes, as curl reads the environment, and the per-endpoint setting over it."""

from __future__ import annotations

import base64

import pytest

from first_jupyter.transport.proxies import (
    DEFAULT_PORT,
    Proxy,
    ProxyError,
    bypassed,
    choose,
    from_environment,
    parse_proxy,
)

SITE = {"HTTPS_PROXY": "http://proxy.site.org:3128", "HTTP_PROXY": "http://plain.site.org:8080"}


def test_each_scheme_has_its_variable_and_all_proxy_is_the_fallback():
    assert from_environment("https", "api.example.org", 443, SITE) == Proxy("proxy.site.org", 3128)
    assert from_environment("http", "api.example.org", 80, SITE) == Proxy("plain.site.org", 8080)
    assert from_environment("https", "x.org", 443, {"ALL_PROXY": "http://all:1"}) == Proxy("all", 1)
    assert from_environment("https", "x.org", 443, {"HTTP_PROXY": "http://plain:1"}) is None
    assert from_environment("https", "x.org", 443, {}) is None


def test_lower_case_wins_over_upper_case_as_in_curl():
    env = {"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:2", "no_proxy": "", "NO_PROXY": "x.org"}
    assert from_environment("https", "y.org", 443, env) == Proxy("lower", 1)
    assert from_environment("https", "x.org", 443, env) is None  # an empty no_proxy counts as unset: NO_PROXY read
    assert from_environment("https", "y.org", 443, {"HTTPS_PROXY": "http://upper:2"}) == Proxy("upper", 2)


@pytest.mark.parametrize(("no_proxy", "host", "port", "exempt"), [
    ("*", "anything.org", 443, True),
    ("example.org", "example.org", 443, True),
    ("example.org", "api.example.org", 443, True),
    (".example.org", "api.example.org", 443, True),
    (".example.org", "example.org", 443, True),
    ("example.org", "badexample.org", 443, False),
    ("EXAMPLE.org", "Api.Example.ORG.", 443, True),
    ("localhost", "127.0.0.1", 80, False),  # no implicit exceptions: loopback is exempt only when listed
    ("127.0.0.1", "127.0.0.1", 80, True),
    ("10.0.0.0/8", "10.20.30.40", 80, True),
    ("10.0.0.0/8", "11.0.0.1", 80, False),
    ("10.0.0.0/8", "ten.example.org", 80, False),
    ("::1", "::1", 80, True),
    ("[::1]", "[::1]", 80, True),
    ("fd00::/8", "fd12::5", 80, True),
    ("example.org:8443", "example.org", 8443, True),
    ("example.org:8443", "example.org", 443, False),
    ("[::1]:8080", "::1", 8080, True),
    ("[::1]:8080", "::1", 8081, False),
    ("10.1.2.3:80", "10.1.2.3", 80, True),
    ("a.org, b.org  c.org", "c.org", 80, True),
    ("a.org,,", "b.org", 80, False),
    ("example.org:notaport", "example.org", 80, False),
    ("300.1.1.1/8", "10.0.0.1", 80, False),
])
def test_no_proxy_entries_read_as_curl_reads_them(no_proxy, host, port, exempt):
    assert bypassed(host, port, no_proxy) is exempt


def test_no_proxy_exempts_only_what_it_lists():
    env = {**SITE, "NO_PROXY": "localhost,.cluster.local"}
    assert from_environment("https", "node7.cluster.local", 443, env) is None
    assert from_environment("https", "inference-api.alcf.anl.gov", 443, env) == Proxy("proxy.site.org", 3128)


def test_credentials_in_the_url_become_a_basic_authorization_and_are_never_shown():
    proxy = parse_proxy("http://ada%40lab:p%3Ass@proxy.site.org:3128", "$HTTPS_PROXY")
    assert proxy.authorization == "Basic " + base64.b64encode(b"ada@lab:p:ss").decode()
    assert proxy.header_lines() == f"Proxy-Authorization: {proxy.authorization}\r\n".encode()
    assert proxy.display == "http://proxy.site.org:3128"
    assert "p:ss" not in repr(proxy)
    assert "ada" not in repr(proxy)
    assert parse_proxy("proxy.site.org", "x") == Proxy("proxy.site.org", DEFAULT_PORT)  # curl's default port
    assert parse_proxy("[::1]:3128", "x").display == "http://[::1]:3128"


@pytest.mark.parametrize(("text", "says"), [
    ("socks5://u:secret@h:1080", "only http://"),
    ("https://h:443", "only http://"),
    ("http://h:port", "not a number"),
    ("http://:3128", "names no host"),
])
def test_an_unusable_proxy_says_where_it_came_from_and_hides_its_password(text, says):
    with pytest.raises(ProxyError) as raised:
        parse_proxy(text, "$HTTPS_PROXY")
    assert says in str(raised.value)
    assert "$HTTPS_PROXY" in str(raised.value)
    assert "secret" not in str(raised.value)


def test_an_endpoint_setting_overrides_the_environment_no_proxy_included():
    env = {**SITE, "NO_PROXY": "example.org"}
    assert choose(None, "https", "example.org", 443, source="p", environ=env) is None
    assert choose("http://own:9", "https", "example.org", 443, source="p", environ=env) == Proxy("own", 9)
    assert choose("none", "https", "elsewhere.org", 443, source="p", environ=env) is None
    assert choose("NONE", "https", "elsewhere.org", 443, source="p", environ=env) is None
