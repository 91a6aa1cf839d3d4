"""The worker process entry point: fetch weights, load the backend, serve until signalled."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Callable

from bus import tracing
from bus.connect import connect
from bus.heap import settle_heap
from bus.issuers import issuer_registered
from bus.metrics import serve_metrics
from bus.settings import ModelSpec, Settings
from bus.signing import Identity
from consumers.backends.base import Backend
from consumers.metrics import collector
from consumers.models import resolve
from consumers.runtime import Worker

log = logging.getLogger(__name__)

# Torch's OpenMP threads spin while they wait for work by default. On a host whose cores the
# edge, the bus and other workers share, a spinning thread holds a core its peer needs: a
# decoding step of eight sequences took 1.3 s instead of 0.2 s (BENCHMARKS.md). Set before any
# backend imports torch, which reads it once.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def worker_identity_path(settings: Settings) -> Path:
    """Where a worker keeps the key it signs usage with (registered with role ``worker``)."""
    return Path(settings.state_dir, "keys", "worker.seed")


def _transformers_chat(spec: ModelSpec, path: str) -> Backend:
    if spec.vision:
        from consumers.backends.transformers_vision import TransformersVision

        return TransformersVision(path, device=spec.device, compute_type=spec.compute_type, batch=spec.concurrency)
    from consumers.backends.transformers_chat import TransformersChat

    # The worker's slots are the sequences decoding together.
    return TransformersChat(path, device=spec.device, compute_type=spec.compute_type, batch=spec.concurrency)


def _rapidocr(spec: ModelSpec, path: str) -> Backend:
    from consumers.backends.rapid_ocr import RapidOcr

    if spec.source or not spec.vision:
        raise ValueError("a rapidocr model reads images (vision = true) with the PP-OCRv4 models inside the "
                         "rapidocr-onnxruntime package (source left empty)")
    return RapidOcr()


def _sentence_embeddings(spec: ModelSpec, path: str) -> Backend:
    from consumers.backends.sentence_embeddings import SentenceEmbeddings

    backend = SentenceEmbeddings(path, max_batch=spec.max_batch, batch_wait_ms=spec.batch_wait_ms,
                                 matryoshka=spec.matryoshka)
    if backend.dimensions != spec.dimensions:  # the edge checks requests against the configured size
        raise ValueError(f"the weights at {path} make {backend.dimensions}-dimensional vectors; "
                         f"the model is configured with dimensions = {spec.dimensions}")
    return backend


def _faster_whisper(spec: ModelSpec, path: str) -> Backend:
    from consumers.backends.whisper_transcription import WhisperTranscription

    return WhisperTranscription(path, device=spec.device, compute_type=spec.compute_type,
                                concurrency=spec.concurrency)


def _diffusers_images(spec: ModelSpec, path: str) -> Backend:
    from consumers.backends.diffusers_images import DiffusersImages

    return DiffusersImages(path, sizes=list(spec.prices.image), device=spec.device, compute_type=spec.compute_type,
                           guidance_scale=spec.guidance_scale, edit_strength=spec.edit_strength,
                           max_batch=spec.max_batch, batch_wait_ms=spec.batch_wait_ms)


def _piper(spec: ModelSpec, path: str) -> Backend:
    from consumers.backends.piper_speech import PiperSpeech

    return PiperSpeech(path, spec.voices)


def _provider(spec: ModelSpec, path: str) -> Backend:
    import os

    from consumers.backends.providers.build import provider_backend

    return provider_backend(spec, os.environ)  # the one place a provider's key is read


# (kind, backend) -> what builds it from the spec and the weights' path. Libraries are imported
# inside each builder, so a worker loads only its own model's.
BACKENDS: dict[tuple[str, str], Callable[[ModelSpec, str], Backend]] = {
    ("images", "diffusers"): _diffusers_images,
    ("chat", "transformers"): _transformers_chat,
    ("chat", "rapidocr"): _rapidocr,
    ("embeddings", "transformers"): _sentence_embeddings,
    ("transcription", "faster-whisper"): _faster_whisper,
    ("speech", "piper"): _piper,
    ("chat", "openai"): _provider,
    ("embeddings", "openai"): _provider,
    ("transcription", "openai"): _provider,
    ("speech", "openai"): _provider,
    ("images", "openai"): _provider,
    ("chat", "anthropic"): _provider,
    ("chat", "gemini"): _provider,
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
    worker = Worker(settings, model, backend, nc, identity)
    exposed = await serve_metrics(settings.processes.metrics_host, settings.worker.metrics_port, collector(worker))
    tracing.install(settings.tracing, "worker", **{"tollgate.model": model})
    settle_heap()  # the model and the connection live as long as the worker: no collection need scan them again
    try:
        await worker.run(stop)
    finally:
        await asyncio.to_thread(tracing.uninstall)  # the last spans sent
        if exposed is not None:
            await exposed.cleanup()
        await nc.drain()
        close = getattr(backend, "close", None)  # a provider's pooled connections
        if close is not None:
            await close()
