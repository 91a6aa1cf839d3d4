"""Chat and text completions with a transformers causal LM, generated in a thread and streamed token by token."""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from bus.errors import InvalidRequest
from bus.protocol import ChatBody, ChatMessage, CompletionBody
from consumers.backends.base import ChatResult


class _TokenPipe(BaseStreamer):
    """Hands generated token ids from the generation thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self._loop, self._queue = loop, queue
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first echoes the prompt
            self._prompt_seen = True
            return
        self._loop.call_soon_threadsafe(self._queue.put_nowait, value.reshape(-1).tolist())

    def end(self) -> None:
        """The end marker is sent by the generation thread itself, even when it fails."""


class _StopWhen(StoppingCriteria):
    def __init__(self, flag: threading.Event):
        self._flag = flag

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self._flag.is_set(), dtype=torch.bool)


class TransformersChat:
    """A loaded causal LM and its tokenizer with a chat template: chat, raw-prompt completions, tokenizing."""

    kinds = frozenset({"chat", "completions"})

    def __init__(self, path: str):
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.model.eval()
        if not self.tokenizer.chat_template:
            raise ValueError(f"{path} has no chat template")
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        # One generation at a time per process: torch already uses every core for one.
        self._lock = asyncio.Lock()

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
        """Sample up to ``max_new`` tokens after ``prompt`` with ``body``'s sampling and stop strings;
        ``inputs`` are more of the model's inputs (a vision model's pixel values)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop_now = threading.Event()
        greedy = body.temperature == 0
        kwargs = dict(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=not greedy,
            streamer=_TokenPipe(loop, queue),
            stopping_criteria=StoppingCriteriaList([_StopWhen(stop_now)]),
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            **(inputs or {}),
        )
        if not greedy:
            kwargs.update(temperature=1.0 if body.temperature is None else body.temperature, top_p=body.top_p or 1.0, top_k=0)

        def generate() -> None:
            try:
                if body.seed is not None:
                    transformers.set_seed(body.seed % 2**32)  # numpy's seed range; OpenAI allows any int64
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            finally:
                # However generation ends, the reader must hear of it, or it waits until the deadline.
                loop.call_soon_threadsafe(queue.put_nowait, None)

        async with self._lock:
            job = loop.run_in_executor(None, generate)
            try:
                async for item in _texts(self.tokenizer, queue, body.stop, stop_now, cancel, max_new, len(prompt)):
                    yield item
            finally:
                stop_now.set()
                await job  # re-raises a failure in generate(), which the runtime reports


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
