"""POST /v1/images/generations and /v1/images/edits: validate, admit, publish, answer with PNGs.

Uploaded images are decoded here, in a thread, before admission: a file that is not an
image, or a mask of another size, is a 400 naming it, never billed and never stored.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time

import msgspec
from aiohttp import web
from PIL import Image

from bus.blobs import read_result
from bus.errors import InvalidRequest
from bus.openai.decoding import decode_json
from bus.openai.images import ImageData, ImageRequest, ImagesResponse, charge, pngs, to_body
from bus.openai.service_tier import lane_for
from bus.publisher import Publisher
from edge import image_links
from edge.admission import Gate
from edge.auth import Principal
from edge.forms import Form, read_form, takes_form
from edge.replies import REQUEST_ID_HEADER, published
from edge.state import AUTH, GATE, PUBLISHER

_encode = msgspec.json.Encoder().encode
_FORMATS = ("PNG", "JPEG", "WEBP")  # what OpenAI's edits take
_MAX_PIXELS = 4096 * 4096  # checked from the header, before a large image is decoded

routes = web.RouteTableDef()


@routes.post("/v1/images/generations")
async def generations(request: web.Request) -> web.Response:
    """Images drawn from the prompt alone."""
    principal = request.config_dict[AUTH].authenticate(request, "images")
    req = decode_json(await request.read(), ImageRequest)
    return await _draw(request, principal, req)


@routes.post("/v1/images/edits")
@takes_form
async def edits(request: web.Request) -> web.Response:
    """Image-to-image without a ``mask``; inpainting where the mask is transparent with one."""
    principal = request.config_dict[AUTH].authenticate(request, "images")
    form = await read_form(request, file_fields=frozenset({"image", "image[]", "mask"}))
    req = form.convert(ImageRequest)
    image = _one_image(form)
    mask = form.file("mask").data if "mask" in form.files else None
    await asyncio.to_thread(_check_uploads, image, mask)
    return await _draw(request, principal, req, image, mask)


def _one_image(form: Form) -> bytes:
    """The one ``image`` file (the SDK names it ``image[]`` when given a list)."""
    uploads = form.files.get("image", []) + form.files.get("image[]", [])
    if len(uploads) != 1:
        raise InvalidRequest(f"'image' takes exactly one file, got {len(uploads)}", param="image")
    return uploads[0].data


def _size(data: bytes, param: str) -> tuple[int, int]:
    """The width and height of an uploaded image once all of it decodes; a 400 naming ``param`` otherwise."""
    try:
        with Image.open(io.BytesIO(data), formats=_FORMATS) as image:  # no other decoder sees the bytes
            if image.width * image.height > _MAX_PIXELS:
                raise InvalidRequest(f"'{param}' has more than {_MAX_PIXELS} pixels.", param=param)
            image.load()  # a truncated or corrupt file fails here, not in the worker
            return image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise InvalidRequest(f"'{param}' is not an image we can read (PNG, JPEG or WebP).", param=param) from None


def _check_uploads(image: bytes, mask: bytes | None) -> None:
    """Both files decode, and the mask is the image's size (blocking: run in a thread)."""
    size = _size(image, "image")
    if mask is not None and (mask_size := _size(mask, "mask")) != size:
        raise InvalidRequest(f"The mask is {mask_size[0]}x{mask_size[1]}; it must be the image's size, "
                             f"{size[0]}x{size[1]}.", param="mask")


async def _draw(request: web.Request, principal: Principal, req: ImageRequest, image: bytes | None = None,
                mask: bytes | None = None) -> web.Response:
    """Admit and publish one images request; answer its PNGs inline or as links."""
    publisher: Publisher = request.config_dict[PUBLISHER]
    gate: Gate = request.config_dict[GATE]
    spec, policy = gate.model_for(principal, req.model)
    body = to_body(req, spec, image, mask)
    admitted = await gate.admit(principal=principal, model=req.model, spec=spec, policy=policy,
                                lane=lane_for(None, policy), charge=charge(body))
    async with published(publisher, gate, admitted, kind="images", body=body) as call:
        async for final in call.frames():
            pass  # images send no deltas: the one frame is the final one
        images = pngs(await read_result(publisher.js, final) or final.result)  # most come by blob
        if req.response_format == "url":
            data = [ImageData(url=url) for url in await image_links.store(request, call.envelope.id, images)]
        else:
            data = [ImageData(b64_json=base64.b64encode(png).decode()) for png in images]
        answer = ImagesResponse(created=int(time.time()), data=data, size=body.size, quality=req.quality)
        headers = {**admitted.limits.headers, REQUEST_ID_HEADER: call.envelope.id}
        return web.Response(body=_encode(answer), content_type="application/json", headers=headers)
