"""Outbound HTTP to URLs that requests name, and the check that keeps it out of the server's own network.

A URL that comes with a request (a model archive, a checkpoint, a request's own SEND_URL) must not
reach private, loopback or link-local addresses unless ALLOW_PRIVATE_URLS is on. Checking a host name and then
letting the HTTP library resolve it again leaves a gap: a DNS server that answers a public address to the check
and a private one to the connection (DNS rebinding) gets through. So the check is made where the connection
is made. `http_client(guarded=True)` gives an httpx client whose connections resolve their host once, refuse it
when any of its addresses is not public, and connect to an address that was checked; TLS still verifies the
certificate against the host name, and every redirect is a new connection, checked the same way.

`check_public_url` is the same check on its own, for an early, clear refusal before anything runs (a request's
SEND_URL is checked when the request arrives) and for S3 endpoints, whose connections boto3 makes.
`fetch_bytes` reads a small file (an input image) into memory through such a client, capped in bytes.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from .errors import InvalidInputs, StorageError


def check_public_url(url: str, allow_private: bool, what: str) -> None:
    """Refuse `url` when its host resolves to any non-public address, unless `allow_private`."""
    if allow_private:
        return
    host = urlsplit(url).hostname
    if not host:
        raise InvalidInputs(f"{what} {url!r} has no host")
    try:
        addresses = _resolve(host, None)
    except OSError as exc:
        raise StorageError(f"{what} {url!r}: cannot resolve {host}: {exc}") from exc
    _refuse_non_public(addresses, f"{what} {url!r}")


def _resolve(host: str, port: int | None) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _refuse_non_public(addresses: list[str], what: str) -> None:
    """InvalidInputs when any of `addresses` is not public: one bad answer is enough, since which one a connection
    would use is the resolver's choice, not ours."""
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not is_public(ip):
            message = f"{what} resolves to the non-public address {ip}; set ALLOW_PRIVATE_URLS=1 to allow it"
            raise InvalidInputs(message, setting="ALLOW_PRIVATE_URLS")


# The well-known NAT64 prefix (RFC 6052): 64:ff9b::a.b.c.d is a.b.c.d reached through a translator.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A globally reachable unicast address. `is_global` follows IANA's special-purpose registries, so it also
    refuses carrier-grade NAT (100.64.0.0/10, where some clouds keep their metadata service), documentation and
    benchmarking ranges besides the private, loopback, link-local and reserved ones; multicast is refused apart.
    An IPv6 address that carries an IPv4 one (IPv4-mapped, 6to4, NAT64) is judged by the IPv4 address, the one
    a connection ends up at."""
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        return is_public(embedded)
    return ip.is_global and not ip.is_multicast


def _embedded_ipv4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.ipv4_mapped or ip.sixtofour


class _PublicOnlyBackend(httpcore.SyncBackend):
    """httpcore's socket backend, resolving each host itself and connecting only to public addresses."""

    def __init__(self, what: str) -> None:
        self.what = what

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        try:
            addresses = _resolve(host, port)
        except OSError as exc:  # as httpcore reports it: a connection error, which callers may retry
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        _refuse_non_public(addresses, f"{self.what} host {host!r}")
        failure: Exception | None = None
        for address in addresses:
            try:  # an IP literal: the socket layer connects to it without resolving anything again
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None  # getaddrinfo answers at least one address or raises
        raise failure


class _PublicOnlyTransport(httpx.HTTPTransport):
    def __init__(self, what: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # httpx builds its connection pool without a way to pass a network backend: build the same pool with ours.
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            keepalive_expiry=5.0,  # as httpx's own pool
            network_backend=_PublicOnlyBackend(what),
        )


def http_client(guarded: bool, what: str, **kwargs: Any) -> httpx.Client:
    """An httpx client; with `guarded`, every connection it makes goes to a public address (see above).
    A guarded client ignores proxy settings from the environment: through a proxy, the proxy resolves names."""
    if not guarded:
        return httpx.Client(**kwargs)
    return httpx.Client(transport=_PublicOnlyTransport(what), **kwargs)


def fetch_bytes(url: str, *, guarded: bool, what: str, max_bytes: int, timeout_s: float) -> bytes:
    """GET `url` into memory, following redirects (each one checked when `guarded`). InvalidInputs naming `what`
    when it cannot be fetched, does not answer 200, or is larger than `max_bytes`."""
    check_public_url(url, not guarded, what)
    try:
        with (
            http_client(guarded, what, timeout=timeout_s, follow_redirects=True) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise InvalidInputs(f"{what} {url} answered HTTP {response.status_code}")
            length = response.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise InvalidInputs(f"{what} {url} is {length} bytes, more than the {max_bytes} allowed")
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > max_bytes:
                    raise InvalidInputs(f"{what} {url} is larger than the {max_bytes} bytes allowed")
            return bytes(data)
    except httpx.HTTPError as exc:
        raise InvalidInputs(f"{what} {url} could not be fetched: {type(exc).__name__}: {exc}") from None
    except StorageError as exc:  # the name does not resolve: the request's mistake here
        raise InvalidInputs(exc.message) from None
