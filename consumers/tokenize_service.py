"""Tokenize and detokenize asks for a worker's model, answered beside its work loop.

The edge holds no model code, so it asks a worker over core NATS request-reply on
``tg.tokenize.<model>`` (one queue group per model: one worker answers each ask).
These asks never enter the work queue: they are answered between generation steps,
on a thread of their own, so a long generation does not hold them up.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus.errors import InvalidRequest, TollgateError
from bus.protocol import TokenizeAnswer, TokenizeAsk, TokenizerAsk
from bus.subjects import tokenize_subject
from consumers.backends.base import Backend, Tokenizing

log = logging.getLogger(__name__)

_decode_ask = msgspec.msgpack.Decoder(TokenizerAsk).decode
_encode = msgspec.msgpack.encode


async def serve_tokenize(nc: Client, model: str, backend: Backend) -> list[Subscription]:
    """Answer ``model``'s tokenize asks with ``backend``'s tokenizer; no subscription if it has none."""
    if not isinstance(backend, Tokenizing):
        return []
    # One thread: a tokenizer is not safe to share between threads, and a very long prompt
    # must not stall the event loop that streams tokens and heartbeats.
    pool = ThreadPoolExecutor(1, thread_name_prefix=f"tokenize-{model}")

    async def answer(msg: Msg) -> None:
        try:
            ask = _decode_ask(msg.data)
            reply = await asyncio.get_running_loop().run_in_executor(pool, _answer, backend, ask)
        except msgspec.ValidationError as exc:
            reply = TokenizeAnswer(error=InvalidRequest(f"Invalid tokenize request: {exc}").info())
        except TollgateError as exc:
            reply = TokenizeAnswer(error=exc.info())
        except Exception:
            log.exception("tokenize ask for %s failed", model)
            reply = TokenizeAnswer(error=TollgateError("The tokenizer failed on this request.").info())
        await msg.respond(_encode(reply))

    return [await nc.subscribe(tokenize_subject(model), queue="tokenize", cb=answer)]


def _answer(backend: Tokenizing, ask: TokenizerAsk) -> TokenizeAnswer:
    if isinstance(ask, TokenizeAsk):
        ids = backend.prompt_ids(ask.prompt) if ask.messages is None else backend.chat_ids(ask.messages)
        return TokenizeAnswer(tokens=ids)
    return TokenizeAnswer(text=backend.text_of(ask.tokens))
