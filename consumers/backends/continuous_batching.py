"""Continuous batching for a transformers causal LM: sequences join and leave between decoding steps.

One thread owns the model. Between two decoding steps it takes the sequences that arrived:
each is prefilled alone (its prompt, and a vision model's pixels, in one forward pass), its
first token sampled, and its KV cache joined to the batch's. Then one forward pass decodes the
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
        self._batchable: bool | None = None  # known after the first prefill: plain key/value layers only
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
            try:
                with torch.inference_mode():
                    for s in [s for s in self._active if s.stop.is_set()]:  # their slots are free again
                        self._leave(s)
                    while waiting and len(self._active) < self._room():
                        self._join(waiting.pop(0))
                    if self._active:
                        self._step()
            except Exception as e:  # noqa: BLE001 — every sequence in hand hears of it; the thread lives on
                log.exception("decoding failed")
                for s in self._active:
                    self._finish(s, e)
                self._active, self._cache, self._mask = [], None, None

    def _room(self) -> int:
        return self._max if self._batchable is not False else 1

    def _join(self, s: Sequence) -> None:
        """Prefill ``s`` alone, sample its first token, and add its cache rows to the batch."""
        if s.stop.is_set():
            self._finish(s)
            return
        s.generator = torch.Generator(device=self.device)
        if s.seed is None:
            s.generator.seed()
        else:
            s.generator.manual_seed(s.seed % 2**64)
        ids = torch.tensor([s.prompt], device=self.device)
        try:
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                             **{k: _on(v, self.device) for k, v in s.inputs.items()})
        except Exception as e:  # noqa: BLE001 — a failure of this prompt alone: the batch goes on
            log.exception("prefill failed")
            self._finish(s, e)
            return
        cache = out.past_key_values
        if self._batchable is None:
            self._batchable = all(type(layer) is DynamicLayer for layer in cache.layers)
        s.cached = len(s.prompt)
        self._merge(s, cache)
        self._take(s, self._choose(out.logits[:, -1, :], [s])[0])

    def _merge(self, s: Sequence, cache: DynamicCache) -> None:
        """Join ``cache`` (one sequence) to the batch's, left-padding whichever is shorter."""
        self._active.append(s)
        mask = torch.ones(1, len(s.prompt), dtype=torch.long, device=self.device)
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
        s.failure = failure
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


def _on(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` with zeros before its sequence dimension (keys/values: -2; masks: -1) up to ``width``."""
    dim = -2 if t.dim() == 4 else -1
    short = width - t.shape[dim]
    if short == 0:
        return t
    shape = list(t.shape)
    shape[dim] = short
    return torch.cat([t.new_zeros(shape), t], dim=dim)
