"""The ``tollgate`` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import uvloop

from bus.settings import Settings, SettingsError, load_settings


def _cmd_up(settings: Settings, args) -> int:
    from infra.supervisor import up

    return up(settings)


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


def _cmd_meter(settings: Settings, args) -> int:
    from billing.serve import serve_meter

    asyncio.run(serve_meter(settings))
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


def _cmd_models_list(settings: Settings, args) -> int:
    for name, spec in settings.models.items():
        print(f"{name}\t{spec.kind}\t{spec.backend}\t{spec.source}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tollgate", description="Tollgate AI gateway")
    parser.add_argument("--config", help="settings file (default: tollgate.toml, or $TOLLGATE_CONFIG)")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start the whole stack on embedded defaults").set_defaults(run=_cmd_up)
    sub.add_parser("edge", help="run the HTTP edge").set_defaults(run=_cmd_edge)
    worker = sub.add_parser("worker", help="run a model worker")
    worker.add_argument("--model", required=True)
    worker.set_defaults(run=_cmd_worker)
    sub.add_parser("meter", help="run the metering consumer").set_defaults(run=_cmd_meter)
    models = sub.add_parser("models", help="model weights").add_subparsers(dest="models_command", required=True)
    pull = models.add_parser("pull", help="fetch and cache model weights")
    pull.add_argument("names", nargs="*", help="models to pull (default: all configured)")
    pull.set_defaults(run=_cmd_models_pull)
    models.add_parser("list", help="list configured models").set_defaults(run=_cmd_models_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    uvloop.install()  # the edge and workers spend their time in the event loop: uvloop's is faster
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(args.config)
    except (SettingsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return args.run(settings, args)


if __name__ == "__main__":
    sys.exit(main())
