"""The ``tollgate`` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import uvloop

from bus.settings import Settings, SettingsError, load_settings
from bus.tracing import TraceIds
from infra.deploy_cli import add_commands as add_deploy_commands
from infra.nats.roles import role_credentials, worker_role
from infra.billing_cli import add_commands as add_billing_commands


def _cmd_up(settings: Settings, args) -> int:
    from infra.supervisor import up

    return up(settings, args.config_path, nats_cluster=args.nats_cluster)


def _cmd_edge(settings: Settings, args) -> int:
    from edge.app import run_edge

    run_edge(settings)
    return 0


def _cmd_worker(settings: Settings, args) -> int:
    from consumers.serve import serve_model

    if args.model not in settings.models:
        print(f"unknown model {args.model!r}; configured: {', '.join(settings.models)}", file=sys.stderr)
        return 2
    asyncio.run(serve_model(settings, args.model))
    return 0


def _cmd_billing(settings: Settings, args) -> int:
    from billing.serve import serve_billing

    asyncio.run(serve_billing(settings))
    return 0


def _cmd_models_pull(settings: Settings, args) -> int:
    from consumers.models import ModelSourceError, resolve

    names = args.names or list(settings.models)
    for name in names:
        spec = settings.models.get(name)
        if spec is None:
            print(f"unknown model {name!r}; configured: {', '.join(settings.models)}", file=sys.stderr)
            return 2
        try:
            print(f"{name}: {resolve(name, spec, Path(settings.cache_dir), progress=True)}")
        except ModelSourceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


def _cmd_models_tiny_diffusion(settings: Settings, args) -> int:
    from consumers.tiny_diffusion import build_tiny_diffusion

    print(build_tiny_diffusion(Path(args.directory)))
    return 0


def _cmd_models_list(settings: Settings, args) -> int:
    for name, spec in settings.models.items():
        print(f"{name}\t{spec.kind}\t{spec.backend}\t{spec.source}")
    return 0


def _limits(args) -> dict:
    return {k: getattr(args, k) for k in ("rpm", "tpm", "concurrency") if getattr(args, k) is not None}


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [v for v in value.split(",") if v]


def _on_bus(settings: Settings, action) -> int:
    """Run ``action(js)`` with an operator connection and print its result as JSON."""
    import msgspec

    from bus.connect import connect
    from bus.errors import TollgateError

    async def go():
        nc = await connect(settings.nats, "tollgate-cli", service=False)
        try:
            return await action(nc.jetstream())
        finally:
            await nc.close()

    try:
        result = asyncio.run(go())
    except TollgateError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(msgspec.json.format(msgspec.json.encode(result), indent=2).decode())
    return 0


def _tenancy(settings: Settings, action) -> int:
    """Run ``action(store)`` against the tenant and key buckets."""
    from bus.account.tenant_store import TenancyStore

    async def go(js):
        return await action(await TenancyStore.open(js, set(settings.tiers)))

    return _on_bus(settings, go)


def _tenant_fields(args) -> dict:
    fields = {"tier": args.tier, "name": args.name, "default_lane": args.default_lane,
              "allowed_lanes": _csv(args.allowed_lanes), "models": _csv(args.models)}
    fields = {k: v for k, v in fields.items() if v is not None}
    if _limits(args):
        fields["limits"] = _limits(args)
    for flag in ("disabled", "prepaid"):
        if getattr(args, flag, None) is not None:
            fields[flag] = getattr(args, flag)
    return fields


def _cmd_provision(settings: Settings, args) -> int:
    from bus.provision import provision

    async def go(js):
        await provision(js, settings)
        return {"provisioned": True}

    return _on_bus(settings, go)


def _cmd_issuers_add(settings: Settings, args) -> int:
    from bus.issuers import register_issuer
    from bus.protocol import IssuerGrant

    async def go(js):
        grant = IssuerGrant(args.name, _csv(args.tenants) or [], role=args.role)
        await register_issuer(js, args.public_key, grant)
        return {"issuer": args.public_key, "grant": grant}

    return _on_bus(settings, go)


def _cmd_tenants_create(settings: Settings, args) -> int:
    from bus.account.tenants import Tenant

    return _tenancy(settings, lambda store: store.create_tenant(Tenant(id=args.id, **_tenant_fields(args))))


def _cmd_tenants_update(settings: Settings, args) -> int:
    return _tenancy(settings, lambda store: store.update_tenant(args.id, _tenant_fields(args)))


def _cmd_tenants_list(settings: Settings, args) -> int:
    return _tenancy(settings, lambda store: store.list_tenants())


def _cmd_keys_create(settings: Settings, args) -> int:
    import time

    from edge.admin import key_view

    async def create(store):
        key, secret = await store.create_key(
            args.tenant, name=args.name or "", models=_csv(args.models), endpoints=_csv(args.endpoints),
            expires=time.time() + args.expires_in if args.expires_in else None, limits=_limits(args),
        )
        return {"key": secret, **key_view(key)}

    return _tenancy(settings, create)


def _cmd_keys_list(settings: Settings, args) -> int:
    from edge.admin import key_view

    async def listing(store):
        return [key_view(k) for k in await store.list_keys(args.tenant)]

    return _tenancy(settings, listing)


def _cmd_keys_revoke(settings: Settings, args) -> int:
    from edge.admin import key_view

    async def revoke(store):
        return key_view(await store.revoke_key(args.id))

    return _tenancy(settings, revoke)


def _cmd_docs_asyncapi(settings: Settings, args) -> int:
    from edge.asyncapi import rendered

    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(rendered())
    print(f"wrote {path}")
    return 0


def _limit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rpm", type=int, help="requests per minute")
    p.add_argument("--tpm", type=int, help="tokens per minute")
    p.add_argument("--concurrency", type=int, help="requests in flight")
    p.add_argument("--models", help="comma-separated models allowed (default: all)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tollgate", description="Tollgate AI gateway")
    parser.add_argument("--config", help="settings file (default: tollgate.toml, or $TOLLGATE_CONFIG)")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    up_cmd = sub.add_parser("up", help="start the whole stack on embedded defaults")
    up_cmd.add_argument("--nats-cluster", type=int, default=0, metavar="N",
                        help="run NATS as a local cluster of N nodes (streams and buckets at min(3, N) replicas)")
    up_cmd.set_defaults(run=_cmd_up)
    sub.add_parser("edge", help="run the HTTP edge").set_defaults(run=_cmd_edge)
    worker = sub.add_parser("worker", help="run a model worker")
    worker.add_argument("--model", required=True)
    worker.set_defaults(run=_cmd_worker)
    sub.add_parser("billing", help="run billing: metering, credits, budgets, alerts, usage queries").set_defaults(
        run=_cmd_billing)
    models = sub.add_parser("models", help="model weights").add_subparsers(dest="models_command", required=True)
    pull = models.add_parser("pull", help="fetch and cache model weights")
    pull.add_argument("names", nargs="*", help="models to pull (default: all configured)")
    pull.set_defaults(run=_cmd_models_pull)
    models.add_parser("list", help="list configured models").set_defaults(run=_cmd_models_list)
    tiny = models.add_parser("tiny-diffusion", help="write a tiny random Stable Diffusion pipeline (it draws noise) "
                                                    "to a directory, for tests and trying the images endpoints")
    tiny.add_argument("directory")
    tiny.set_defaults(run=_cmd_models_tiny_diffusion)

    sub.add_parser("provision", help="create or update the streams and buckets").set_defaults(run=_cmd_provision)
    issuers = sub.add_parser("issuers", help="who may publish work").add_subparsers(dest="issuers_command", required=True)
    add = issuers.add_parser("add", help="trust a publisher's public key to bill some tenants")
    add.add_argument("public_key")
    add.add_argument("--name", required=True)
    add.add_argument("--tenants", required=True, help="comma-separated tenants, or * for any")
    add.add_argument("--role", choices=("service", "edge", "worker"), default="service",
                     help="service: publishes work (SDK); edge: publishes work and holds credits; "
                          "worker: signs the usage of work it ran")
    add.set_defaults(run=_cmd_issuers_add)

    tenants = sub.add_parser("tenants", help="tenants (in NATS KV)").add_subparsers(dest="tenants_command", required=True)
    for name, run in (("create", _cmd_tenants_create), ("update", _cmd_tenants_update)):
        p = tenants.add_parser(name)
        p.add_argument("id")
        p.add_argument("--tier", default="free" if name == "create" else None)
        p.add_argument("--name")
        p.add_argument("--default-lane")
        p.add_argument("--allowed-lanes", help="comma-separated lanes service_tier may use")
        p.add_argument("--prepaid", action=argparse.BooleanOptionalAction, default=None,
                       help="run only what the tenant's credits cover")
        if name == "update":
            p.add_argument("--disable", dest="disabled", action="store_const", const=True)
            p.add_argument("--enable", dest="disabled", action="store_const", const=False)
        _limit_flags(p)
        p.set_defaults(run=run)
    tenants.add_parser("list").set_defaults(run=_cmd_tenants_list)

    keys = sub.add_parser("keys", help="API keys (in NATS KV)").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="create a key; its secret is printed once")
    create.add_argument("tenant")
    create.add_argument("--name")
    create.add_argument("--expires-in", type=float, help="seconds until the key expires")
    create.add_argument("--endpoints", help="comma-separated endpoints allowed, e.g. chat.completions,models")
    _limit_flags(create)
    create.set_defaults(run=_cmd_keys_create)
    listing = keys.add_parser("list")
    listing.add_argument("--tenant")
    listing.set_defaults(run=_cmd_keys_list)
    revoke = keys.add_parser("revoke")
    revoke.add_argument("id")
    revoke.set_defaults(run=_cmd_keys_revoke)
    docs = sub.add_parser("docs", help="generated documents").add_subparsers(dest="docs_command", required=True)
    asyncapi = docs.add_parser("asyncapi", help="write the AsyncAPI 3.0 document of the bus (also served at "
                                                "/asyncapi.json)")
    asyncapi.add_argument("--out", default="docs/asyncapi.json")
    asyncapi.set_defaults(run=_cmd_docs_asyncapi)
    add_billing_commands(sub, _on_bus)
    add_deploy_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    uvloop.install()  # the edge and workers spend their time in the event loop: uvloop's is faster
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s [trace %(trace_id)s]: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(TraceIds())  # the trace id of the request a line was written for
    args.config_path = _config_path(args.config)
    try:
        settings = load_settings(args.config_path)
    except (SettingsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Workers connect as their model's own user: they can reach no other model's work.
    role = worker_role(args.model) if args.command == "worker" else _ROLE_OF.get(args.command, "admin")
    if args.command != "up":
        settings = role_credentials(settings, role)
    return args.run(settings, args)


# The NATS role each command runs as; every other command but `up` is an operator's (admin).
_ROLE_OF = {"edge": "edge", "billing": "billing"}


def _config_path(given: str | None) -> Path | None:
    """The settings file in force, as an absolute path: ``--config``, else $TOLLGATE_CONFIG, else ./tollgate.toml."""
    import os

    path = given or os.environ.get("TOLLGATE_CONFIG") or ("tollgate.toml" if Path("tollgate.toml").exists() else None)
    return Path(path).resolve() if path else None


if __name__ == "__main__":
    sys.exit(main())
