"""Embeddings with a sentence-transformers model, run through transformers' AutoModel.

The model directory's own sentence-transformers files say how token vectors become one
vector per input: ``modules.json`` lists the modules (Transformer, Pooling, optionally
Normalize), ``1_Pooling/config.json`` the pooling modes, ``sentence_bert_config.json`` the
longest sequence (longer inputs are truncated to it, as sentence-transformers does).

Concurrent requests share forward passes: a batcher (``consumers.batcher``) collects their inputs
for at most ``batch_wait_ms`` or until ``max_batch`` inputs wait, then runs them together in a thread.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from bus.errors import InvalidRequest
from bus.protocol import EmbeddingsBody
from consumers.backends.base import Embedded
from consumers.batcher import Batch, Batcher

_TRANSFORMER, _POOLING, _NORMALIZE = (f"sentence_transformers.models.{name}"
                                      for name in ("Transformer", "Pooling", "Normalize"))
_POOLING_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens")


def _pool(mode: str, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One sentence-transformers pooling mode over the unpadded tokens of each row."""
    if mode == "cls_token":
        return hidden[:, 0]
    if mode == "max_tokens":
        return hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values
    counts = mask.sum(dim=1).clamp(min=1)
    summed = (hidden * mask).sum(dim=1)
    return summed / (counts if mode == "mean_tokens" else counts.sqrt())


class SentenceEmbeddings:
    """A loaded sentence-transformers model and the batcher that feeds it."""

    kinds = frozenset({"embeddings"})

    def __init__(self, path: str, *, max_batch: int, batch_wait_ms: float, matryoshka: bool = False):
        root = Path(path)
        modules = json.loads((root / "modules.json").read_text())
        types = [m["type"] for m in modules]
        if types[:2] != [_TRANSFORMER, _POOLING] or types[2:] not in ([], [_NORMALIZE]):
            raise ValueError(f"{path}: modules {types} are not Transformer, Pooling[, Normalize]")
        pooling = json.loads((root / modules[1]["path"] / "config.json").read_text())
        self._modes = [m for m in _POOLING_MODES if pooling.get(f"pooling_mode_{m}")]
        unsupported = [k for k, on in pooling.items() if k.startswith("pooling_mode_") and on
                       and k.removeprefix("pooling_mode_") not in _POOLING_MODES]
        if not self._modes or unsupported:
            raise ValueError(f"{path}: pooling {pooling} is not one of {_POOLING_MODES}")
        self._normalize = _NORMALIZE in types
        st_config = root / "sentence_bert_config.json"
        st = json.loads(st_config.read_text()) if st_config.exists() else {}
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32)
        self.model.eval()
        self.max_tokens = int(st.get("max_seq_length") or self.tokenizer.model_max_length)
        # The special tokens the tokenizer puts around one sequence ([CLS] … [SEP] here), found by
        # asking it: token-id inputs get the same ones as texts.
        probe = self.tokenizer("a", return_special_tokens_mask=True)
        ids, special = probe["input_ids"], probe["special_tokens_mask"]
        first, last = special.index(0), len(special) - special[::-1].index(0)
        self._prefix, self._suffix = ids[:first], ids[last:]
        self._lower = bool(st.get("do_lower_case"))
        self.dimensions = pooling["word_embedding_dimension"] * len(self._modes)
        self._matryoshka = matryoshka
        self._max_batch = max_batch
        # An item is one request's rows of token ids; it takes len(rows) of max_batch.
        self._batcher: Batcher[list[list[int]], list[bytes]] = Batcher(
            self._run, kind="embeddings", max_batch=max_batch, wait_s=batch_wait_ms / 1000, size=len)
        self.passes = 0  # forward passes run: what batching saves is visible here

    # -- one request ------------------------------------------------------------------

    async def embed(self, body: EmbeddingsBody, cancel: asyncio.Event) -> Embedded | None:
        """Embed ``body``'s inputs in order; None if ``cancel`` was set before they were done."""
        if body.dimensions is not None and (not self._matryoshka or body.dimensions > self.dimensions):
            raise InvalidRequest(f"This model makes {self.dimensions}-dimensional vectors and cannot shorten them "
                                 f"to {body.dimensions}.", param="dimensions")
        rows = await asyncio.to_thread(self._token_ids, body.inputs)  # a large request's tokenizing blocks
        vectors = await self._batcher.submit(rows, cancel)
        if vectors is None:
            return None
        if body.dimensions is not None:
            vectors = [self._shorten(v, body.dimensions) for v in vectors]
        return Embedded(vectors, sum(len(r) for r in rows))

    def _token_ids(self, inputs: list) -> list[list[int]]:
        """Each input's token ids as the model reads them: cut to fit ``max_tokens`` with the special
        tokens around it, so a text and its token ids give the same vector."""
        room = self.max_tokens - len(self._prefix) - len(self._suffix)
        rows = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                text = item.lower() if self._lower else item
                ids = self.tokenizer(text, add_special_tokens=False, truncation=True, max_length=room)["input_ids"]
            elif any(t >= len(self.tokenizer) for t in item):
                raise InvalidRequest(f"input[{i}] has a token id outside this model's vocabulary of "
                                     f"{len(self.tokenizer)}.", param="input")
            else:
                ids = item[:room]
            rows.append(self._prefix + ids + self._suffix)
        return rows

    def _shorten(self, vector: bytes, dimensions: int) -> bytes:
        """A Matryoshka model's vector cut to ``dimensions``, normalised again if the model normalises."""
        cut = torch.frombuffer(bytearray(vector), dtype=torch.float32)[:dimensions]
        if self._normalize:
            cut = torch.nn.functional.normalize(cut, dim=0)
        return cut.numpy().astype("<f4").tobytes()

    # -- shared passes ----------------------------------------------------------------

    async def _run(self, batch: Batch[list[list[int]]]) -> list[list[bytes] | None]:
        """Each request's rows embedded, in order, ``max_batch`` rows to a pass, off the event loop."""
        rows = [row for request in batch.items for row in request]
        vectors: list[bytes] = []
        for start in range(0, len(rows), self._max_batch):
            if batch.abandoned.is_set():  # every request of the call has left: free the model for the next
                return [None] * len(batch.items)
            vectors += await asyncio.to_thread(self._forward, rows[start:start + self._max_batch])
        results = []
        for request in batch.items:
            results.append(vectors[:len(request)])
            vectors = vectors[len(request):]
        return results

    def _forward(self, rows: list[list[int]]) -> list[bytes]:
        """One forward pass: Transformer, Pooling, Normalize as the model's modules say."""
        batch = self.tokenizer.pad({"input_ids": rows}, return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = torch.cat([_pool(mode, hidden, mask) for mode in self._modes], dim=1)
            if self._normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        self.passes += 1
        return [v.tobytes() for v in pooled.numpy().astype("<f4")]
