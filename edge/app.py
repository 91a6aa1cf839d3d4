"""The edge process: the aiohttp application and its lifecycle."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import msgspec
import nats
from aiohttp import web

from bus.issuers import register_issuer
from bus.liveness import LiveWorkers
from bus.protocol import IssuerGrant
from bus.provision import provision
from bus.settings import Settings
from bus.signing import Identity
from bus.subjects import WORKERS_BUCKET
from edge.auth import KeyAuth
from edge.chat import chat_completions
from edge.errors import error_middleware
from edge.gateway import Gateway
from edge.openai_types import ModelCard, ModelList

log = logging.getLogger(__name__)


async def list_models(request: web.Request) -> web.Response:
    request.app["auth"].authenticate(request)
    cards = [ModelCard(name) for name in request.app["gateway"].settings.models]
    return web.Response(body=msgspec.json.encode(ModelList(cards)), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    gateway: Gateway = request.app["gateway"]
    models = {name: gateway.live.serving(name) for name in gateway.settings.models}
    ok = gateway.nc.is_connected
    return web.json_response({"status": "ok" if ok else "degraded", "models": models}, status=200 if ok else 503)


def edge_identity_path(settings: Settings) -> Path:
    return Path(settings.state_dir, "keys", "edge.seed")


def create_app(settings: Settings) -> web.Application:
    """Build the edge application; it connects to NATS when it starts."""
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.edge.max_body_bytes)
    app["auth"] = KeyAuth(settings.edge.api_key, settings.edge.tenant)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/healthz", healthz)

    async def lifecycle(app: web.Application):
        nc = await nats.connect(settings.nats.url, name="tollgate-edge", max_reconnect_attempts=-1)
        js = nc.jetstream()
        await provision(js, settings)
        identity = Identity.load_or_create(edge_identity_path(settings))
        # Until the issuer registry is operator-managed, an edge vouches for every tenant it authenticates.
        await register_issuer(js, identity.public_key, IssuerGrant("edge", ["*"]))
        live = LiveWorkers(await js.key_value(WORKERS_BUCKET))
        await live.start()
        gateway = Gateway(settings, nc, identity, live)
        await gateway.start()
        app["gateway"] = gateway
        yield
        await gateway.stop()
        await live.stop()
        await nc.drain()

    app.cleanup_ctx.append(lifecycle)
    return app


def run_edge(settings: Settings) -> None:
    """Serve the edge until interrupted."""
    web.run_app(
        create_app(settings),
        host=settings.edge.host,
        port=settings.edge.port,
        handler_cancellation=True,  # a client that goes away cancels its request
        access_log=None,
        print=lambda *_: log.info("edge listening on http://%s:%s", settings.edge.host, settings.edge.port),
    )
