"""Outbound safety: which URLs the service may call (webhooks, reference images, later LoRA files).

A URL is allowed when its scheme is http(s), it names a host, and every address the host resolves to
is public. Private, loopback, link-local, multicast, reserved and unspecified addresses are refused
(IPv6 too, including IPv4 addresses embedded in IPv6: mapped ``::ffff:a.b.c.d``, 6to4 and NAT64),
unless an allowed CIDR (``FLUXGATE_OUTBOUND_ALLOW_CIDRS``) contains them. Cloud metadata endpoints
are refused even then: no deployment needs a user-supplied URL to reach them.

The check runs at submit time and again immediately before every request, and the request then
connects to exactly the vetted address (see :mod:`shared.outbound_http`), so a host that re-binds its
DNS name to a private address after the submit check cannot steer a request there.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]

MAX_URL_CHARS = 2048
DEFAULT_PORTS = {"http": 80, "https": 443}
# Instance-metadata services (AWS/GCP/Azure/OCI, AWS ECS and IPv6 IMDS, Alibaba): never reachable.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(address)
    for address in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)
NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")


class OutboundRefused(ValueError):
    """The URL may not be called; the message says why and is safe to show to the user."""


@dataclass(frozen=True)
class OutboundTarget:
    """A vetted URL: where to connect (``addresses``, every one checked) and what to ask for."""

    url: str
    scheme: str
    host: str
    port: int
    path: str
    addresses: tuple[IPAddress, ...]


def parse_allow_cidrs(value: str | Iterable[str]) -> tuple[IPNetwork, ...]:
    """``"127.0.0.0/8, ::1/128"`` → networks; raises ValueError naming a bad entry."""
    entries = value.split(",") if isinstance(value, str) else list(value)
    networks: list[IPNetwork] = []
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError as error:
            raise ValueError(f"FLUXGATE_OUTBOUND_ALLOW_CIDRS: {entry!r} is not a CIDR ({error})") from None
    return tuple(networks)


def resolve_host(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (the system resolver, A and AAAA)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, NAT64), if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in NAT64_PREFIX:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_problem(address: IPAddress) -> str | None:
    """Why ``address`` is not a public unicast address, or None when it is."""
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    for name in ("loopback", "link_local", "multicast", "unspecified", "private", "reserved"):
        if getattr(address, f"is_{name}"):
            return f"a {name.replace('_', '-')} address"
    if not address.is_global:
        return "not a public address"
    return None


class OutboundPolicy:
    """Decides which URLs and addresses outbound requests may reach."""

    def __init__(
        self, allow_cidrs: Iterable[str | IPNetwork] = (), resolver: Resolver = resolve_host
    ) -> None:
        self.allow_cidrs: tuple[IPNetwork, ...] = tuple(
            net if not isinstance(net, str) else parse_allow_cidrs([net])[0] for net in allow_cidrs
        )
        self.resolver = resolver

    @classmethod
    def from_setting(cls, allow_cidrs: str, resolver: Resolver = resolve_host) -> OutboundPolicy:
        """The policy of ``FLUXGATE_OUTBOUND_ALLOW_CIDRS`` (a comma list)."""
        return cls(parse_allow_cidrs(allow_cidrs), resolver)

    def _allowed_by_cidr(self, address: IPAddress) -> bool:
        candidates = [address, embedded_ipv4(address)]
        return any(
            c is not None and c.version == n.version and c in n for c in candidates for n in self.allow_cidrs
        )

    def refusal(self, address: IPAddress) -> str | None:
        """Why a request may not connect to ``address``, or None when it may."""
        inner = embedded_ipv4(address)
        if address in METADATA_ADDRESSES or inner in METADATA_ADDRESSES:
            return "a cloud metadata address"
        if self._allowed_by_cidr(address):
            return None
        if inner is not None:  # judge the IPv4 address the IPv6 one carries (a mapped one is "reserved")
            problem = address_problem(inner)
            return None if problem is None else f"{problem} (as {inner})"
        return address_problem(address)

    def check_address(self, host: str, address: str | IPAddress) -> IPAddress:
        """The parsed address if a request to ``host`` may connect to it; raises OutboundRefused."""
        parsed = ipaddress.ip_address(address) if isinstance(address, str) else address
        problem = self.refusal(parsed)
        if problem is not None:
            where = f"{host} is" if _same_address(host, parsed) else f"{host} resolves to {parsed},"
            raise OutboundRefused(f"{where} {problem}; outbound requests may only reach public addresses")
        return parsed

    def vet(self, url: str) -> OutboundTarget:
        """Parse and resolve ``url``, checking it and every address; raises OutboundRefused."""
        scheme, host, port, path = split_url(url)
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            names = [str(literal)]
        else:
            try:
                names = self.resolver(host, port)
            except (OSError, UnicodeError) as error:
                raise OutboundRefused(f"the host {host} does not resolve ({error})") from None
        if not names:
            raise OutboundRefused(f"the host {host} does not resolve")
        addresses = tuple(self.check_address(host, name) for name in names)
        return OutboundTarget(url=url, scheme=scheme, host=host, port=port, path=path, addresses=addresses)

    def check_url(self, url: str) -> None:
        """Refuse (OutboundRefused, a ValueError) a URL that outbound requests may not call."""
        self.vet(url)


def _same_address(host: str, address: IPAddress) -> bool:
    try:
        return ipaddress.ip_address(host) == address
    except ValueError:
        return False


def split_url(url: str) -> tuple[str, str, int, str]:
    """``(scheme, host, port, path-and-query)`` of an http(s) URL; raises OutboundRefused."""
    if len(url) > MAX_URL_CHARS:
        raise OutboundRefused(f"the URL is longer than {MAX_URL_CHARS} characters")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise OutboundRefused("the URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise OutboundRefused(f"the URL is malformed ({error})") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise OutboundRefused(f"the URL scheme must be http or https, not {parts.scheme or 'none'!r}")
    if parts.username is not None or parts.password is not None:
        raise OutboundRefused("credentials in the URL are not supported")
    if not parts.hostname:
        raise OutboundRefused("the URL has no host")
    try:
        host = parts.hostname.encode("idna").decode("ascii")
    except UnicodeError:
        raise OutboundRefused(f"the host {parts.hostname!r} is not a valid domain name") from None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, host.rstrip(".") or host, port or DEFAULT_PORTS[scheme], path
