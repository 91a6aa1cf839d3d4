"""The edge process: the aiohttp application and its lifecycle."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path

from aiohttp import web

from bus.account.budgets import BudgetStore
from bus.connect import connect
from bus.heap import settle_heap
from bus.issuers import issuer_registered
from bus.settings import Settings
from bus.signing import Identity
from bus.subjects import INFLIGHT_BUCKET, KEYS_BUCKET, RESPONSE_CACHE_BUCKET, TENANTS_BUCKET
from bus.account.tenant_store import TenancyStore, decode_key, decode_tenant
from bus.watched import WatchedBucket
from edge import (admin as admin_api, billing_api, chat, completions, embeddings, image_links, images, messages,
                  asyncapi, models, openapi, response_cache, speech, tokenize, transcriptions, usage)
from edge import console_routes
from edge.admission import Gate
from edge.auth import Authenticator
from edge.bodies import BODY_IDLE_S
from edge.errors import error_middleware
from edge.metrics import exposed as metrics_exposed, metrics_middleware
from edge.tracing import exported as spans_exported, response_status, trace_middleware
from edge.ratelimit import InFlight, RateLimiter
from edge.routing import RoutingPublisher
from edge.quota import QuotaGate
from edge.image_inputs import ImageInputs
from edge.response_cache import ResponseCache
from edge.state import AUTH, BUDGETS, GATE, IMAGE_INPUTS, PUBLISHER, QUOTA, RESPONSE_CACHE, SETTINGS, TENANCY

log = logging.getLogger(__name__)


@web.middleware
async def admin_only(request: web.Request, handler):
    """The one guard in front of every ``/admin`` route: the admin token, and nothing else, gets in."""
    request.config_dict[AUTH].require_admin(request)
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    publisher = request.config_dict[PUBLISHER]
    models = {name: publisher.live.serving(name) for name in request.config_dict[SETTINGS].models}
    ok = publisher.nc.is_connected
    return web.json_response({"status": "ok" if ok else "degraded", "models": models}, status=200 if ok else 503)


def edge_identity_path(settings: Settings) -> Path:
    return Path(settings.state_dir, "keys", "edge.seed")


def create_app(settings: Settings) -> web.Application:
    """Build the edge application; it connects to NATS when it starts."""
    app = web.Application(middlewares=[trace_middleware, error_middleware, metrics_middleware],
                          client_max_size=settings.edge.max_body_bytes)
    app[SETTINGS] = settings
    app[BODY_IDLE_S] = settings.edge.body_idle_s
    for endpoint in (chat, completions, embeddings, messages, tokenize, transcriptions, speech, images, image_links,
                     models, usage, billing_api, openapi, asyncapi, console_routes):  # one route table per endpoint module
        app.add_routes(endpoint.routes)
    app.router.add_get("/healthz", healthz)
    admin = web.Application(middlewares=[admin_only])
    for endpoint in (admin_api, usage, billing_api, console_routes):
        admin.add_routes(endpoint.admin_routes)
    app.add_subapp("/admin", admin)

    async def lifecycle(app: web.Application):
        nc = await connect(settings.nats, "tollgate-edge")
        js = nc.jetstream()
        identity = Identity.load_or_create(edge_identity_path(settings))
        if not await issuer_registered(js, identity.public_key):
            log.error("this edge's key %s is not in the issuer registry: workers will drop its requests "
                      "(tollgate up registers it; elsewhere run `tollgate issuers add`)", identity.public_key)
        tenants = WatchedBucket(await js.key_value(TENANTS_BUCKET), decode_tenant)
        keys = WatchedBucket(await js.key_value(KEYS_BUCKET), decode_key)
        for mirror in (tenants, keys):
            await mirror.start()
        edge_id = "edge-" + uuid.uuid4().hex[:12]
        app[QUOTA] = quota = QuotaGate(js)
        await quota.start()
        publisher = RoutingPublisher(
            nc, identity, edge_id, deadline_s=settings.edge.request_timeout_s, silence_s=settings.edge.worker_silence_s,
            liveness_s=settings.worker.liveness_s, blob_threshold=settings.edge.blob_threshold_bytes,
            routes=settings.routes, quota=quota,
        )
        await publisher.start()
        inflight = InFlight(await js.key_value(INFLIGHT_BUCKET), edge_id)
        limiter = RateLimiter(js, inflight)
        chores = [asyncio.create_task(inflight.keep_fresh()), asyncio.create_task(limiter.flush_corrections())]
        app[PUBLISHER] = publisher
        app[AUTH] = Authenticator(tenants, keys, settings.tiers, settings.edge.admin_token)
        app[TENANCY] = await TenancyStore.open(js, set(settings.tiers))
        app[GATE] = gate = Gate(settings, limiter, quota, publisher)
        app[BUDGETS] = await BudgetStore.open(js)
        app[IMAGE_INPUTS] = image_inputs = ImageInputs(settings.edge.images)
        app[RESPONSE_CACHE] = ResponseCache(await js.key_value(RESPONSE_CACHE_BUCKET), publisher, gate, settings)
        settle_heap()  # everything above lives as long as the edge: no collection need scan it again
        yield
        await image_inputs.close()
        await gate.stop()
        await quota.stop()
        for chore in chores:
            chore.cancel()
        await publisher.stop()
        for mirror in (tenants, keys):
            await mirror.stop()
        await nc.drain()

    app.cleanup_ctx.append(spans_exported(settings))  # OpenTelemetry spans, if a collector is set; ended last
    app.cleanup_ctx.append(lifecycle)
    app.cleanup_ctx.append(metrics_exposed(settings))  # Prometheus /metrics on its own port
    app.on_response_prepare.append(response_cache.mark)  # the x-tollgate-cache header: hit or miss
    app.on_response_prepare.append(response_status)  # on the request's server span, if spans are on
    return app


def run_edge(settings: Settings) -> None:
    """Serve the edge until SIGINT or SIGTERM, then drain.

    Draining stops accepting at once and gives requests in flight
    ``processes.drain_grace_s`` to finish before they are cancelled.
    """
    web.run_app(
        create_app(settings),
        host=settings.edge.host,
        port=settings.edge.port,
        # Several edge processes (`processes.edges`) share one port; the kernel spreads connections over them.
        reuse_port=settings.processes.edges > 1,
        shutdown_timeout=settings.processes.drain_grace_s,
        handler_cancellation=True,  # a client that goes away cancels its request
        access_log=None,
        print=lambda *_: log.info("edge listening on http://%s:%s", settings.edge.host, settings.edge.port),
    )
