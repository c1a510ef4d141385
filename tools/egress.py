"""Where the shim may send HTTP on a customer's behalf (tool and server URLs, apiRequest tools,
background-sound URLs): http(s) only, and never into its own network unless allowed.

An assistant file or an assistant-request answer names URLs; without a guard they would turn the
shim into a proxy into the network it runs in (the cloud metadata service at 169.254.169.254 /
fd00:ec2::254, the database, localhost admin ports). The guard is an httpx transport, so it holds
for every request and every redirect hop of the shared client:

* the scheme must be http or https;
* with ``SHIM_TOOL_URL_ALLOW`` unset, any host is allowed whose addresses are all public
  (``ipaddress.is_global``): loopback, private (RFC 1918, fc00::/7), link-local (169.254/16,
  fe80::/10), shared (100.64/10), unspecified, multicast and reserved addresses are refused;
* ``SHIM_TOOL_URL_ALLOW`` is a comma-separated allow-list; when set, a URL must match one entry.
  An entry is a URL prefix (``https://tools.internal:8443/vapi/``), a host name
  (``tools.internal``), a wildcard (``*.corp.example``), an IP address (``127.0.0.1``) or a CIDR
  block (``10.20.0.0/16``). The word ``public`` is the default rule (any host whose addresses are
  all public), so ``public,10.20.0.0/16`` adds one internal range to the default. A URL matched by
  a host, URL or IP entry may resolve to any address; a CIDR entry matches the resolved address.

Addresses are checked where the connection is made (an httpcore network backend): the host is
resolved once, every address is checked, and the connection goes to a checked address, so a DNS
answer that changes between check and connect (rebinding) cannot slip through. TLS still
verifies the certificate against the host name.

The operator's own endpoints (``OPENAI_BASE_URL`` for the post-call analysis) are trusted origins
and need no entry.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

__all__ = ["EgressPolicy", "EgressRefused", "guarded_client", "parse_allow_list"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

class EgressRefused(httpx.ConnectError):
    """A URL the guard refuses; the message names the URL's host and why, never its query."""


@dataclass(frozen=True)
class EgressPolicy:
    """The parsed SHIM_TOOL_URL_ALLOW (empty = the default rule: public addresses only)."""

    prefixes: tuple[str, ...] = ()  # URL prefixes (lower-cased scheme and host)
    hosts: tuple[str, ...] = ()  # host names and wildcards (lower case)
    networks: tuple[IPNetwork, ...] = ()  # CIDR blocks (a single IP is a /32 or /128)
    public: bool = True  # the default rule applies (unset list, or the `public` entry)
    trusted_origins: tuple[str, ...] = field(default=())  # operator endpoints: scheme://host:port

    def url_rule(self, url: httpx.URL) -> tuple[bool, bool]:
        """(listed, any_address): whether the URL may be requested at all before resolution, and
        whether its addresses are exempt from the public-address rule."""
        scheme = url.scheme.lower()
        if scheme not in ("http", "https"):
            raise EgressRefused(f"{scheme}:// URL refused: tool and server URLs must be http or https")
        host = (url.host or "").lower().rstrip(".")
        origin = f"{scheme}://{host}:{url.port or (443 if scheme == 'https' else 80)}"
        if origin in self.trusted_origins:
            return True, True
        text = f"{scheme}://{url.netloc.decode('ascii', 'replace').lower()}{url.path}"
        if any(text.startswith(prefix) for prefix in self.prefixes):
            return True, True
        if any(host == pattern or fnmatchcase(host, pattern) for pattern in self.hosts):
            return True, True
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None and any(literal in net for net in self.networks):
            return True, True
        return self.public or bool(self.networks), False

    def address_allowed(self, address: IPAddress) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in net for net in self.networks):
            return True
        return self.public and address.is_global and not address.is_multicast


def parse_allow_list(raw: str, *, trusted_urls: Iterable[str] = ()) -> EgressPolicy:
    """SHIM_TOOL_URL_ALLOW -> EgressPolicy; ValueError naming the bad entry."""
    prefixes: list[str] = []
    hosts: list[str] = []
    networks: list[IPNetwork] = []
    public = not raw.strip()
    for entry in (e.strip() for e in raw.split(",")):
        if not entry:
            continue
        if entry.lower() == "public":
            public = True
        elif "://" in entry:
            parts = urlsplit(entry)
            if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
                raise ValueError(f"SHIM_TOOL_URL_ALLOW entry {entry!r}: expected an http(s):// URL prefix")
            prefixes.append(f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path}")
        else:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            name = entry.lower().rstrip(".")
            if not name or any(c in name for c in "/:@ ") or not all(part for part in name.split(".")):
                raise ValueError(
                    f"SHIM_TOOL_URL_ALLOW entry {entry!r}: expected a URL prefix, host name, *.wildcard, IP or CIDR")
            hosts.append(name)
    trusted = []
    for url in trusted_urls:
        parts = urlsplit(url)
        if parts.scheme in ("http", "https") and parts.hostname:
            trusted.append(f"{parts.scheme}://{parts.hostname.lower()}:{parts.port or (443 if parts.scheme == 'https' else 80)}")
    return EgressPolicy(tuple(prefixes), tuple(hosts), tuple(networks), public, tuple(trusted))


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves once, checks every address, connects to a checked one (no rebinding window)."""

    def __init__(self, policy: EgressPolicy, inner: httpcore.AsyncNetworkBackend, *, check_addresses: bool) -> None:
        self._policy = policy
        self._inner = inner
        self._check = check_addresses

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
        except (OSError, TimeoutError) as exc:
            raise httpcore.ConnectError(f"{host}: cannot resolve ({exc})") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        allowed = [a for a in addresses if not self._check or self._policy.address_allowed(ipaddress.ip_address(a.split("%")[0]))]
        if not allowed:
            raise httpcore.ConnectError(
                f"{host} resolves to {', '.join(addresses[:3])}: not a public address, refused "
                "(allow it with SHIM_TOOL_URL_ALLOW)")
        last: Exception | None = None
        for address in allowed:
            try:
                return await self._inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                                     socket_options=socket_options)
            except httpcore.ConnectError as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None):
        raise httpcore.ConnectError("unix sockets are not reachable from tool URLs")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def _transport(policy: EgressPolicy, *, check_addresses: bool) -> httpx.AsyncHTTPTransport:
    transport = httpx.AsyncHTTPTransport()
    # httpx does not expose httpcore's network_backend: its pool is replaced by one built the way
    # httpx builds it (its default TLS context and limits) plus the guard. tests/test_egress.py
    # fails if a future httpx stops routing through `_pool`.
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(), max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
        http1=True, http2=False,
        network_backend=_GuardedBackend(policy, httpcore.AnyIOBackend(), check_addresses=check_addresses),
    )
    return transport


class _GuardedTransport(httpx.AsyncBaseTransport):
    """Checks each request (and so each redirect hop); URLs the allow-list names go through a
    pool of their own, so a connection made to an allowed private address is never reused for a
    request that is only allowed to reach public ones."""

    def __init__(self, policy: EgressPolicy) -> None:
        self._policy = policy
        self._checked = _transport(policy, check_addresses=True)
        self._listed = _transport(policy, check_addresses=False)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        allowed, any_address = self._policy.url_rule(request.url)
        if not allowed:
            raise EgressRefused(f"{request.url.scheme}://{request.url.host}: not in SHIM_TOOL_URL_ALLOW", request=request)
        transport = self._listed if any_address else self._checked
        return await transport.handle_async_request(request)

    async def aclose(self) -> None:
        await self._checked.aclose()
        await self._listed.aclose()


def guarded_client(policy: EgressPolicy, **kwargs: Any) -> httpx.AsyncClient:
    """An httpx client whose every request and redirect hop passes the egress policy."""
    return httpx.AsyncClient(transport=_GuardedTransport(policy), **kwargs)
