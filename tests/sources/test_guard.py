"""The address guard's decisions, as pure functions, over a table of address forms."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest
from yarl import URL

from service.errors import CourierError, ErrorCode
from service.sources.guard import (
    AddressPolicy,
    BlockedAddressError,
    GuardedResolver,
    Resolve,
    check_fetched_by_destination,
    check_relayed_url,
    classify,
    destination_fetch_refusal,
    numeric_host,
    parse_allowed_hosts,
    relay_refusal,
)

DENY, ALLOW = False, True

ADDRESS_TABLE = [
    # cloud metadata and link-local
    ("169.254.169.254", DENY),
    ("169.254.0.1", DENY),
    ("fd00:ec2::254", DENY),
    ("fe80::1", DENY),
    ("fe80::a9fe:a9fe", DENY),
    # RFC 1918, with edges
    ("10.0.0.1", DENY),
    ("10.255.255.255", DENY),
    ("172.15.255.255", ALLOW),
    ("172.16.0.0", DENY),
    ("172.31.255.255", DENY),
    ("172.32.0.0", ALLOW),
    ("192.168.1.10", DENY),
    # shared address space (CGNAT), with edges
    ("100.63.255.255", ALLOW),
    ("100.64.0.1", DENY),
    ("100.127.255.255", DENY),
    ("100.128.0.0", ALLOW),
    # loopback, unspecified, broadcast, multicast, reserved
    ("127.0.0.1", DENY),
    ("127.255.255.254", DENY),
    ("0.0.0.0", DENY),
    ("0.1.2.3", DENY),
    ("255.255.255.255", DENY),
    ("224.0.0.1", DENY),
    ("239.255.255.250", DENY),
    ("240.0.0.1", DENY),
    ("192.0.0.8", DENY),
    # documentation and benchmarking
    ("192.0.2.1", DENY),
    ("198.51.100.7", DENY),
    ("203.0.113.9", DENY),
    ("198.18.0.1", DENY),
    # IPv6 loopback, unspecified, ULA, multicast, documentation
    ("::1", DENY),
    ("::", DENY),
    ("fc00::1", DENY),
    ("fd12:3456::1", DENY),
    ("ff02::1", DENY),
    ("2001:db8::1", DENY),
    # IPv4-mapped, -compatible, NAT64, 6to4, Teredo wrappers of private addresses
    ("::ffff:127.0.0.1", DENY),
    ("::ffff:10.0.0.1", DENY),
    ("::ffff:169.254.169.254", DENY),
    ("::127.0.0.1", DENY),
    ("64:ff9b::7f00:1", DENY),
    ("64:ff9b::a9fe:a9fe", DENY),
    ("64:ff9b:1::a00:1", DENY),
    ("2002:7f00:1::", DENY),
    ("2002:a00:1::1", DENY),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", DENY),
    # public, including wrapped public addresses
    ("8.8.8.8", ALLOW),
    ("1.1.1.1", ALLOW),
    ("93.184.216.34", ALLOW),
    ("2606:4700:4700::1111", ALLOW),
    ("2a00:1450:4001:80b::200e", ALLOW),
    ("::ffff:8.8.8.8", ALLOW),
    ("64:ff9b::808:808", ALLOW),
    ("2002:808:808::1", ALLOW),
]


@pytest.mark.parametrize(("address", "allowed"), ADDRESS_TABLE)
def test_address_table(address: str, allowed: bool) -> None:
    """Each address form is allowed only when public, whatever its spelling."""
    reason = AddressPolicy().check_address("files.example", 443, address)
    assert (reason is None) is allowed, reason
    if reason is not None:
        assert str(ipaddress.ip_address(address)) in reason


def test_table_is_large_enough() -> None:
    """The table covers at least 30 forms, denied and allowed."""
    assert len(ADDRESS_TABLE) >= 30
    assert {allowed for _, allowed in ADDRESS_TABLE} == {ALLOW, DENY}


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("169.254.169.254", "link-local"),
        ("100.64.0.1", "shared"),
        ("fd00::1", "unique-local"),
        ("127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private (in an IPv6 form)"),
        ("8.8.8.8", None),
    ],
)
def test_classify_names_the_class(address: str, kind: str | None) -> None:
    """The refusal says what kind of address it was."""
    assert classify(ipaddress.ip_address(address)) == kind


def test_allow_private_opens_private_addresses() -> None:
    """COURIER_SOURCE_ALLOW_PRIVATE=true lets private and loopback addresses through."""
    policy = AddressPolicy(allow_private=True)
    for address in ("127.0.0.1", "10.0.0.1", "169.254.169.254", "::1"):
        assert policy.check_address("h", 80, address) is None


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("2130706433", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0x7f.0.0.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("0xa9fea9fe", "169.254.169.254"),
        ("10.1", "10.0.0.1"),
        ("[::1]", "::1"),
        ("::ffff:7f00:1", "::ffff:127.0.0.1"),
        ("localhost", None),
        ("example.com", None),
        ("cafe.example", None),
        ("1e100.net", None),
        ("dead", None),
    ],
)
def test_numeric_spellings_resolve_before_the_check(host: str, expected: str | None) -> None:
    """Decimal, octal, hex and short forms are read as the address they stand for."""
    got = numeric_host(host)
    assert (str(got) if got is not None else None) == (
        str(ipaddress.ip_address(expected)) if expected else None
    )


@pytest.mark.parametrize(
    "host", ["2130706433", "0x7f.1", "127.1", "0177.0.0.1", "[::1]", "::ffff:169.254.169.254"]
)
def test_numeric_spellings_are_blocked_before_connecting(host: str) -> None:
    """check_host refuses numeric spellings of private addresses without any lookup."""
    reason = AddressPolicy().check_host(host, 80)
    assert reason is not None


def test_allowlist_opens_exactly_one_host_port() -> None:
    """`files.example:8080` opens that host on that port only; other hosts and ports stay closed."""
    policy = AddressPolicy(allowed_hosts=parse_allowed_hosts(["Files.Example:8080"]))
    assert policy.check_host("files.example", 8080) is None
    assert policy.check_address("FILES.example", 8080, "10.0.0.5") is None  # listed: any address
    assert policy.check_host("files.example", 8081) is not None
    assert policy.check_host("other.example", 8080) is not None
    assert policy.check_address("other.example", 8080, "8.8.8.8") is not None  # unlisted public
    assert policy.check_host("127.0.0.1", 8080) is not None


def test_allowlist_host_without_port_and_ipv6_entries() -> None:
    """A bare host opens every port; IPv6 literals are written in brackets."""
    policy = AddressPolicy(
        allowed_hosts=parse_allowed_hosts(["files.example", "[::1]:9000", "127.0.0.1:443"])
    )
    assert policy.check_host("files.example", 1) is None
    assert policy.check_host("files.example", 65535) is None
    assert policy.check_host("::1", 9000) is None
    assert policy.check_host("::1", 9001) is not None
    assert policy.check_host("127.0.0.1", 443) is None
    assert policy.check_host("127.0.0.1", 80) is not None


@pytest.mark.parametrize("entry", ["host:", "host:0", "host:70000", "host:http", "[::1", ":80"])
def test_bad_allowlist_entries(entry: str) -> None:
    """Malformed entries are refused at start-up."""
    with pytest.raises(ValueError, match="allowed host"):
        parse_allowed_hosts([entry])


class _CannedResolver:
    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: int = socket.AF_INET
    ) -> list[dict[str, Any]]:
        return [
            {"hostname": host, "host": a, "port": port, "family": family, "proto": 0, "flags": 0}
            for a in self.addresses
        ]

    async def close(self) -> None:
        return None


async def test_resolver_refuses_when_any_address_is_private() -> None:
    """A name resolving to a public and a private address is refused whole (no rebinding gap)."""
    guarded = GuardedResolver(AddressPolicy(), _CannedResolver(["93.184.216.34", "10.0.0.1"]))  # type: ignore[arg-type]
    with pytest.raises(BlockedAddressError, match=r"10\.0\.0\.1"):
        await guarded.resolve("rebind.example", 80)
    public = GuardedResolver(AddressPolicy(), _CannedResolver(["93.184.216.34"]))  # type: ignore[arg-type]
    assert [r["host"] for r in await public.resolve("ok.example", 80)] == ["93.184.216.34"]


def _resolver(*addresses: str) -> tuple[list[str], Resolve]:
    """A stub resolver answering ``addresses`` for any name; records the names it was asked."""
    asked: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        return list(addresses)

    return asked, resolve


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1./a.pdf",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8080/a.pdf",
        "http://2130706433/a.pdf",
        "http://0x7f.1./a.pdf",
    ],
)
async def test_relayed_literal_addresses_are_refused_without_lookup(url: str) -> None:
    """A URL another service will fetch on Courier's word is refused for a literal private address."""
    asked, resolve = _resolver("93.184.216.34")
    reason = await relay_refusal(URL(url), AddressPolicy(), resolve)
    assert reason is not None
    assert asked == []


async def test_relayed_localhost_is_refused() -> None:
    """localhost resolves (from /etc/hosts, no DNS) to loopback: refused."""
    reason = await relay_refusal(URL("http://localhost/a.pdf"), AddressPolicy())
    assert reason is not None and "loopback" in reason


@pytest.mark.parametrize(
    ("addresses", "allowed"),
    [
        (("10.0.0.5",), False),
        (("93.184.216.34", "10.0.0.5"), False),
        (("fd00::1",), False),
        (("93.184.216.34",), True),
    ],
)
async def test_relayed_name_is_checked_by_every_address(
    addresses: tuple[str, ...], allowed: bool
) -> None:
    """A name is resolved (never connected to): any private address among its answers refuses it."""
    asked, resolve = _resolver(*addresses)
    reason = await relay_refusal(URL("https://intranet.example/a.pdf"), AddressPolicy(), resolve)
    assert (reason is None) is allowed, reason
    assert asked == ["intranet.example"]


async def test_relayed_url_follows_the_configured_policy() -> None:
    """allow_private and the allowlist open relayed URLs exactly as they open source fetches."""
    asked, resolve = _resolver("10.0.0.5")
    open_policy = AddressPolicy(allow_private=True)
    assert await relay_refusal(URL("http://intranet.example/a"), open_policy, resolve) is None
    listed = AddressPolicy(allowed_hosts=parse_allowed_hosts(["intranet.example"]))
    assert await relay_refusal(URL("http://intranet.example/a"), listed, resolve) is None
    assert await relay_refusal(URL("http://other.example/a"), listed, resolve) is not None
    assert asked == []


async def test_check_relayed_url_codes() -> None:
    """Refused is source_blocked; a name that does not resolve is source_unavailable (retried)."""
    _, private = _resolver("10.0.0.5")
    with pytest.raises(CourierError) as info:
        await check_relayed_url("http://intranet.example/a", AddressPolicy(), private)
    assert info.value.code is ErrorCode.SOURCE_BLOCKED

    async def unknown(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(CourierError) as info:
        await check_relayed_url("http://nowhere.example/a", AddressPolicy(), unknown)
    assert info.value.code is ErrorCode.SOURCE_UNAVAILABLE
    assert info.value.retryable


async def _no_such_name(host: str, port: int) -> list[str]:
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


@pytest.mark.parametrize(
    ("url", "addresses", "policy", "refused"),
    [
        ("http://localhost/t.png", ("127.0.0.1",), AddressPolicy(), True),
        ("http://169.254.169.254/t.png", (), AddressPolicy(), True),
        ("http://127.0.0.1./t.png", (), AddressPolicy(), True),
        ("http://[::ffff:10.0.0.1]/t.png", (), AddressPolicy(), True),
        ("https://cdn.example/t.png", ("10.0.0.5",), AddressPolicy(), True),
        ("https://cdn.example/t.png", ("93.184.216.34",), AddressPolicy(), False),
        ("https://8.8.8.8/t.png", (), AddressPolicy(), False),
        # The allowlist restricts what Courier fetches, not what the destination does...
        (
            "https://cdn.example/t.png",
            ("93.184.216.34",),
            AddressPolicy(allowed_hosts=parse_allowed_hosts(["files.example"])),
            False,
        ),
        # ...but it opens a listed host, as COURIER_SOURCE_ALLOW_PRIVATE opens every host.
        (
            "http://intranet.example/t.png",
            ("10.0.0.5",),
            AddressPolicy(allowed_hosts=parse_allowed_hosts(["intranet.example"])),
            False,
        ),
        ("http://intranet.example/t.png", ("10.0.0.5",), AddressPolicy(allow_private=True), False),
    ],
)
async def test_a_url_the_destination_fetches_is_refused_only_for_non_public_addresses(
    url: str, addresses: tuple[str, ...], policy: AddressPolicy, refused: bool
) -> None:
    """A thumbnailUrl: refused only when its host is, or resolves to, a non-public address."""
    _, resolve = _resolver(*addresses)
    reason = await destination_fetch_refusal(URL(url), policy, resolve)
    assert (reason is not None) is refused, reason


async def test_a_name_the_destination_resolves_itself_passes() -> None:
    """A thumbnailUrl whose name does not resolve from here passes: Mindset resolves it."""
    assert (
        await destination_fetch_refusal(
            URL("https://cdn.internal/t.png"), AddressPolicy(), _no_such_name
        )
        is None
    )
    with pytest.raises(CourierError) as info:
        await check_fetched_by_destination("http://localhost/t.png", AddressPolicy())
    assert info.value.code is ErrorCode.SOURCE_BLOCKED


def test_numeric_spelling_with_a_trailing_dot_is_an_address() -> None:
    """`127.0.0.1.` is the loopback address, refused before any lookup, for sources too."""
    assert str(numeric_host("127.0.0.1.")) == "127.0.0.1"
    assert AddressPolicy().check_host("127.0.0.1.", 80) is not None
