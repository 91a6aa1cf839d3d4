"""Budget alert webhooks: signed POSTs, retried with backoff, each carrying an idempotency key.

The body is the alert as JSON. ``Tollgate-Signature: t=<unix>,v1=<hex>``
is HMAC-SHA256 over ``"<t>." + body`` with the budget's webhook secret, and
``Idempotency-Key`` is the alert id, the same on every retry, so a receiver
can drop repeats. A delivery that fails is redelivered by JetStream after a
doubling delay until ``webhook_attempts`` run out.

Destinations are checked when sent (``bus.account.webhook_policy``): a literal address before the POST,
a host name's addresses by the connector's resolver, so the connection goes only to addresses
that passed. Redirects are not followed (a 3xx is a failed delivery), the answer's body is
never read (its status is all that counts), and logs name the host, never the URL, which may
carry a secret.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time

import aiohttp
import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from billing.batches import Batches
from bus.account.budgets import Budget, decode_budget
from bus.protocol import BudgetAlert, decode_alert
from bus.settings import Settings
from bus.errors import InvalidRequest
from bus.subjects import BUDGETS_BUCKET, EVENTS_STREAM, WEBHOOKS_CONSUMER
from bus.watched import WatchedBucket
from bus.account.webhook_policy import WebhookPolicy, url_host
from bus.destinations import DestinationRefused, GuardedResolver

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Tollgate-Signature"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


class WebhookSender(Batches):
    def __init__(self, settings: Settings, nc: Client):
        super().__init__(nc, EVENTS_STREAM, WEBHOOKS_CONSUMER, 64)
        self.meter = settings.meter
        self._policy = WebhookPolicy(settings.meter.webhook_allow)
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        await super().start()
        self._budgets = WatchedBucket(await self._js.key_value(BUDGETS_BUCKET), decode_budget)
        await self._budgets.start()
        # No DNS cache: every delivery checks what the name resolves to now.
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self._policy.address_allowed), use_dns_cache=False)
        self._http = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self.meter.webhook_timeout_s))

    async def close(self) -> None:
        await super().close()
        await self._budgets.stop()
        if self._http is not None:
            await self._http.close()

    async def handle(self, msgs: list[Msg], retry: bool = False) -> None:
        await asyncio.gather(*(self._deliver(msg) for msg in msgs))

    async def _deliver(self, msg: Msg) -> None:
        try:
            alert = decode_alert(msg.data)
        except Exception:
            log.error("terminated a malformed budget alert on %s", msg.subject)
            await msg.term()
            return
        budget = self._budgets.get(alert.budget_id)
        if budget is None or not budget.webhook_url:
            await msg.ack()
            return
        try:
            delivered = await self._post(budget, alert)
        except InvalidRequest:  # no retry can make a refused destination allowed
            log.error("refused to send alert %s to %s: not an allowed webhook destination",
                      alert.id, url_host(budget.webhook_url))
            await msg.term()
            return
        if delivered:
            await msg.ack()
            return
        attempt = msg.metadata.num_delivered
        if attempt >= self.meter.webhook_attempts:
            log.error("gave up delivering alert %s to %s after %d attempts", alert.id, url_host(budget.webhook_url),
                      attempt)
            await msg.term()
        else:
            await msg.nak(delay=self.meter.webhook_backoff_s * 2 ** (attempt - 1))

    async def _post(self, budget: Budget, alert: BudgetAlert) -> bool:
        """POST the alert; True if the receiver took it. ``InvalidRequest`` if the destination is refused."""
        host = self._policy.check_url(budget.webhook_url)  # a budget stored before the policy is checked too
        body = msgspec.json.encode(alert)
        headers = {"Content-Type": "application/json", "Idempotency-Key": alert.id}
        if budget.webhook_secret:
            headers[SIGNATURE_HEADER] = sign(budget.webhook_secret, int(time.time()), body)
        try:
            # A redirect could lead anywhere, signature headers included: it counts as a failure.
            async with self._http.post(budget.webhook_url, data=body, headers=headers, allow_redirects=False) as resp:
                if resp.status < 300:
                    return True
                log.warning("webhook to %s answered %d for alert %s", host, resp.status, alert.id)
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, DestinationRefused):
                raise InvalidRequest(f"{host} resolves only to refused addresses", param="webhook_url") from None
            log.warning("webhook to %s failed for alert %s: %s", host, alert.id, exc.os_error)
        except Exception as exc:  # its text may quote the URL: the class is enough
            log.warning("webhook to %s failed for alert %s: %s", host, alert.id, type(exc).__name__)
        return False
