"""Where a budget webhook may be sent: public addresses only, unless the operator allows more.

A webhook URL comes from an API caller, and billing POSTs to it from inside the deployment, so
an unchecked URL reaches loopback services, the private network and cloud metadata endpoints
(server-side request forgery). The edge refuses such a URL when a budget is set; billing checks
every address a host name resolves to when it sends, and connects only to those it passed.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable
from urllib.parse import urlsplit

from bus.destinations import is_public, parse_address
from bus.errors import InvalidRequest

# Names that always mean this machine or a cloud metadata service; refused when a budget is set
# (their addresses would be refused at send time anyway, with a less helpful answer).
_INTERNAL_NAMES = ("localhost", "metadata.google.internal", "metadata.goog")

def url_host(url: str) -> str:
    """The host of a webhook URL, lower case and without a trailing dot: what logs may show."""
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return ""
    return host.rstrip(".")


class WebhookPolicy:
    """The operator's allowlist (host names, addresses or CIDRs) over a public-only default."""

    def __init__(self, allow: Iterable[str] = ()):
        self._hosts: set[str] = set()
        self._networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in allow:
            try:
                self._networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                self._hosts.add(entry.strip().lower().rstrip("."))

    def address_allowed(self, host: str, address: str) -> bool:
        """May ``host``, resolved to ``address``, be sent to?"""
        if host in self._hosts:
            return True
        ip = parse_address(address)
        if ip is None:
            return False
        if any(ip in net for net in self._networks if net.version == ip.version):
            return True
        return is_public(ip)

    def check_url(self, url: str) -> str:
        """Refuse a URL that is not http(s) or names a refused destination; return its host.

        A host name is checked here only against names known to be internal: what it resolves
        to is checked when the webhook is sent, since DNS answers change.
        """
        if not url.lower().startswith(("http://", "https://")):
            raise InvalidRequest("webhook_url must be an http(s) URL", param="webhook_url")
        host = url_host(url)
        if not host:
            raise InvalidRequest("webhook_url must name a host", param="webhook_url")
        internal = host.endswith(".localhost") or host in _INTERNAL_NAMES
        if (internal and host not in self._hosts) or (parse_address(host) and not self.address_allowed(host, host)):
            raise InvalidRequest(
                f"webhook_url may not point at {host}: loopback, private, link-local and metadata addresses "
                "are refused unless the operator allows them (meter.webhook_allow)", param="webhook_url")
        return host
