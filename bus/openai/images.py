"""OpenAI image endpoints on the wire: generations and edits, request -> body, final frame -> PNGs.

Both endpoints take the same parameters (edits as multipart form fields, next to the
``image`` and ``mask`` files). The sizes a model offers are the sizes its price table prices
(``Prices.image``), the first one the default; ``quality`` names a number of denoising steps
in the model's ``image_steps``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from bus.account.prices import Charge, Units
from bus.errors import InvalidRequest
from bus.protocol import MAX_IMAGE_PROMPT_CHARACTERS, MAX_IMAGES, ImagesBody, ImagesResult
from bus.settings import ModelSpec


class ImageRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /v1/images/generations`` (JSON) or ``/v1/images/edits`` (its text fields)."""

    model: str
    prompt: Annotated[str, Meta(min_length=1, max_length=MAX_IMAGE_PROMPT_CHARACTERS)]
    n: Annotated[int, Meta(ge=1, le=MAX_IMAGES)] = 1
    size: str = "auto"
    quality: str = "auto"
    response_format: Literal["url", "b64_json"] = "url"  # OpenAI's default for its diffusion models
    output_format: Literal["png"] = "png"
    stream: bool = False  # only False: images come whole, partial images are not drawn
    user: str | None = None
    # Not OpenAI's: the same seed, prompt, size and quality (and upload) draw the same images.
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None


class ImageData(msgspec.Struct, omit_defaults=True):
    b64_json: str | None = None
    url: str | None = None


class ImagesResponse(msgspec.Struct):
    created: int
    data: list[ImageData]
    size: str
    quality: str
    output_format: str = "png"


def to_body(req: ImageRequest, spec: ModelSpec, image: bytes | None = None, mask: bytes | None = None) -> ImagesBody:
    """The bus form of a validated request for an images model ``spec``; 400s name the field."""
    if spec.kind != "images":
        raise InvalidRequest(f"The model '{req.model}' does not make images; it serves {spec.kind}.",
                             param="model", code="model_not_supported")
    if req.stream:
        raise InvalidRequest("Streaming partial images is not supported; images come whole.", param="stream")
    size = req.size
    if size == "auto":
        if not spec.prices.image:
            raise InvalidRequest(f"The model '{req.model}' offers no image sizes.", param="size")
        size = next(iter(spec.prices.image))
    spec.prices.image_price(size)  # a size the price table does not list is not offered: a 400 naming it
    steps = spec.image_steps.get(req.quality)
    if steps is None:
        raise InvalidRequest(f"quality {req.quality!r} is not offered for this model (offered: "
                             f"{', '.join(spec.image_steps)})", param="quality")
    width, height = (int(side) for side in size.split("x"))
    return ImagesBody(prompt=req.prompt, width=width, height=height, n=req.n, steps=steps, image=image, mask=mask,
                      seed=req.seed)


def charge(body: ImagesBody) -> Charge:
    """What admission takes: ``n`` images of the size asked (held at that size's price); each image
    counts as one token against per-minute token limits, as its usage does."""
    return Charge(tokens=body.n, max_units=Units(images={body.size: body.n}))


_result_decoder = msgspec.msgpack.Decoder(ImagesResult)


def pngs(result: bytes) -> list[bytes]:
    """The PNGs of a final frame whose encoded ``ImagesResult`` is ``result``."""
    return _result_decoder.decode(result).images
