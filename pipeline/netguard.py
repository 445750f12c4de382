"""Where a vendor-supplied URL may take us: result downloads and presigned uploads.

A vendor hands us URLs (result images, Perfect Corp's presigned upload target) and
redirects; fetching any of them blindly lets a hostile or compromised vendor make
this machine reach its own loopback services, the private network or a cloud
metadata endpoint. :class:`UrlGuard` decides, per URL:

- only ``http`` and ``https``; no credentials in the URL;
- the host is resolved here (``loop.getaddrinfo``) and *every* address it resolves to
  is checked: loopback, private, link-local, unspecified, multicast, reserved or any
  other non-global address is refused, except for the exact origin (scheme, host,
  port) of the provider's own ``base_url`` (that is how the emulator on 127.0.0.1
  works) and the ``host:port`` entries of ``network.allow_result_hosts``;
- link-local and metadata addresses (:data:`ALWAYS_REFUSED`) are refused always,
  allowed host or not; IPv4 addresses embedded in IPv6 ones (mapped, 6to4, Teredo,
  NAT64) are checked as what they embed.

:func:`guarded_get` follows redirects by hand (``allow_redirects=False``), checking
every hop, at most :data:`MAX_REDIRECTS` of them. The connection is pinned to the
checked addresses: each request goes through a private session whose resolver
(:class:`PinnedResolver`) answers only with the addresses :class:`UrlGuard` checked,
so a DNS answer that changes between the check and the connect (DNS rebinding) is
never used. IP-literal hosts skip resolution entirely (aiohttp does not resolve them).

A refusal is :class:`~pipeline.errors.PermanentError` with code
:data:`RESULT_URL_REFUSED`; its message names the host, never the query string
(presigned URLs carry their signature there). No API key travels on any of these
requests: the private session has no default headers and callers add none.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Final

import aiohttp
import anyio
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from pipeline.errors import PermanentError

__all__ = [
    "ALWAYS_REFUSED",
    "MAX_REDIRECTS",
    "RESULT_URL_REFUSED",
    "AddressRefused",
    "PinnedResolver",
    "Resolve",
    "ResolveError",
    "Target",
    "UrlGuard",
    "address_refusal",
    "guarded_get",
    "guarded_session",
]

RESULT_URL_REFUSED: Final = "RESULT_URL_REFUSED"
MAX_REDIRECTS: Final = 5
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Refused whatever the allow list says: link-local (where cloud metadata services
# live: AWS/GCP/Azure 169.254.169.254, AWS IPv6 fd00:ec2::254) and Alibaba Cloud's
# metadata address (AILab's storage is on Alibaba Cloud).
ALWAYS_REFUSED: Final = (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fd00:ec2::254/128"),
    ipaddress.ip_network("100.100.100.200/32"),
)
_NAT64: Final = ipaddress.ip_network("64:ff9b::/96")

# (host, port) -> the addresses it resolves to.
Resolve = Callable[[str, int], Awaitable[list[str]]]


class AddressRefused(OSError):
    """Raised inside aiohttp's connector when asked for a host nobody checked."""


class ResolveError(OSError):
    """The guard could not resolve a host (DNS failure, no address): never connected."""


def _embedded(ip: IPAddress) -> list[IPAddress]:
    """Every IPv4 address ``ip`` carries (mapped, 6to4, Teredo, NAT64), then ``ip``:
    the embedded address is the one a connection would reach, so it names the reason."""
    out: list[IPAddress] = []
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            out.append(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            out.append(ip.sixtofour)
        if ip.teredo is not None:
            out.extend(ip.teredo)
        if ip in _NAT64:
            out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    out.append(ip)
    return out


def address_refusal(address: str | IPAddress, *, allowed: bool = False) -> str | None:
    """Why a connection to ``address`` is refused (a short phrase), or ``None``.

    ``allowed``: the host is the provider's own origin or on the allow list, so only
    :data:`ALWAYS_REFUSED` applies.
    """
    try:
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    except ValueError:
        return "not an IP address"
    for each in _embedded(ip):
        if any(each in net for net in ALWAYS_REFUSED):
            return "a link-local or cloud-metadata address (always refused)"
    if allowed:
        return None
    for each in _embedded(ip):
        if each.is_loopback:
            return "a loopback address"
        if each.is_unspecified:
            return "an unspecified address"
        if each.is_link_local:
            return "a link-local address"
        if each.is_multicast:
            return "a multicast address"
        if each.is_private:
            return "a private address"
        if each.is_reserved:
            return "a reserved address"
        if not each.is_global:
            return "a non-public address"
    return None


def _parse_host_port(entry: str) -> tuple[str, int] | None:
    host, sep, port = entry.strip().rpartition(":")
    if not sep or not port.isdigit():
        return None
    host = host.strip("[]").lower().rstrip(".")
    return (host, int(port)) if host else None


def _origin(url: URL) -> tuple[str, str, int] | None:
    scheme = (url.scheme or "").lower()
    host = (url.host or "").lower().rstrip(".")
    port = url.port or _DEFAULT_PORTS.get(scheme)
    if not host or port is None:
        return None
    return scheme, host, port


@dataclass(frozen=True)
class Target:
    """A checked URL: where it may connect (``addresses``; empty for an IP literal)."""

    url: URL
    host: str
    port: int
    addresses: tuple[str, ...]


async def _system_resolve(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class UrlGuard:
    """The policy of one provider: its ``base_url`` origin plus the allowed hosts.

    ``resolve`` replaces the system resolver (tests); it must return every address.
    ``connect_seconds`` bounds one resolution.
    """

    def __init__(
        self,
        base_url: str,
        allow_hosts: Iterable[str] = (),
        *,
        vendor: str = "",
        resolve: Resolve | None = None,
        connect_seconds: float = 10.0,
    ) -> None:
        self.vendor = vendor
        try:
            self._base = _origin(URL(base_url))
        except ValueError:
            self._base = None
        self._allowed = {hp for hp in map(_parse_host_port, allow_hosts) if hp is not None}
        self._resolve = resolve or _system_resolve
        self._connect_seconds = connect_seconds

    def refused(self, host: str, why: str) -> PermanentError:
        return PermanentError(
            f"result URL refused: host {host or '?'}: {why}",
            code=RESULT_URL_REFUSED,
            vendor=self.vendor,
        )

    def is_allowed_origin(self, url: URL) -> bool:
        """The provider's own origin, or an allow-listed ``host:port``."""
        origin = _origin(url)
        if origin is None:
            return False
        return origin == self._base or origin[1:] in self._allowed

    async def check(self, url: str | URL) -> Target:
        """Check ``url`` (and resolve its host); raise ``RESULT_URL_REFUSED`` if unsafe.

        Name-resolution failures raise :class:`ResolveError`, a resolution that takes
        longer than ``connect_seconds`` ``TimeoutError`` (transport problems, not
        refusals).
        """
        try:
            parsed = url if isinstance(url, URL) else URL(url, encoded=True)
            scheme = (parsed.scheme or "").lower()
            host = (parsed.host or "").lower().rstrip(".")
            port = parsed.port
        except (ValueError, TypeError):
            raise self.refused("?", "not a valid URL") from None
        if scheme not in _DEFAULT_PORTS:
            raise self.refused(
                host, f"scheme {scheme or 'none'!r} is not allowed (only http, https)"
            )
        if not host:
            raise self.refused(host, "the URL has no host")
        if parsed.user is not None or parsed.password is not None:
            raise self.refused(host, "the URL carries credentials")
        port = port or _DEFAULT_PORTS[scheme]
        allowed = self.is_allowed_origin(parsed)
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            why = address_refusal(literal, allowed=allowed)
            if why is not None:
                raise self.refused(host, f"it is {why}")
            return Target(parsed, host, port, ())
        try:
            with anyio.fail_after(self._connect_seconds):
                addresses = await self._resolve(host, port)
        except TimeoutError:
            raise
        except OSError as exc:
            raise ResolveError(f"{host}: {type(exc).__name__}: {exc}") from exc
        if not addresses:
            raise ResolveError(f"{host}: no address")
        for address in addresses:
            why = address_refusal(address.split("%", 1)[0], allowed=allowed)
            if why is not None:
                raise self.refused(host, f"it resolves to {why} ({address})")
        return Target(parsed, host, port, tuple(dict.fromkeys(addresses)))


class PinnedResolver(AbstractResolver):
    """Answers only with addresses a :class:`UrlGuard` checked (see module doc)."""

    def __init__(self) -> None:
        self._pins: dict[str, tuple[str, ...]] = {}

    MAX_PINS = 1024  # hosts; a shared resolver forgets the oldest beyond this

    def pin(self, target: Target) -> None:
        if target.addresses:
            self._pins.pop(target.host, None)
            self._pins[target.host] = target.addresses
            while len(self._pins) > self.MAX_PINS:
                del self._pins[next(iter(self._pins))]

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = self._pins.get(host.lower().rstrip("."))
        if not addresses:
            raise AddressRefused(f"{host}: not checked")
        out: list[ResolveResult] = []
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            fam = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            if family not in (socket.AF_UNSPEC, fam):
                continue
            out.append(
                ResolveResult(
                    hostname=host,
                    host=str(ip),
                    port=port,
                    family=fam,
                    proto=0,
                    flags=socket.AI_NUMERICHOST,
                )
            )
        if not out:
            raise AddressRefused(f"{host}: no checked address of the wanted family")
        return out

    async def close(self) -> None:
        return None


@asynccontextmanager
async def guarded_session(
    client_timeout: aiohttp.ClientTimeout,
) -> AsyncIterator[tuple[aiohttp.ClientSession, PinnedResolver]]:
    """A private session whose connections go only to pinned addresses.

    No default headers, no cookies kept between hops, no proxy from the environment;
    its connections close with it (nothing is shared with the API session).
    """
    resolver = PinnedResolver()
    connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=client_timeout,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    ) as session:
        yield session, resolver


# The run's shared download session (set by the runner for the run's tasks): one
# pool of pinned connections instead of a new session, connector and TCP handshake per
# result, which profiled at an eighth of a fast async run's client CPU (README
# "Performance"). It answers only with addresses a guard checked for the request being
# made: a pooled connection goes to an address that passed the check when it was made.
SHARED_DOWNLOADS: ContextVar[tuple[aiohttp.ClientSession, PinnedResolver] | None] = ContextVar(
    "SHARED_DOWNLOADS", default=None
)


@asynccontextmanager
async def _download_session(
    client_timeout: aiohttp.ClientTimeout,
) -> AsyncIterator[tuple[aiohttp.ClientSession, PinnedResolver]]:
    shared = SHARED_DOWNLOADS.get()
    if shared is not None:
        yield shared
        return
    async with guarded_session(client_timeout) as private:
        yield private


@asynccontextmanager
async def guarded_get(
    guard: UrlGuard,
    url: str,
    *,
    client_timeout: aiohttp.ClientTimeout,
    headers: Mapping[str, str] | None = None,
    max_redirects: int = MAX_REDIRECTS,
    on_send: Callable[[int], None] | None = None,
) -> AsyncIterator[aiohttp.ClientResponse]:
    """GET ``url``, following at most ``max_redirects`` redirects, each hop checked.

    Yields the final (non-redirect) response; its body is unread. Raises
    ``RESULT_URL_REFUSED`` for an unsafe hop, a redirect without a usable
    ``Location`` or too many redirects, and aiohttp's own errors for the network.
    ``client_timeout`` applies to each hop. ``on_send(hop)`` is called before each
    request actually goes out (hop 0 is the first).
    """
    async with _download_session(client_timeout) as (session, resolver):
        current = url
        for hop in range(max_redirects + 1):
            target = await guard.check(current)
            resolver.pin(target)
            if on_send is not None:
                on_send(hop)
            async with session.get(
                target.url,
                allow_redirects=False,
                headers=dict(headers or {}),
                timeout=client_timeout,
            ) as resp:
                location = resp.headers.get("Location")
                if resp.status not in _REDIRECTS:
                    yield resp
                    return
                if not location:
                    raise guard.refused(target.host, f"HTTP {resp.status} without a Location")
                try:
                    current = str(target.url.join(URL(location.strip(), encoded=True)))
                except (ValueError, TypeError):
                    raise guard.refused(target.host, "a redirect to an invalid URL") from None
        raise guard.refused(target.host, f"more than {max_redirects} redirects (a redirect loop?)")
