"""UrlGuard and PinnedResolver without a network: resolution is injected."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import PermanentError
from pipeline.netguard import (
    AddressRefused,
    PinnedResolver,
    ResolveError,
    Target,
    UrlGuard,
    address_refusal,
)

PUBLIC = "93.184.216.34"


def fake_dns(table: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    async def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    return resolve


DNS = fake_dns(
    {
        "storage.example": [PUBLIC, "2606:2800:220:1:248:1893:25c8:1946"],
        "mixed.example": [PUBLIC, "127.0.0.1"],  # one bad address is enough
        "internal.example": ["10.1.2.3"],
        "meta.example": ["169.254.169.254"],
        "v6meta.example": ["fd00:ec2::254"],
        "lan.example": ["192.168.0.10"],
        "cgnat.example": ["100.64.1.1"],
        "alibaba-meta.example": ["100.100.100.200"],
        "localhost": ["127.0.0.1", "::1"],
        "empty.example": [],
    }
)


def guard(base: str = "http://127.0.0.1:8080", allow: tuple[str, ...] = ()) -> UrlGuard:
    return UrlGuard(base, allow, vendor="ailab", resolve=DNS)


async def refused(url: str, g: UrlGuard | None = None) -> str:
    with pytest.raises(PermanentError) as info:
        await (g or guard()).check(url)
    assert info.value.code == "RESULT_URL_REFUSED"
    assert "SIG" not in info.value.message  # never the query
    return info.value.message


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://storage.example/x.jpg?SIG=1", "scheme 'ftp'"),
        ("file:///etc/passwd", "scheme 'file'"),
        ("data:image/png;base64,AAAA", "scheme 'data'"),
        ("javascript:alert(1)", "scheme 'javascript'"),
        ("gopher://storage.example/", "scheme 'gopher'"),
        ("//storage.example/x.jpg", "scheme 'none'"),
        ("http:///x.jpg", "no host"),
        ("http://user:pw@storage.example/x.jpg?SIG=1", "credentials"),
        ("http://10.0.0.1/x.jpg?SIG=1", "private"),
        ("http://192.168.1.1/", "private"),
        ("http://172.16.5.4/", "private"),
        ("http://127.0.0.1:9/", "loopback"),
        ("http://127.8.9.10:8080/", "loopback"),
        ("http://[::1]:8080/", "loopback"),
        ("http://0.0.0.0:8080/", "unspecified"),
        ("http://[::]:8080/", "unspecified"),
        ("http://224.0.0.1/", "multicast"),
        ("http://240.0.0.1/", "private"),  # Python counts 240/4 as private
        ("http://169.254.169.254/latest/meta-data/", "always refused"),
        ("http://[fe80::1]/", "always refused"),
        ("http://[::ffff:169.254.169.254]/", "always refused"),
        ("http://[::ffff:10.0.0.1]/", "private"),
        ("http://[64:ff9b::a9fe:a9fe]/", "always refused"),  # NAT64 of 169.254.169.254
        ("http://[2002:7f00:1::]/", "loopback"),  # 6to4 of 127.0.0.1
        ("http://internal.example/x?SIG=1", "10.1.2.3"),
        ("http://mixed.example/", "127.0.0.1"),
        ("http://lan.example/", "private"),
        ("http://cgnat.example/", "non-public"),
        ("http://meta.example/", "always refused"),
        ("http://v6meta.example/", "always refused"),
        ("http://alibaba-meta.example/", "always refused"),
        ("http://localhost:8080/", "loopback"),  # the origin is 127.0.0.1, not localhost
        ("http://127.0.0.1:8081/", "loopback"),  # another port
        ("https://127.0.0.1:8080/", "loopback"),  # another scheme
    ],
)
async def test_refused(url: str, words: str) -> None:
    assert words in await refused(url)


async def test_public_host_is_resolved_and_pinned() -> None:
    t = await guard().check("https://storage.example/r/x.jpg?SIG=abc")
    assert (t.host, t.port) == ("storage.example", 443)
    assert t.addresses == (PUBLIC, "2606:2800:220:1:248:1893:25c8:1946")
    assert str(t.url).endswith("?SIG=abc")  # the URL itself is kept as given


async def test_the_base_url_origin_is_allowed() -> None:
    t = await guard().check("http://127.0.0.1:8080/_storage/r.jpg")
    assert t.addresses == ()  # a literal: nothing to resolve


@pytest.mark.parametrize(
    ("allow", "url"),
    [
        (("localhost:8080",), "http://localhost:8080/x"),
        (("LOCALHOST:8080",), "https://localhost.:8080/x"),
        (("10.1.2.3:443",), "https://10.1.2.3/x"),
        (("internal.example:80",), "http://internal.example/x"),
        (("[::1]:9000",), "http://[::1]:9000/x"),
    ],
)
async def test_allow_list(allow: tuple[str, ...], url: str) -> None:
    await guard(allow=allow).check(url)
    with pytest.raises(PermanentError):
        await guard().check(url)


@pytest.mark.parametrize(
    ("allow", "url"),
    [
        (("meta.example:80",), "http://meta.example/"),
        (("169.254.169.254:80",), "http://169.254.169.254/"),
        (("127.0.0.1:8080",), "http://[fe80::1]:8080/"),
    ],
)
async def test_link_local_is_refused_even_when_allowed(allow: tuple[str, ...], url: str) -> None:
    assert "always refused" in await refused(url, guard(allow=allow))


async def test_base_url_on_link_local_is_still_refused() -> None:
    g = guard(base="http://169.254.169.254")
    assert "always refused" in await refused("http://169.254.169.254/x", g)


async def test_resolution_failures_are_transport_problems() -> None:
    with pytest.raises(ResolveError):
        await guard().check("http://nowhere.example/x")
    with pytest.raises(ResolveError):
        await guard().check("http://empty.example/x")


async def test_pinned_resolver_answers_only_checked_addresses() -> None:
    r = PinnedResolver()
    with pytest.raises(AddressRefused):
        await r.resolve("storage.example", 443)
    r.pin(Target(url=None, host="storage.example", port=443, addresses=(PUBLIC, "2001:db8::1")))  # type: ignore[arg-type]
    v4 = await r.resolve("storage.example", 443, socket.AF_INET)
    assert [(x["host"], x["port"], x["family"]) for x in v4] == [(PUBLIC, 443, socket.AF_INET)]
    both = await r.resolve("storage.example", 443, socket.AF_UNSPEC)
    assert [x["host"] for x in both] == [PUBLIC, "2001:db8::1"]
    with pytest.raises(AddressRefused):
        await r.resolve("other.example", 443, socket.AF_UNSPEC)  # a rebinding target
    await r.close()


# ---------------------------------------------------------------- properties

PRIVATE_NETS = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "100.64.0.0/10",
    "0.0.0.0/8",
    "fc00::/7",
    "fe80::/10",
    "::1/128",
]


@given(st.sampled_from(PRIVATE_NETS), st.integers(min_value=0))
@settings(max_examples=400)
def test_every_non_public_address_is_refused(net: str, offset: int) -> None:
    network = ipaddress.ip_network(net)
    address = network[offset % network.num_addresses]
    assert address_refusal(address) is not None
    if isinstance(address, ipaddress.IPv4Address):
        mapped = ipaddress.IPv6Address(f"::ffff:{address}")
        assert address_refusal(mapped) is not None


@given(st.ip_addresses())
@settings(max_examples=500)
def test_refusal_matches_is_global(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    why = address_refusal(address)
    if why is None:
        assert address.is_global and not address.is_multicast
    elif not address_refusal(address, allowed=True):
        # Only the always-refused ranges survive the allow list.
        assert not (
            address in ipaddress.ip_network("169.254.0.0/16")
            if address.version == 4
            else address in ipaddress.ip_network("fe80::/10")
        )


@given(st.ip_addresses(v=4))
@settings(max_examples=300)
def test_link_local_always_refused(address: ipaddress.IPv4Address) -> None:
    link_local = ipaddress.IPv4Address(
        (int(address) & 0xFFFF) | int(ipaddress.IPv4Address("169.254.0.0"))
    )
    assert address_refusal(link_local, allowed=True) is not None
