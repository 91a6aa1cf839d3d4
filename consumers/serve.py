"""The worker process entry point: fetch weights, load the backend, serve until signalled."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Callable

from bus.connect import connect
from bus.issuers import issuer_registered
from bus.settings import ModelSpec, Settings
from bus.signing import Identity
from consumers.backends.base import Backend
from consumers.models import resolve
from consumers.runtime import Worker

log = logging.getLogger(__name__)


def worker_identity_path(settings: Settings) -> Path:
    """Where a worker keeps the key it signs usage with (registered with role ``worker``)."""
    return Path(settings.state_dir, "keys", "worker.seed")


def _transformers_chat(spec: ModelSpec, path: str) -> Backend:
    from consumers.backends.transformers_chat import TransformersChat

    return TransformersChat(path)


def _sentence_embeddings(spec: ModelSpec, path: str) -> Backend:
    from consumers.backends.sentence_embeddings import SentenceEmbeddings

    backend = SentenceEmbeddings(path, max_batch=spec.max_batch, batch_wait_ms=spec.batch_wait_ms,
                                 matryoshka=spec.matryoshka)
    if backend.dimensions != spec.dimensions:  # the edge checks requests against the configured size
        raise ValueError(f"the weights at {path} make {backend.dimensions}-dimensional vectors; "
                         f"the model is configured with dimensions = {spec.dimensions}")
    return backend


# (kind, backend) -> what builds it from the spec and the weights' path. Libraries are imported
# inside each builder, so a worker loads only its own model's.
BACKENDS: dict[tuple[str, str], Callable[[ModelSpec, str], Backend]] = {
    ("chat", "transformers"): _transformers_chat,
    ("embeddings", "transformers"): _sentence_embeddings,
}


def load_backend(spec: ModelSpec, path: str) -> Backend:
    """Instantiate the backend named by ``spec.backend`` for ``spec.kind`` on the weights at ``path``."""
    build = BACKENDS.get((spec.kind, spec.backend))
    if build is None:
        raise ValueError(f"no {spec.backend!r} backend for {spec.kind!r} models")
    return build(spec, path)


async def serve_model(settings: Settings, model: str, backend: Backend | None = None) -> None:
    """Serve ``model`` until SIGINT or SIGTERM; loading happens off the event loop."""
    spec = settings.models[model]
    if backend is None:
        path = await asyncio.to_thread(resolve, model, spec, Path(settings.cache_dir))
        backend = await asyncio.to_thread(load_backend, spec, path)
    nc = await connect(settings.nats, f"tollgate-worker-{model}")
    identity = Identity.load_or_create(worker_identity_path(settings))
    if not await issuer_registered(nc.jetstream(), identity.public_key):
        log.error("this worker's key %s is not registered (role worker): billing will dead-letter its usage "
                  "(tollgate up registers it; elsewhere run `tollgate issuers add --role worker`)", identity.public_key)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await Worker(settings, model, backend, nc, identity).run(stop)
    finally:
        await nc.drain()
