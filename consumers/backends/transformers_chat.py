"""Chat and text completions with a transformers causal LM, decoded in continuous batches and streamed token by token."""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bus.errors import InvalidRequest
from bus.protocol import ChatBody, ChatMessage, CompletionBody
from consumers.backends.base import ChatResult
from consumers.backends.continuous_batching import ContinuousBatch, Sequence

# Weights' precision by ModelSpec.compute_type ("default": float32 on the CPU, the checkpoint's own on a GPU).
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TransformersChat:
    """A loaded causal LM and its tokenizer with a chat template: chat, raw-prompt completions, tokenizing."""

    kinds = frozenset({"chat", "completions"})

    def __init__(self, path: str, *, device: str = "cpu", compute_type: str = "default", batch: int = 1):
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if not self.tokenizer.chat_template:
            raise ValueError(f"{path} has no chat template")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=model_dtype(device, compute_type)).to(device)
        self.model.eval()
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self._start_batching(batch)

    def _start_batching(self, batch: int) -> None:
        """Decode up to ``batch`` requests together (the worker's slots), ending each at an end token."""
        self._batch = ContinuousBatch(self.model, set(_as_list(self.tokenizer.eos_token_id)), batch)

    def chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        """The prompt ids chat generates from: ``messages`` through the chat template."""
        turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in messages]
        encoded = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt ids completions generate from: the raw text, with the tokenizer's own special tokens."""
        return list(self.tokenizer(prompt)["input_ids"])

    def text_of(self, ids: list[int]) -> str:
        """The text of ``ids``, special tokens included (what was tokenized comes back as it was)."""
        if any(i >= len(self.tokenizer) for i in ids):  # decode() would drop them without a word
            raise InvalidRequest("tokens holds an id outside this model's vocabulary.", param="tokens")
        return self.tokenizer.decode(ids)

    async def chat(self, body: ChatBody, cancel: asyncio.Event) -> AsyncIterator[str | ChatResult]:
        """Generate the assistant's reply to ``body.messages``."""
        prompt = self.chat_ids(body.messages)
        max_new = self._room(prompt, body.max_tokens, "messages")
        async for item in self._generate(prompt, max_new, body, cancel):
            yield item

    async def complete(self, body: CompletionBody, cancel: asyncio.Event) -> AsyncIterator[str | ChatResult]:
        """Continue ``body.prompt`` as raw text; with ``echo`` the prompt comes first."""
        prompt = self.prompt_ids(body.prompt)
        max_new = self._room(prompt, body.max_tokens, "prompt")  # before the echo: a refusal keeps its 400
        if body.echo:
            yield body.prompt
        async for item in self._generate(prompt, max_new, body, cancel):
            yield item

    def _room(self, prompt: list[int], max_tokens: int | None, param: str) -> int:
        """How many tokens may be generated after ``prompt``, or the 400 saying it does not fit."""
        room = self.context_length - len(prompt)
        if room <= 0 or (max_tokens or 0) > room:
            raise InvalidRequest(
                f"This model's maximum context length is {self.context_length} tokens; the {param} take "
                f"{len(prompt)} and max_tokens asks for {max_tokens or 0} more.",
                param=param,
                code="context_length_exceeded",
            )
        return max_tokens or room

    async def _generate(self, prompt: list[int], max_new: int, body: ChatBody | CompletionBody,
                        cancel: asyncio.Event, inputs: dict | None = None) -> AsyncIterator[str | ChatResult]:
        """Sample up to ``max_new`` tokens after ``prompt`` with ``body``'s sampling and stop strings, in
        the running batch; ``inputs`` are more of the model's prefill inputs (a vision model's pixel values)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()  # bounded by max_new: one item per token, and the end
        sequence = Sequence(
            prompt=prompt, max_new=max_new,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=body.top_p or 1.0, seed=body.seed,
            emit=lambda token: loop.call_soon_threadsafe(queue.put_nowait, None if token is None else [token]),
            stop=threading.Event(), inputs=inputs or {},
        )
        self._batch.submit(sequence)
        try:
            async for item in _texts(self.tokenizer, queue, body.stop, sequence.stop, cancel, max_new, len(prompt)):
                if isinstance(item, ChatResult) and sequence.failure is not None:
                    raise sequence.failure  # the runtime reports it; nothing is billed as a result
                yield item
        finally:
            sequence.stop.set()  # the batch drops it at its next step, however the reader ended


def model_dtype(device: str, compute_type: str) -> torch.dtype | str:
    """The dtype to load weights in: ``compute_type`` if it names one, else float32 on a CPU and
    the checkpoint's own elsewhere."""
    if compute_type in _DTYPES:
        return _DTYPES[compute_type]
    return torch.float32 if device == "cpu" else "auto"


async def _texts(tokenizer, queue: asyncio.Queue, stops: list[str], stop_now: threading.Event,
                 cancel: asyncio.Event, max_new: int, prompt_tokens: int) -> AsyncIterator[str | ChatResult]:
    """Turn token ids into text pieces, holding back any tail that could begin a stop string."""
    eos = set(_as_list(tokenizer.eos_token_id))
    ids: list[int] = []
    sent = 0
    holdback = max((len(s) for s in stops), default=1) - 1
    finish, matched = "length", None
    cancel_wait = asyncio.ensure_future(cancel.wait())
    try:
        while True:
            get = asyncio.ensure_future(queue.get())
            await asyncio.wait({get, cancel_wait}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                finish = "cancelled"
                break
            new = get.result()
            if new is None:
                break
            for token_id in new:
                ids.append(token_id)
                if token_id in eos:
                    finish = "stop"
                    break
            text = tokenizer.decode(ids, skip_special_tokens=True)
            cut, stop = _first_stop(text, stops)
            if cut is not None or finish == "stop":
                finish, matched = "stop", stop
                text = text if cut is None else text[:cut]
                if len(text) > sent:
                    yield text[sent:]
                sent = len(text)
                break
            safe = len(text) - holdback
            while safe > sent and text[safe - 1] == "\ufffd":  # an incomplete UTF-8 sequence
                safe -= 1
            if safe > sent:
                yield text[sent:safe]
                sent = safe
        if finish == "length":
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if len(text) > sent:
                yield text[sent:]
    finally:
        stop_now.set()
        cancel_wait.cancel()
    yield ChatResult(finish, prompt_tokens, min(len(ids), max_new), matched)


def _first_stop(text: str, stops: list[str]) -> tuple[int | None, str | None]:
    """Where the earliest stop string in ``text`` begins, and which it is; (None, None) if none is there."""
    found = [(i, s) for s in stops if (i := text.find(s)) >= 0]
    return min(found) if found else (None, None)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
