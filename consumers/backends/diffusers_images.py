"""Images with diffusers: text-to-image, image-to-image and inpainting from one loaded pipeline.

The weights (a hub id or a local directory in diffusers' layout: SD 1.5, SDXL, SDXL-Turbo, …)
load once through ``AutoPipelineForText2Image``; the image-to-image and inpainting pipelines
are made from it with ``from_pipe``, so all three share the same modules and memory.

Concurrent requests in the same mode (drawn, edited, inpainted), at the same size and number of
steps share one pipeline call, gathered by a batcher (``consumers.batcher``) for at most
``batch_wait_ms`` or until ``max_batch`` images wait: one prompt per image, and one
``torch.Generator`` per request seeded with its ``seed`` (drawn fresh when it names none), so
a request's images are the ones it gets alone. One call at a time per process, in a thread:
torch already uses every core. A call whose every request was cancelled stops at the next
denoising step; a cancelled request among others has its images dropped.
"""

from __future__ import annotations

import asyncio
import io
import math
import threading
from dataclasses import dataclass

import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image
from PIL import Image

from bus.protocol import ImagesBody
from consumers.batcher import Batch, Batcher

_DTYPES = {"default": torch.float32, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Stable Diffusion pipelines refuse sides that are not a multiple of this.
_SIDE_MULTIPLE = 8


class _Stopped(Exception):
    """Raised from the step callback to leave a cancelled drawing at once (the VAE decode included)."""


def open_rgb(data: bytes, size: tuple[int, int]) -> Image.Image:
    """An uploaded image as RGB at ``size`` (what the pipeline draws at)."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB").resize(size, Image.Resampling.LANCZOS)


def open_mask(data: bytes, size: tuple[int, int]) -> Image.Image:
    """An uploaded mask as diffusers wants it: white where the image is repainted.

    OpenAI's masks mark the area to edit as transparent, so a mask with an alpha channel
    repaints where alpha is 0; a mask without one is taken as diffusers' own (white = repaint).
    """
    with Image.open(io.BytesIO(data)) as mask:
        if mask.mode in ("RGBA", "LA", "PA") or "transparency" in mask.info:
            repaint = mask.convert("RGBA").getchannel("A").point(lambda a: 255 if a == 0 else 0)
        else:
            repaint = mask.convert("L")
        return repaint.resize(size, Image.Resampling.NEAREST)


def png(image: Image.Image) -> bytes:
    """``image`` encoded as PNG."""
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@dataclass(frozen=True)
class _Drawing:
    """One request as a pipeline call takes it: its body, and its uploads decoded at the size drawn."""

    body: ImagesBody
    image: Image.Image | None
    mask: Image.Image | None

    @property
    def mode(self) -> str:
        return "draw" if self.image is None else "edit" if self.mask is None else "inpaint"


def _together(drawing: _Drawing) -> tuple:
    """What requests sharing a pipeline call must agree on: the pipeline, the size and the steps."""
    return drawing.mode, drawing.body.width, drawing.body.height, drawing.body.steps


class DiffusersImages:
    """A loaded diffusion pipeline serving generations and edits."""

    kinds = frozenset({"images"})

    def __init__(self, path: str, *, sizes: list[str], device: str = "cpu", compute_type: str = "default",
                 guidance_scale: float | None = None, edit_strength: float = 0.75, max_batch: int = 1,
                 batch_wait_ms: float = 0.0):
        for size in sizes:  # the offered sizes come from the price table: a bad one is found at start
            width, height = (int(side) for side in size.split("x"))
            if width % _SIDE_MULTIPLE or height % _SIDE_MULTIPLE:
                raise ValueError(f"image size {size}: diffusion pipelines need sides that are multiples of "
                                 f"{_SIDE_MULTIPLE}")
        if compute_type not in _DTYPES:
            raise ValueError(f"compute_type {compute_type!r}: diffusers runs {', '.join(_DTYPES)}")
        self.text2image = AutoPipelineForText2Image.from_pretrained(path, dtype=_DTYPES[compute_type]).to(device)
        self.image2image = AutoPipelineForImage2Image.from_pipe(self.text2image)
        self.inpaint = AutoPipelineForInpainting.from_pipe(self.text2image)
        for pipe in (self.text2image, self.image2image, self.inpaint):
            pipe.set_progress_bar_config(disable=True)
        self._guidance = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
        self._strength = edit_strength
        # max_batch counts images: a request of n images takes n (one larger than max_batch runs alone).
        self._batcher: Batcher[_Drawing, list[bytes] | None] = Batcher(
            self._run, kind="images", max_batch=max_batch, wait_s=batch_wait_ms / 1000,
            size=lambda drawing: drawing.body.n, key=_together)

    async def draw(self, body: ImagesBody, cancel: asyncio.Event) -> list[bytes] | None:
        """``body.n`` PNGs, or None if ``cancel`` was set before they were done."""
        drawing = await asyncio.to_thread(self._decoded, body)  # a bad upload fails its own request only
        return await self._batcher.submit(drawing, cancel)

    def _decoded(self, body: ImagesBody) -> _Drawing:
        size = (body.width, body.height)
        return _Drawing(body, None if body.image is None else open_rgb(body.image, size),
                        None if body.mask is None else open_mask(body.mask, size))

    async def _run(self, batch: Batch[_Drawing]) -> list[list[bytes] | None]:
        return await asyncio.to_thread(self._draw, batch.items, batch.abandoned)

    def _draw(self, drawings: list[_Drawing], abandoned: threading.Event) -> list[list[bytes] | None]:
        """One pipeline call for every image of ``drawings`` (in a thread): each request's PNGs, in order."""
        first = drawings[0].body

        def check(pipe, step, timestep, kwargs):
            # Read from this thread: Event.is_set() only reads a flag, and a late read costs one step.
            if abandoned.is_set():
                raise _Stopped
            return kwargs

        prompts, generators, images, masks = [], [], [], []
        for drawing in drawings:
            n = drawing.body.n
            # One generator per request, drawn from for each of its images in turn (the latents, then any
            # noise the scheduler adds), so its images do not depend on who else is in the call.
            generator = torch.Generator()
            if drawing.body.seed is None:
                generator.seed()
            else:
                generator.manual_seed(drawing.body.seed)
            prompts += [drawing.body.prompt] * n
            generators += [generator] * n
            images += [drawing.image] * n
            masks += [drawing.mask] * n
        common = dict(prompt=prompts, generator=generators, num_inference_steps=first.steps, num_images_per_prompt=1,
                      callback_on_step_end=check, **self._guidance)
        try:
            with torch.inference_mode():
                if drawings[0].mode == "draw":
                    out = self.text2image(width=first.width, height=first.height, **common)
                elif drawings[0].mode == "edit":
                    # Image-to-image runs steps x strength of the steps; it must run at least one.
                    common["num_inference_steps"] = max(first.steps, math.ceil(1 / self._strength))
                    out = self.image2image(image=images, strength=self._strength, **common)
                else:
                    out = self.inpaint(image=images, mask_image=masks, width=first.width, height=first.height,
                                       **common)
        except _Stopped:
            return [None] * len(drawings)
        pngs = [png(image) for image in out.images]
        results = []
        for drawing in drawings:
            results.append(pngs[:drawing.body.n])
            pngs = pngs[drawing.body.n:]
        return results
