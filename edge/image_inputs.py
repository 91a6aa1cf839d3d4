"""Images in chat requests (``image_url`` parts): read from data URLs or fetched, then checked, at the edge.

A data URL is decoded here. An http(s) URL is fetched only from a host the operator lists
(``edge.images.fetch_hosts``; none by default) and only from a public address: the literal
address is checked first, and a host name connects through ``bus.destinations.GuardedResolver``,
so loopback, private, link-local and metadata addresses are never reached, whatever the name
resolves to. Fetches follow no redirect and stop at ``fetch_max_bytes`` and ``fetch_timeout_s``.

Every image must open with Pillow as PNG, JPEG, WebP or GIF, within ``max_pixels``, and decode
whole; decoding runs in a thread. Whatever is wrong is a 400 naming the part, before admission.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from typing import Callable

import aiohttp
from PIL import Image

from bus.account.webhook_policy import url_host
from bus.destinations import DestinationRefused, GuardedResolver, is_public, parse_address
from bus.errors import InvalidRequest
from bus.openai.chat import ImageRef
from bus.settings import ImageInputSettings

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
_READ_CHUNK = 64 * 1024


def _public(host: str, address: str) -> bool:
    """An image host's address rule: public addresses only, allowlisted host or not."""
    ip = parse_address(address)
    return ip is not None and is_public(ip)


class ImageInputs:
    """Reads a request's images under the operator's limits; one per edge process."""

    def __init__(self, settings: ImageInputSettings, address_allowed: Callable[[str, str], bool] = _public):
        """``address_allowed(host, address)``: where fetches may connect; public addresses only, except in
        tests of the fetch limits, which need a server on this machine."""
        self.settings = settings
        self._hosts = {h.strip().lower().rstrip(".") for h in settings.fetch_hosts}
        self._address_allowed = address_allowed
        # No DNS cache: every fetch checks what the name resolves to now. No proxy from the environment.
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(address_allowed), use_dns_cache=False)
        self._http = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(
            total=settings.fetch_timeout_s))

    async def close(self) -> None:
        await self._http.close()

    async def load(self, refs: list[ImageRef]) -> list[bytes]:
        """The bytes of each image in ``refs``, in order, each checked; a 400 naming the first bad one found."""
        if len(refs) > self.settings.max_images:
            raise InvalidRequest(f"{len(refs)} images in one request; at most {self.settings.max_images} are read.",
                                 param="messages")
        tasks = [asyncio.ensure_future(self._one(ref)) for ref in refs]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:  # one refused image (or a client gone) stops the others' fetches
                task.cancel()

    async def _one(self, ref: ImageRef) -> bytes:
        if ref.url.startswith("data:"):
            return await asyncio.to_thread(self._from_data_url, ref)
        if ref.url.lower().startswith(("http://", "https://")):
            data = await self._fetch(ref)
            await asyncio.to_thread(self._check, data, ref)
            return data
        raise InvalidRequest("image_url must be a data URL (data:image/png;base64,...) or an http(s) URL.",
                             param=ref.param)

    def _from_data_url(self, ref: ImageRef) -> bytes:
        header, comma, payload = ref.url.partition(",")
        media_type, *options = header.removeprefix("data:").split(";")
        if not comma or not media_type.lower().startswith("image/") or "base64" not in options:
            raise InvalidRequest("A data URL image must be data:image/<type>;base64,<data>.", param=ref.param)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest("The data URL's base64 data cannot be decoded.", param=ref.param) from None
        self._check(data, ref)
        return data

    def _check(self, data: bytes, ref: ImageRef) -> None:
        """Refuse what is not a PNG, JPEG, WebP or GIF within ``max_pixels`` that decodes whole."""
        try:
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                width, height = image.size  # from the header: a huge image is refused before it is decoded
                if width * height > self.settings.max_pixels:
                    raise InvalidRequest(f"The image is {width}x{height}; images of at most "
                                         f"{self.settings.max_pixels} pixels are read.", param=ref.param)
                image.load()
        except InvalidRequest:
            raise
        except Exception:  # Pillow raises many kinds for data that is not an image or is cut short
            raise InvalidRequest("The image is not a PNG, JPEG, WebP or GIF image that can be decoded.",
                                 param=ref.param) from None

    async def _fetch(self, ref: ImageRef) -> bytes:
        host = url_host(ref.url)
        if host not in self._hosts:
            raise InvalidRequest(f"Images are not fetched from {host or 'this URL'}: send the image as a data URL, "
                                 "or ask the operator to allow the host (edge.images.fetch_hosts).", param=ref.param)
        if parse_address(host) is not None and not self._address_allowed(host, host):
            raise _private(host, ref)  # aiohttp connects to a literal address without resolving it
        limit = self.settings.fetch_max_bytes
        try:
            async with self._http.get(ref.url, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise InvalidRequest(f"Fetching the image from {host} answered HTTP {resp.status}.",
                                         param=ref.param)
                if (resp.content_length or 0) > limit:
                    raise _too_big(limit, ref)
                data = bytearray()
                async for chunk in resp.content.iter_chunked(_READ_CHUNK):
                    data += chunk
                    if len(data) > limit:
                        raise _too_big(limit, ref)
                return bytes(data)
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, DestinationRefused):
                raise _private(host, ref) from None
            raise InvalidRequest(f"The image could not be fetched from {host}.", param=ref.param) from None
        except aiohttp.InvalidURL:  # a host such as 2130706433 that a resolver would read as an address
            raise InvalidRequest("The image URL is not valid.", param=ref.param) from None
        except asyncio.TimeoutError:
            raise InvalidRequest(f"Fetching the image from {host} took longer than "
                                 f"{self.settings.fetch_timeout_s:g} s.", param=ref.param) from None
        except aiohttp.ClientError:
            raise InvalidRequest(f"The image could not be fetched from {host}.", param=ref.param) from None


def _private(host: str, ref: ImageRef) -> InvalidRequest:
    return InvalidRequest(f"Images are never fetched from {host}: loopback, private, link-local and metadata "
                          "addresses are refused.", param=ref.param)


def _too_big(limit: int, ref: ImageRef) -> InvalidRequest:
    return InvalidRequest(f"The image is larger than {limit} bytes, the most fetched.", param=ref.param)
