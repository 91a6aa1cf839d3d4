"""Continuous batching for a transformers causal LM: sequences join and leave between decoding steps.

One thread owns the model. Between two decoding steps it takes the sequences that arrived:
their prompts are prefilled together (left-padded into one forward pass; a prompt with a vision
model's pixels alone), their first tokens sampled, and their KV caches joined to the batch's. Then one forward pass decodes the
next token of every sequence at once. A sequence leaves when it samples an end token, reaches
its ``max_new`` tokens or is told to stop; its rows leave the cache with it.

The batch's cache is left-padded: every sequence's keys end at the same column, shorter ones
start later, and the attention mask hides the padding. Positions are each sequence's own, so a
sequence sees exactly the keys it would see alone. Sampling is per sequence: its own
temperature, top-p and ``torch.Generator`` seeded from its request, so a seeded request draws
the same numbers whatever else is in the batch.

Why not transformers' own continuous batching (``generate_batch`` / ``init_continuous_batching``):
it samples with one generation config and one seed for the whole manager, so greedy and sampled
requests, or two seeds, cannot share a batch — and per-request seeds are part of the API.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from consumers import metrics

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Sequence:
    """One request's decoding: what it asks for, where its tokens go, and its place in the batch."""

    prompt: list[int]
    max_new: int
    temperature: float  # 0: greedy
    top_p: float
    seed: int | None
    # Called from the decoding thread with each new token id, then with None once the sequence ends.
    emit: Callable[[int | None], None]
    stop: threading.Event  # set by the reader: a stop string matched, the client left, cancelled
    inputs: dict = field(default_factory=dict)  # more of the model's prefill inputs (pixel values)
    failure: BaseException | None = None  # why decoding failed, if it did
    generated: int = 0
    cached: int = 0  # the sequence's real tokens in the cache: the position of its next token
    last: int = 0  # the token fed to the next step
    generator: torch.Generator | None = None
    ended: bool = False  # its end was emitted


class ContinuousBatch:
    """Decodes up to ``max_sequences`` sequences together on ``model``, in a thread of its own."""

    def __init__(self, model, eos_ids: set[int], max_sequences: int):
        self.model = model
        self.device = model.device
        self._eos = eos_ids
        self._max = max_sequences
        self._arrivals: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self._active: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [batch, cache columns]: 1 where a real key is
        # Caches of plain key/value layers join and split by rows; others (sliding-window,
        # linear-attention layers) decode one sequence at a time.
        self._batchable = all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)
        self._thread = threading.Thread(target=self._run, name="continuous-batch", daemon=True)
        self._thread.start()

    def submit(self, sequence: Sequence) -> None:
        """Queue ``sequence`` to join the batch at the next step; the caller keeps at most
        ``max_sequences`` submitted and unfinished (the worker's slots)."""
        self._arrivals.put(sequence)

    def _run(self) -> None:
        waiting: list[Sequence] = []
        while True:
            if not self._active and not waiting:
                waiting.append(self._arrivals.get())  # idle: sleep until a request comes
            while True:
                try:
                    waiting.append(self._arrivals.get_nowait())
                except queue.Empty:
                    break
            for s in [s for s in waiting if s.stop.is_set()]:  # left while waiting (the worker took another)
                waiting.remove(s)
                self._finish(s)
            joiners: list[Sequence] = []
            try:
                with torch.inference_mode():
                    for s in [s for s in self._active if s.stop.is_set()]:  # their slots are free again
                        self._leave(s)
                    room = self._room() - len(self._active)
                    if waiting and room > 0:
                        joiners, waiting = waiting[:room], waiting[room:]
                        self._admit(joiners)
                    if self._active:
                        self._step()
            except Exception as e:  # noqa: BLE001 — every sequence in hand hears of it; the thread lives on
                log.exception("decoding failed")
                for s in [*self._active, *joiners]:  # joiners too: a failure mid-admission had not added all
                    if not s.ended:
                        self._finish(s, e)
                self._active, self._cache, self._mask = [], None, None

    def _room(self) -> int:
        return self._max if self._batchable else 1

    def _admit(self, joiners: list[Sequence]) -> None:
        """Prefill ``joiners`` — plain prompts together in one forward pass, prompts with more inputs
        (a vision model's pixels) one by one — sample their first tokens and add them to the batch."""
        for s in joiners:
            s.generator = torch.Generator(device=self.device)
            if s.seed is None:
                s.generator.seed()
            else:
                s.generator.manual_seed(s.seed % 2**64)
        plain = [s for s in joiners if not s.inputs]
        for group in [[s] for s in joiners if s.inputs] + ([plain] if plain else []):
            try:
                logits, cache, mask = self._prefill(group)
            except Exception as e:  # noqa: BLE001 — a failure of these prompts alone: the batch goes on
                log.exception("prefill failed")
                for s in group:
                    self._finish(s, e)
                continue
            self._merge(group, cache, mask)
            for s, token in zip(group, self._choose(logits, group)):
                self._take(s, token)

    def _prefill(self, group: list[Sequence]) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """One forward pass over ``group``'s prompts, left-padded to one width: the last position's
        logits of each, their cache, and its mask."""
        width = max(len(s.prompt) for s in group)
        ids = torch.tensor([[0] * (width - len(s.prompt)) + s.prompt for s in group], device=self.device)
        mask = torch.tensor([[0] * (width - len(s.prompt)) + [1] * len(s.prompt) for s in group], device=self.device)
        extra = {k: _on(v, self.model) for k, v in group[0].inputs.items()}  # a group with inputs is one sequence
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         use_cache=True, **extra)
        for s in group:
            s.cached = len(s.prompt)
        return out.logits[:, -1, :], out.past_key_values, mask

    def _merge(self, group: list[Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Join ``group``'s ``cache`` to the batch's, left-padding whichever is shorter."""
        self._active.extend(group)
        if self._cache is None:
            self._cache, self._mask = cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        self._mask = torch.cat([_pad_left(self._mask, width), _pad_left(mask, width)])

    def _step(self) -> None:
        """Decode one token for every active sequence in one forward pass."""
        batch = self._active
        metrics.batched("chat", len(batch))  # one forward pass: chat and completions sequences alike
        ids = torch.tensor([[s.last] for s in batch], device=self.device)
        positions = torch.tensor([[s.cached] for s in batch], device=self.device)
        self._mask = torch.cat([self._mask, torch.ones(len(batch), 1, dtype=torch.long, device=self.device)], dim=1)
        out = self.model(input_ids=ids, attention_mask=self._mask, position_ids=positions,
                         past_key_values=self._cache, use_cache=True)
        for s in batch:
            s.cached += 1
        for s, token in zip(batch, self._choose(out.logits[:, -1, :], batch)):
            self._take(s, token)

    def _take(self, s: Sequence, token: int) -> None:
        """Hand ``token`` to ``s``'s reader; drop ``s`` from the batch if it is done."""
        s.generated += 1
        s.last = token
        s.emit(token)
        if token in self._eos or s.generated >= s.max_new or s.stop.is_set():
            self._leave(s)

    def _leave(self, s: Sequence) -> None:
        keep = [i for i, other in enumerate(self._active) if other is not s]
        self._finish(s)
        self._active = [self._active[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, device=self.device)
        # Columns that are padding in every remaining row go too: the cache shrinks as long sequences leave.
        start = int(self._mask.shape[1] - max(o.cached for o in self._active))
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        self._mask = self._mask[index, start:]

    def _finish(self, s: Sequence, failure: BaseException | None = None) -> None:
        s.failure, s.ended = failure, True
        s.emit(None)

    def _choose(self, logits: torch.Tensor, batch: list[Sequence]) -> list[int]:
        """The next token of each sequence in ``batch``, from its row of ``logits``, by its own sampling."""
        chosen = logits.argmax(dim=-1).tolist()
        for i, s in enumerate(batch):
            if s.temperature > 0:
                chosen[i] = _sample(logits[i].float(), s.temperature, s.top_p, s.generator)
        return chosen


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Draw a token from ``softmax(logits / temperature)`` cut to its ``top_p`` nucleus."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=generator))
    ranked, order = probs.sort(descending=True)
    ranked[(ranked.cumsum(-1) - ranked) >= top_p] = 0  # the most likely token always stays
    return int(order[torch.multinomial(ranked, 1, generator=generator)])


def _on(value, model):
    """A prefill input on ``model``'s device; pixel values in its dtype too (a half-precision model on a GPU)."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(model.device, dtype=model.dtype) if value.is_floating_point() else value.to(model.device)


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` with zeros before its sequence dimension (keys/values: -2; masks: -1) up to ``width``."""
    dim = -2 if t.dim() == 4 else -1
    short = width - t.shape[dim]
    if short == 0:
        return t
    shape = list(t.shape)
    shape[dim] = short
    return torch.cat([t.new_zeros(shape), t], dim=dim)
