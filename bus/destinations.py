"""Where the gateway's own outbound HTTP may connect: budget webhooks, image URLs.

Such URLs come from API callers, and the gateway fetches or POSTs from inside the deployment,
so an unchecked one reaches loopback services, the private network and cloud metadata
endpoints (server-side request forgery). Callers check a URL's literal address up front and
connect through ``GuardedResolver``, which resolves a host name and keeps only the addresses
their rule allows: the connection goes to an address that was checked, so a name that
resolves differently the second time (DNS rebinding) gains nothing.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Callable

import aiohttp
import aiohttp.abc

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(text: str) -> Address | None:
    """``text`` as an IP address (an IPv4-mapped IPv6 address as the IPv4 one it is), or None."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])  # an IPv6 zone (fe80::1%eth0) names no other host
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return ip


def is_public(ip: Address) -> bool:
    """Whether ``ip`` is a public unicast address.

    ``is_global`` excludes loopback, private, link-local (169.254.169.254, the metadata address),
    shared (100.64/10), reserved and unspecified ranges alike.
    """
    return ip.is_global and not ip.is_multicast


class DestinationRefused(OSError):
    """A host with no address the rule allows."""


class GuardedResolver(aiohttp.abc.AbstractResolver):
    """Resolves as usual, then keeps only the addresses ``allowed(host, address)`` passes.

    Use it with ``use_dns_cache=False``, so every connection checks what the name resolves to now.
    aiohttp does not resolve a literal address: check those before connecting.
    """

    def __init__(self, allowed: Callable[[str, str], bool]):
        self._allowed = allowed
        self._resolver = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list:
        found = await self._resolver.resolve(host, port, family)
        allowed = [r for r in found if self._allowed(host.lower().rstrip("."), r["host"])]
        if not allowed:
            raise DestinationRefused(f"{host} resolves only to refused addresses")
        return allowed

    async def close(self) -> None:
        await self._resolver.close()
