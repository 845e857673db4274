"""Which addresses the downloader may connect to (the SSRF guard of URL manifests).

A manifest names URLs anyone may have written, so a fetch must not reach what only this
machine can: loopback, private (RFC 1918, unique-local fc00::/7), link-local (and with
it the cloud metadata service at 169.254.169.254 and fd00:ec2::254), shared (100.64/10),
multicast, reserved, documentation and unspecified addresses are refused, also when an
IPv6 address carries one of them (IPv4-mapped, 6to4, NAT64). A network that
``CARSEARCH_DOWNLOAD__ALLOW_NETWORKS`` names (comma-separated CIDRs, e.g.
``127.0.0.0/8`` for a test server or ``10.1.2.0/24`` for an internal image host) is let
through; the metadata addresses never are.

The check is made on the address a connection is actually opened to: `GuardedBackend`
resolves the host itself, refuses when any of its addresses is not allowed, and connects
to the checked address, so a name that resolves differently a moment later (DNS
rebinding) cannot slip past. Every redirect hop opens its connection through it too.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Never fetched, whatever is allowed: where clouds answer with credentials.
METADATA = frozenset({ipaddress.ip_address("169.254.169.254"),
                      ipaddress.ip_address("fd00:ec2::254")})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

# One reason for every refusal: which kind of address a name resolved to, or what the
# host would have answered, is not recorded (the ledger must not be a probing oracle).
REFUSED = ("refused: not a public address (CARSEARCH_DOWNLOAD__ALLOW_NETWORKS names "
           "the networks a manifest may reach besides the internet)")


class AddressRefused(Exception):
    """A connection the guard did not allow; the message is `REFUSED`."""

    def __init__(self) -> None:
        super().__init__(REFUSED)


def parse_networks(text: str | Iterable[str]) -> tuple[IPNetwork, ...]:
    """"127.0.0.0/8, 10.1.2.3" -> networks; ValueError naming a bad entry."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[IPNetwork] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"not a network: {item!r} (use CIDRs like 127.0.0.0/8)") from None
    return tuple(out)


def _embedded(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, NAT64), else itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def is_public(ip: IPAddress) -> bool:
    """Whether an address is on the public internet (see the module docstring)."""
    ip = _embedded(ip)
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


class AddressPolicy:
    """Public addresses, plus the networks allowed; never the metadata addresses."""

    def __init__(self, allow: Sequence[IPNetwork] | str = ()) -> None:
        self.allow = parse_networks(allow) if isinstance(allow, str) else tuple(allow)

    def allows(self, address: str | IPAddress) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0]
                                      if isinstance(address, str) else address)
        except ValueError:
            return False
        if ip in METADATA or _embedded(ip) in METADATA:
            return False
        if is_public(ip):
            return True
        candidates = {ip, _embedded(ip)}
        return any(c.version == net.version and c in net
                   for net in self.allow for c in candidates)

    def resolve(self, host: str, port: int) -> list[str]:
        """The addresses `host` resolves to, all allowed (AddressRefused otherwise)."""
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses or not all(self.allows(a) for a in addresses):
            raise AddressRefused()
        return addresses


class GuardedBackend:
    """An httpcore network backend that connects only to addresses `policy` allows, and
    to exactly the address it checked."""

    def __init__(self, inner: Any, policy: AddressPolicy) -> None:
        self.inner = inner
        self.policy = policy

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> Any:
        import httpcore

        try:
            addresses = self.policy.resolve(host, port)
        except OSError as exc:  # the name does not resolve: a connection failure
            raise httpcore.ConnectError(str(exc)) from None
        last: Exception | None = None
        for address in addresses:
            try:
                return self.inner.connect_tcp(address, port, timeout=timeout,
                                              local_address=local_address,
                                              socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> Any:
        raise AddressRefused()

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


def guarded_transport(policy: AddressPolicy, *, max_connections: int) -> Any:
    """An httpx transport whose every connection goes through `GuardedBackend`."""
    import httpcore
    import httpx

    transport = httpx.HTTPTransport(trust_env=False,
                                    limits=httpx.Limits(max_connections=max_connections))
    transport._pool = httpcore.ConnectionPool(
        ssl_context=httpx.create_ssl_context(trust_env=False),
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=5.0,
        network_backend=GuardedBackend(httpcore.SyncBackend(), policy),
    )
    return transport
