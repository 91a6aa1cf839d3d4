"""Images with diffusers: text-to-image, image-to-image and inpainting from one loaded pipeline.

The weights (a hub id or a local directory in diffusers' layout: SD 1.5, SDXL, SDXL-Turbo, …)
load once through ``AutoPipelineForText2Image``; the image-to-image and inpainting pipelines
are made from it with ``from_pipe``, so all three share the same modules and memory.

One drawing at a time per process, in a thread: torch already uses every core. A cancelled
request stops at the next denoising step.
"""

from __future__ import annotations

import asyncio
import io
import math
import threading

import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image
from PIL import Image

from bus.protocol import ImagesBody

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


class DiffusersImages:
    """A loaded diffusion pipeline serving generations and edits."""

    kinds = frozenset({"images"})

    def __init__(self, path: str, *, sizes: list[str], device: str = "cpu", compute_type: str = "default",
                 guidance_scale: float | None = None, edit_strength: float = 0.75):
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
        self._lock = asyncio.Lock()

    async def draw(self, body: ImagesBody, cancel: asyncio.Event) -> list[bytes] | None:
        """``body.n`` PNGs, or None if ``cancel`` was set before they were done."""
        stop = threading.Event()  # set if this coroutine is cancelled while the thread runs
        async with self._lock:
            work = asyncio.ensure_future(asyncio.to_thread(self._draw, body, cancel, stop))
            try:
                return await asyncio.shield(work)
            finally:
                if not work.done():  # cancelled: the pipeline is free again before the lock is
                    stop.set()
                    await asyncio.wait({work})

    def _draw(self, body: ImagesBody, cancel: asyncio.Event, stop: threading.Event) -> list[bytes] | None:
        """One pipeline call for all ``body.n`` images (in a thread)."""
        size = (body.width, body.height)

        def check(pipe, step, timestep, kwargs):
            # Read from this thread: Event.is_set() only reads a flag, and a late read costs one step.
            if cancel.is_set() or stop.is_set():
                raise _Stopped
            return kwargs

        common = dict(prompt=body.prompt, num_inference_steps=body.steps, num_images_per_prompt=body.n,
                      callback_on_step_end=check, **self._guidance)
        try:
            with torch.inference_mode():
                if body.image is None:
                    out = self.text2image(width=body.width, height=body.height, **common)
                elif body.mask is None:
                    # Image-to-image runs steps x strength of the steps; it must run at least one.
                    common["num_inference_steps"] = max(body.steps, math.ceil(1 / self._strength))
                    out = self.image2image(image=open_rgb(body.image, size), strength=self._strength, **common)
                else:
                    out = self.inpaint(image=open_rgb(body.image, size), mask_image=open_mask(body.mask, size),
                                       width=body.width, height=body.height, **common)
        except _Stopped:
            return None
        return [png(image) for image in out.images]
