"""What every provider worker shares: one pooled HTTP session per upstream, its timeouts, retries
with exponential backoff and jitter, server-sent events, and upstream refusals as our typed errors.

The API key lives in the request headers of this one object and nowhere else: it is never
logged, never put in an error, and an upstream's own message is scrubbed of it before it is
passed on (some upstreams quote the key they were sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import AsyncIterator, Callable, Union

import aiohttp
import msgspec

from bus.errors import (
    InvalidRequest, TollgateError, UpstreamFailed, UpstreamRateLimited, UpstreamTimeout, UpstreamUnavailable,
)
from bus.settings import ProviderSettings

log = logging.getLogger(__name__)

# The most an upstream's answer (a whole completion, every vector of an embeddings request) may
# take, and one server-sent-event line; more is refused as a broken upstream.
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_LINE_BYTES = 4 * 1024 * 1024
# How much of a refusal's body is read for its message.
_MAX_ERROR_BYTES = 16 * 1024
_encode = msgspec.json.Encoder().encode
# What a request sends: a JSON object, or what makes a multipart form (made afresh for each try:
# aiohttp sends a form once).
Payload = Union[dict, Callable[[], aiohttp.FormData]]


class _Refusal(msgspec.Struct):
    """The parts of an upstream's error body we read: OpenAI and Anthropic nest it, Gemini too."""

    error: "_ErrorBody | str | None" = None


class _ErrorBody(msgspec.Struct):
    message: str = ""
    param: str | None = None


class Upstream:
    """One upstream (``[providers.<name>]``): requests on pooled keep-alive connections, retried as it allows."""

    def __init__(self, name: str, settings: ProviderSettings, headers: dict[str, str], secret: str = ""):
        self.name, self.settings = name, settings
        self._headers = headers  # a form's content type names its boundary: aiohttp sets it
        self._secret = secret
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use, inside the worker's event loop.
        if self._session is None:
            s = self.settings
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=s.max_connections, ttl_dns_cache=300),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout_s),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def post_json(self, path: str, payload: Payload, decode: Callable[[bytes], object],
                        cancel: asyncio.Event) -> object | None:
        """POST ``payload`` and decode the whole answer, retrying what may be retried; None once cancelled."""
        async def exchange() -> object:
            response = await self._open(path, payload)
            async with response:
                return decode(await self._body(response))
        return await self._retried(exchange, cancel)

    @contextlib.asynccontextmanager
    async def events(self, path: str, payload: dict, cancel: asyncio.Event) -> AsyncIterator[AsyncIterator[tuple[str, bytes]] | None]:
        """POST ``payload`` for a stream of server-sent events; yields its ``(event, data)`` pairs, or
        None if cancelled before it began. Opening is retried; once events flow, a failure is raised."""
        async with self._streamed(path, payload, cancel) as response:
            yield None if response is None else self._events(response, cancel)

    @contextlib.asynccontextmanager
    async def chunks(self, path: str, payload: dict, cancel: asyncio.Event) -> AsyncIterator[AsyncIterator[bytes] | None]:
        """POST ``payload`` for a body streamed as it is made (speech); yields its bytes as they arrive,
        or None if cancelled before it began. Opening is retried; once bytes flow, a failure is raised."""
        async with self._streamed(path, payload, cancel) as response:
            yield None if response is None else self._chunks(response, cancel)

    @contextlib.asynccontextmanager
    async def _streamed(self, path: str, payload: dict, cancel: asyncio.Event) -> AsyncIterator[aiohttp.ClientResponse | None]:
        response = await self._retried(lambda: self._open(path, payload), cancel)
        if response is None:
            yield None
            return
        # A cancel closes the connection, which ends a read waiting on a silent upstream at once.
        watcher = asyncio.ensure_future(_close_on(cancel, response))
        try:
            yield response
        finally:
            watcher.cancel()
            response.close()  # a stream left early is not reused: its connection is dropped

    async def _chunks(self, response: aiohttp.ClientResponse, cancel: asyncio.Event) -> AsyncIterator[bytes]:
        # As for events: the first-byte timeout until the first bytes, the silence timeout after them.
        wait, started = self.settings.first_byte_timeout_s, False
        while True:
            try:
                async with asyncio.timeout(wait):
                    part = await response.content.readany()
            except TimeoutError:
                raise UpstreamTimeout(f"The upstream provider fell silent for {wait:g}s "
                                      f"{'mid-stream' if started else 'before its first bytes'}.") from None
            except (aiohttp.ClientError, OSError):
                if cancel.is_set():
                    return
                raise UpstreamFailed("The upstream provider's stream broke off.") from None
            if not part:
                return
            yield part
            wait, started = self.settings.idle_timeout_s, True

    async def _events(self, response: aiohttp.ClientResponse, cancel: asyncio.Event) -> AsyncIterator[tuple[str, bytes]]:
        event, data = "", []
        # Headers may come at once and the first token much later: until it, the first-byte timeout applies.
        wait, started = self.settings.first_byte_timeout_s, False
        while True:
            try:
                async with asyncio.timeout(wait):
                    line = await response.content.readline(max_line_length=MAX_LINE_BYTES)
            except TimeoutError:
                raise UpstreamTimeout(f"The upstream provider fell silent for {wait:g}s "
                                      f"{'mid-stream' if started else 'before its first event'}.") from None
            except (aiohttp.ClientError, aiohttp.http_exceptions.HttpProcessingError, OSError):
                if cancel.is_set():
                    return
                raise UpstreamFailed("The upstream provider's stream broke off.") from None
            if not line:  # the upstream closed the stream: what is pending is its last event
                if data:
                    yield event or "message", b"\n".join(data)
                return
            line = line.rstrip(b"\r\n")
            if not line:
                if data:
                    yield event or "message", b"\n".join(data)
                    wait, started = self.settings.idle_timeout_s, True
                event, data = "", []
            elif line.startswith(b"data:"):
                data.append(line[5:].removeprefix(b" "))
            elif line.startswith(b"event:"):
                event = line[6:].strip().decode(errors="replace")

    async def _open(self, path: str, payload: Payload) -> aiohttp.ClientResponse:
        """Send one request; the response once it has begun with a 2xx, else the upstream's refusal raised."""
        url = self.settings.base_url.rstrip("/") + path
        if callable(payload):
            data, headers = payload(), self._headers
        else:
            data, headers = _encode(payload), {"Content-Type": "application/json", **self._headers}
        try:
            async with asyncio.timeout(self.settings.first_byte_timeout_s):
                response = await self._client().post(url, data=data, headers=headers)
        except TimeoutError:
            raise UpstreamTimeout(f"The upstream provider did not answer within "
                                  f"{self.settings.first_byte_timeout_s:g}s.") from None
        except (aiohttp.ClientError, OSError):
            raise UpstreamFailed("The upstream provider could not be reached.") from None
        if response.status < 300:
            return response
        async with response:
            raise await self._refusal(response)

    async def _body(self, response: aiohttp.ClientResponse) -> bytes:
        """A whole answer, each read bounded by the silence timeout, its size by ``MAX_BODY_BYTES``."""
        parts, size = [], 0
        try:
            while True:
                async with asyncio.timeout(self.settings.idle_timeout_s):
                    part = await response.content.readany()
                if not part:
                    return b"".join(parts)
                size += len(part)
                if size > MAX_BODY_BYTES:
                    raise UpstreamFailed("The upstream provider's answer is larger than this gateway takes.")
                parts.append(part)
        except TimeoutError:
            raise UpstreamTimeout("The upstream provider fell silent while sending its answer.") from None
        except (aiohttp.ClientError, OSError):
            raise UpstreamFailed("The upstream provider's answer broke off.") from None

    async def _retried(self, exchange: Callable[[], object], cancel: asyncio.Event) -> object | None:
        """``exchange()``, tried up to ``attempts`` times while it fails in a way worth retrying."""
        s = self.settings
        for attempt in range(1, s.attempts + 1):
            try:
                return await exchange()
            except TollgateError as exc:
                wait = _backoff(exc, attempt, s)
                if attempt == s.attempts or wait is None:
                    raise
                log.warning("upstream %s: try %d of %d failed (%s, %s); again in %.2fs",
                            self.name, attempt, s.attempts, exc.status, exc.code, wait)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await cancel.wait()
            if cancel.is_set():
                return None
        return None

    async def _refusal(self, response: aiohttp.ClientResponse) -> TollgateError:
        """The upstream's non-2xx answer as our error: its fault, ours, or the client's."""
        status, body = response.status, b""
        with contextlib.suppress(Exception):  # the message is a courtesy; the status decides
            async with asyncio.timeout(self.settings.idle_timeout_s):
                body = await response.content.read(_MAX_ERROR_BYTES)
        message, param = self._message(body)
        if status in (401, 403, 404):
            # Our key or our upstream model name: the operator's to fix, nothing the client can change.
            log.error("upstream %s refused this gateway (%d): %s", self.name, status, message)
            return UpstreamUnavailable(f"The upstream provider for this model refused this gateway ({status}); "
                                       "the operator has to fix its configuration.")
        if status == 429:
            err = UpstreamRateLimited(f"The upstream provider is rate limiting this gateway: {message}")
            err.retry_after_s = _retry_after(response.headers.get("Retry-After"))
            return err
        if status == 408:
            return UpstreamTimeout(f"The upstream provider timed out: {message}")
        if status >= 500:  # Anthropic's 529 "overloaded" too
            return UpstreamFailed(f"The upstream provider failed ({status}): {message}")
        return InvalidRequest(f"The upstream provider refused the request: {message}", param=param)

    def _message(self, body: bytes) -> tuple[str, str | None]:
        """An upstream error body's message (scrubbed of our key, cut short) and the field it names."""
        message, param = body.decode(errors="replace"), None
        with contextlib.suppress(msgspec.MsgspecError):
            error = msgspec.json.decode(body, type=_Refusal).error
            if isinstance(error, _ErrorBody):
                message, param = error.message or message, error.param
            elif isinstance(error, str):
                message = error
        return self.scrub(message)[:500], param

    def scrub(self, text: str) -> str:
        """``text`` with our API key, if it holds it, replaced."""
        return text.replace(self._secret, "[redacted]") if self._secret else text


class Forwarding:
    """What every provider backend is: a model served by its upstream, whose connections close with it."""

    def __init__(self, upstream: Upstream):
        self._up = upstream

    async def close(self) -> None:
        """Close the pooled connections (the worker is stopping)."""
        await self._up.close()


def _backoff(exc: TollgateError, attempt: int, s: ProviderSettings) -> float | None:
    """How long to wait before trying again after ``exc``, or None if it is not worth retrying."""
    if not isinstance(exc, (UpstreamFailed, UpstreamTimeout, UpstreamRateLimited)):
        return None
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        # Sooner would be refused again; much later is better spent on the route's next target.
        return retry_after if retry_after <= s.max_backoff_s else None
    return min(s.max_backoff_s, s.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header given in seconds (the form providers send); None otherwise."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds <= 86_400 else None


async def _close_on(cancel: asyncio.Event, response: aiohttp.ClientResponse) -> None:
    await cancel.wait()
    response.close()


def decoder(type_: type) -> Callable[[bytes], object]:
    """A JSON decoder for an upstream answer: what it cannot read is the upstream's fault (502)."""
    typed = msgspec.json.Decoder(type_)

    def decode(data: bytes) -> object:
        try:
            return typed.decode(data)
        except msgspec.MsgspecError:
            raise UpstreamFailed("The upstream provider sent an answer this gateway cannot read.") from None
    return decode
