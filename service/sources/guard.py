"""Which addresses an HTTP source may reach: a pure policy plus its aiohttp hook.

Every address a host resolves to is checked right before connecting (no gap
for DNS rebinding); IP literals, which aiohttp does not resolve, are checked
in the same place.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from service.errors import ErrorCode, PermanentError, RetryableError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_V4_TABLE: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "reserved"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
)
_V6_TABLE: tuple[tuple[str, str], ...] = (
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("64:ff9b:1::/48", "reserved"),
    ("100::/64", "reserved"),
    ("2001::/23", "reserved"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("fc00::/7", "unique-local"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "reserved"),
    ("ff00::/8", "multicast"),
)
_V4 = tuple((ipaddress.IPv4Network(net), name) for net, name in _V4_TABLE)
_V6 = tuple((ipaddress.IPv6Network(net), name) for net, name in _V6_TABLE)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_6TO4 = ipaddress.IPv6Network("2002::/16")
_TEREDO = ipaddress.IPv6Network("2001::/32")
_COMPAT = ipaddress.IPv6Network("::/96")


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries: mapped, compatible, NAT64, 6to4 or Teredo."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64 or (address in _COMPAT and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _6TO4:
        return address.sixtofour
    if address in _TEREDO and address.teredo is not None:
        return address.teredo[1]
    return None


def classify(address: IPAddress) -> str | None:
    """The non-public class of ``address`` ("loopback", "private", ...), or None if public."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = embedded_ipv4(address)
        if inner is not None:
            kind = classify(inner)
            return f"{kind} (in an IPv6 form)" if kind else None
        table: Iterable[tuple[Any, str]] = _V6
        if not address.is_global and not any(address in net for net, _ in _V6):
            return "reserved"
    else:
        table = _V4
    for network, name in table:
        if address in network:
            return name
    return None if address.is_global else "reserved"


def numeric_host(host: str) -> IPAddress | None:
    """The address a numeric host spelling stands for (``2130706433``, ``0x7f.1``, ``[::1]``).

    Uses the C library's ``inet_aton`` rules, as the system resolver does; None for names.
    """
    host = host.strip("[]")
    if host.endswith(".") and not host.endswith(".."):
        host = host[:-1]  # "127.0.0.1." is the address too, as browsers read it
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if not host or not all(c in "0123456789abcdefxABCDEFX." for c in host):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


@dataclass(frozen=True)
class AllowedHost:
    """An allowlist entry: a host, and optionally the only port it may be reached on."""

    host: str
    port: int | None


def parse_allowed_hosts(entries: Iterable[str]) -> tuple[AllowedHost, ...]:
    """Parse ``host``, ``host:port``, ``[v6]:port`` entries; ValueError on a bad one."""
    parsed: list[AllowedHost] = []
    for raw in entries:
        entry = raw.strip().lower()
        if not entry:
            continue
        host, port = entry, None
        if entry.startswith("["):
            close = entry.find("]")
            if close < 0:
                raise ValueError(f"bad allowed host {raw!r}")
            host, rest = entry[1:close], entry[close + 1 :]
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"bad allowed host {raw!r}")
                port = _port(rest[1:], raw)
        elif entry.count(":") == 1:
            host, text = entry.split(":")
            port = _port(text, raw)
        if not host:
            raise ValueError(f"bad allowed host {raw!r}")
        parsed.append(AllowedHost(host, port))
    return tuple(parsed)


def _port(text: str, raw: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port in allowed host {raw!r}")
    return int(text)


def _same_host(a: str, b: str) -> bool:
    a, b = a.strip("[]").lower().rstrip("."), b.strip("[]").lower().rstrip(".")
    if a == b:
        return True
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


class BlockedAddressError(OSError):
    """A connection the policy refuses; ``reason`` says why (no secrets in it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class AddressPolicy:
    """Which hosts and addresses HTTP sources may reach."""

    allow_private: bool = False
    allowed_hosts: tuple[AllowedHost, ...] = ()

    def host_listed(self, host: str, port: int) -> bool:
        """Whether an allowlist entry names this host (and port, when it gives one)."""
        return any(
            _same_host(entry.host, host) and entry.port in (None, port)
            for entry in self.allowed_hosts
        )

    def check_host(self, host: str, port: int) -> str | None:
        """Refusal reason before resolving (the allowlist, numeric spellings), or None."""
        return _check_host(self, host, port)

    def check_address(self, host: str, port: int, address: str) -> str | None:
        """Refusal reason for connecting to ``address`` for ``host``, or None when allowed."""
        if self.host_listed(host, port):
            return None
        if self.allowed_hosts:
            return f"{host}:{port} is not in COURIER_SOURCE_ALLOWED_HOSTS"
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return f"{address!r} is not an IP address"
        kind = classify(ip)
        if kind is None or self.allow_private:
            return None
        return f"{host} resolves to {ip}, a {kind} address"


@functools.lru_cache(maxsize=4096)
def _check_host(policy: AddressPolicy, host: str, port: int) -> str | None:
    # A pure decision (no DNS here) taken for every request and redirect hop: cached.
    if policy.allowed_hosts and not policy.host_listed(host, port):
        return f"{host}:{port} is not in COURIER_SOURCE_ALLOWED_HOSTS"
    address = numeric_host(host)
    if address is not None:
        return policy.check_address(host, port, str(address))
    return None


class GuardedResolver(AbstractResolver):
    """A resolver that refuses the whole answer when any address is not allowed."""

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve ``host`` and check every address it gave."""
        results = await self._inner.resolve(host, port, family)
        for result in results:
            reason = self._policy.check_address(host, port, result["host"])
            if reason is not None:
                raise BlockedAddressError(reason)
        return results

    async def close(self) -> None:
        """Close the inner resolver."""
        await self._inner.close()


class GuardedConnector(aiohttp.TCPConnector):
    """A TCP connector that checks IP-literal hosts too (aiohttp skips the resolver for them)."""

    def __init__(self, policy: AddressPolicy, **kwargs: Any) -> None:
        kwargs.setdefault("resolver", GuardedResolver(policy))
        super().__init__(**kwargs)
        self._policy = policy

    async def _resolve_host(self, host: str, port: int, traces: Any = None) -> list[ResolveResult]:
        reason = self._policy.check_host(host, port)
        if reason is not None:
            raise BlockedAddressError(reason)
        results = await super()._resolve_host(host, port, traces)
        for result in results:
            reason = self._policy.check_address(host, port, result["host"])
            if reason is not None:
                raise BlockedAddressError(reason)
        return results


def guarded_connector(policy: AddressPolicy, **kwargs: Any) -> aiohttp.TCPConnector:
    """A connector for source fetches that enforces ``policy`` at connect time."""
    return GuardedConnector(policy, **kwargs)


Resolve = Callable[[str, int], Awaitable[Sequence[str]]]


async def system_resolve(host: str, port: int) -> list[str]:
    """The addresses the system resolver gives for ``host``; nothing is connected to."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def relay_refusal(
    url: URL, policy: AddressPolicy, resolve: Resolve = system_resolve
) -> str | None:
    """Why ``policy`` refuses a URL that another service fetches on Courier's word, or None.

    The decision a source fetch takes at connect time, taken ahead of time for
    URLs Courier hands to Mindset (``sourceUrl`` of an http source,
    ``thumbnailUrl``, ``externalUrl``): the allowlist, numeric spellings, then
    every address the name resolves to. OSError when the name does not resolve.
    """
    host, port = url.host or "", url.port or 0
    reason = policy.check_host(host, port)
    if reason is not None or policy.host_listed(host, port) or numeric_host(host) is not None:
        return reason
    if policy.allow_private and not policy.allowed_hosts:
        return None  # every address is allowed: no need to ask the resolver
    for address in await resolve(url.raw_host or host, port):
        reason = policy.check_address(host, port, address)
        if reason is not None:
            return reason
    return None


async def destination_fetch_refusal(
    url: URL, policy: AddressPolicy, resolve: Resolve = system_resolve
) -> str | None:
    """Why a URL that the destination fetches for itself (a Mindset ``thumbnailUrl``) is
    refused, or None: only a host that is, or resolves to, a non-public address.

    The allowlist opens such a host but restricts nothing here, and
    ``COURIER_SOURCE_ALLOW_PRIVATE`` opens every host; a name that does not resolve from
    here passes (the destination resolves it on its own network).
    """
    host, port = url.host or "", url.port or 0
    if policy.allow_private or policy.host_listed(host, port):
        return None
    public_only = AddressPolicy()
    if numeric_host(host) is not None:
        return public_only.check_host(host, port)
    try:
        addresses = await resolve(url.raw_host or host, port)
    except OSError:
        return None
    for address in addresses:
        reason = public_only.check_address(host, port, address)
        if reason is not None:
            return reason
    return None


async def check_fetched_by_destination(
    url: str, policy: AddressPolicy, resolve: Resolve = system_resolve
) -> None:
    """Raise ``source_blocked`` when :func:`destination_fetch_refusal` refuses ``url``."""
    reason = await destination_fetch_refusal(URL(url), policy, resolve)
    if reason is not None:
        raise PermanentError(ErrorCode.SOURCE_BLOCKED, f"thumbnailUrl: {reason}")


async def check_relayed_url(
    url: str, policy: AddressPolicy, resolve: Resolve = system_resolve
) -> None:
    """Raise ``source_blocked`` when ``policy`` refuses ``url`` (see :func:`relay_refusal`).

    A name that does not resolve is ``source_unavailable``, as it is for a fetch.
    """
    parsed = URL(url)
    try:
        reason = await relay_refusal(parsed, policy, resolve)
    except OSError:
        raise RetryableError(
            ErrorCode.SOURCE_UNAVAILABLE, f"cannot resolve the host {parsed.host!r}"
        ) from None
    if reason is not None:
        raise PermanentError(ErrorCode.SOURCE_BLOCKED, reason)
