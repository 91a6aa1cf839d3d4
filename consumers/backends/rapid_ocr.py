"""OCR as a vision chat model: RapidOCR reads the text in a request's images and answers with it.

The PP-OCRv4 detection and recognition models (ONNX, run by onnxruntime) ship inside the
``rapidocr-onnxruntime`` package, so the model needs no weights of its own. The reply is each
image's text, line by line from the top, images apart by a blank line; the messages' text is
not read. There is no tokenizer: a request is priced per image (``prices.input_image``) and its
token counts are zero.
"""

from __future__ import annotations

import asyncio
import io
from typing import AsyncIterator

from PIL import Image

from bus.errors import InvalidRequest
from bus.protocol import ChatBody
from consumers.backends.base import ChatResult


class RapidOcr:
    """The RapidOCR engine, one image at a time in a thread."""

    kinds = frozenset({"chat"})

    def __init__(self):
        from rapidocr_onnxruntime import RapidOCR

        # Detection at PaddleOCR's inference default (longest side at most 960). The package's own
        # setting scales every image's *shortest* side up to 736, which turns a 64 px line of text
        # into a 7000 px image and takes seconds to read no better.
        self._engine = RapidOCR(det_limit_type="max", det_limit_side_len=960)
        # onnxruntime already spreads one image over every core: images are read one at a time.
        self._lock = asyncio.Lock()

    async def chat(self, body: ChatBody, cancel: asyncio.Event) -> AsyncIterator[str | ChatResult]:
        """Yield the text of each image in ``body``'s messages, in order, then the result."""
        images = [image for message in body.messages for image in message.images]
        if not images:
            raise InvalidRequest("This model reads text in images: send at least one image_url part.",
                                 param="messages")
        for i, data in enumerate(images):
            if cancel.is_set():
                yield ChatResult("cancelled", 0, 0)
                return
            async with self._lock:
                text = await asyncio.to_thread(self.read, data)
            yield ("\n\n" if i else "") + text
        yield ChatResult("stop", 0, 0)

    def read(self, data: bytes) -> str:
        """The text in one encoded image: its lines from the top, each line's pieces from the left."""
        with Image.open(io.BytesIO(data)) as image:
            # Transparent parts read as white paper, not as black ink.
            rgba = image.convert("RGBA")
            pixels = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
        found, _ = self._engine(pixels)
        return "\n".join(_lines(found or []))


def _lines(found: list) -> list[str]:
    """RapidOCR's boxes ``[corners, text, score]`` as lines of text: boxes whose heights overlap by
    more than half the shorter one share a line, joined left to right by a space."""
    lines: list[tuple[float, float, list[tuple[float, str]]]] = []  # top, bottom, (left, text) pieces
    for corners, text, _score in found:
        xs, ys = [p[0] for p in corners], [p[1] for p in corners]
        top, bottom = min(ys), max(ys)
        for i, (line_top, line_bottom, pieces) in enumerate(lines):
            overlap = min(bottom, line_bottom) - max(top, line_top)
            if overlap > 0.5 * min(bottom - top, line_bottom - line_top):
                pieces.append((min(xs), text))
                lines[i] = (min(top, line_top), max(bottom, line_bottom), pieces)
                break
        else:
            lines.append((top, bottom, [(min(xs), text)]))
    return [" ".join(text for _, text in sorted(pieces)) for _, _, pieces in sorted(lines, key=lambda line: line[0])]
