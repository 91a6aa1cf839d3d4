"""Vision-language chat (captioning, questions about images) with a transformers image-text-to-text model.

Any model ``AutoModelForImageTextToText`` and ``AutoProcessor`` load (Llava, Idefics, SmolVLM,
BLIP-style and others), from a hub id or a local path; its processor's chat template places the
images. A message's images come before its text. Generation, streaming, stop strings and
cancellation are the text chat backend's own.

Usage: ``prompt_tokens`` counts the prompt's text tokens (template included); the tokens the
processor expands each image into are not counted, since each image is priced as one image
(``prices.input_image``) — so a prepaid hold can be bounded before the model is asked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
from typing import AsyncIterator

from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from bus.protocol import ChatBody, ChatMessage
from consumers.backends.base import ChatResult
from consumers.backends.transformers_chat import TransformersChat, model_dtype


class TransformersVision(TransformersChat):
    """A loaded image-text-to-text model and its processor; it serves chat alone."""

    kinds = frozenset({"chat"})

    def __init__(self, path: str, *, device: str = "cpu", compute_type: str = "default", batch: int = 1):
        # The text backend's loading does not apply: the model class differs.
        self.processor = AutoProcessor.from_pretrained(path)
        if not self.processor.chat_template:
            raise ValueError(f"{path} has no chat template in its processor")
        self.tokenizer = self.processor.tokenizer
        dtype = model_dtype(device, compute_type)
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device)
        self.model.eval()
        config = self.model.config.get_text_config()
        self.context_length = int(getattr(config, "max_position_embeddings", 2048))
        self._image_token = getattr(self.processor, "image_token_id", None)
        self._start_batching(batch)

    async def chat(self, body: ChatBody, cancel: asyncio.Event) -> AsyncIterator[str | ChatResult]:
        """Generate the assistant's reply to ``body.messages`` and their images."""
        inputs = await asyncio.to_thread(self._inputs, body.messages)  # decoding and resizing images blocks
        prompt = inputs.pop("input_ids")[0].tolist()
        inputs.pop("attention_mask", None)  # one unpadded sequence: the text backend sets it
        max_new = self._room(prompt, body.max_tokens, "messages")
        text_tokens = sum(1 for t in prompt if t != self._image_token)
        async for item in self._generate(prompt, max_new, body, cancel, inputs):
            yield dataclasses.replace(item, prompt_tokens=text_tokens) if isinstance(item, ChatResult) else item

    def _inputs(self, messages: list[ChatMessage]) -> dict:
        """The processor's tensors for ``messages``: the chat template applied, the images decoded."""
        turns, images = [], []
        for m in messages:
            parts = [{"type": "image"} for _ in m.images] + [{"type": "text", "text": m.content}]
            turns.append({"role": "system" if m.role == "developer" else m.role, "content": parts})
            for data in m.images:
                with Image.open(io.BytesIO(data)) as image:
                    images.append(image.convert("RGB"))
        prompt = self.processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        return dict(self.processor(images=images or None, text=prompt, return_tensors="pt"))
