"""``tollgate credits`` and ``tollgate budgets``: the operator's commands for money."""

from __future__ import annotations

import argparse
import time


def _cmd_credits_add(settings, args, on_bus) -> int:
    from bus.account import credits
    from bus.account.credits import CreditChange
    from bus.account.tenant_store import TenancyStore

    change = CreditChange(amount_micros=args.amount_micros, kind=args.kind, expires_in=args.expires_in,
                          request_id=args.request_id, note=args.note or "", id=args.id)

    async def go(js):
        tenant = await (await TenancyStore.open(js, set(settings.tiers))).get_tenant(args.tenant)
        return await credits.record_change(js, change.entry(tenant.id, time.time()))  # Conflict if --id was used

    return on_bus(settings, go)


def _cmd_credits_show(settings, args, on_bus) -> int:
    from bus.account import credits

    async def go(js):
        return {"tenant": args.tenant, "available_micros": await credits.available(js, args.tenant)}

    return on_bus(settings, go)


def _cmd_budgets_set(settings, args, on_bus) -> int:
    from bus.account.budgets import DEFAULT_THRESHOLDS, Budget, BudgetStore
    from edge.billing_api import budget_view

    budget = Budget(
        tenant=args.tenant, name=args.name, amount_micros=args.amount_micros, period=args.period,
        window_s=args.window_s, key=args.key, mode=args.mode,
        thresholds=[int(t) for t in args.thresholds.split(",")] if args.thresholds else list(DEFAULT_THRESHOLDS),
        webhook_url=args.webhook_url, webhook_secret=args.webhook_secret,
    )

    async def go(js):
        from bus.account.tenant_store import TenancyStore

        await (await TenancyStore.open(js, set(settings.tiers))).get_tenant(args.tenant)
        return budget_view(await (await BudgetStore.open(js)).put(budget, settings.meter.webhook_allow))

    return on_bus(settings, go)


def _cmd_budgets_list(settings, args, on_bus) -> int:
    from bus.account.budgets import BudgetStore
    from edge.billing_api import budget_view

    async def go(js):
        return [budget_view(b) for b in await (await BudgetStore.open(js)).list(args.tenant)]

    return on_bus(settings, go)


def _cmd_budgets_delete(settings, args, on_bus) -> int:
    from bus.account.budgets import BudgetStore

    async def go(js):
        await (await BudgetStore.open(js)).delete(args.id)
        return {"id": args.id, "deleted": True}

    return on_bus(settings, go)


def add_commands(sub: argparse._SubParsersAction, on_bus) -> None:
    """Add the credits and budgets commands; each runs through ``on_bus(settings, action)``."""

    def runs(command):
        return lambda settings, args: command(settings, args, on_bus)

    credits = sub.add_parser("credits", help="prepaid credits").add_subparsers(dest="credits_command", required=True)
    add = credits.add_parser("add", help="grant, top up or refund credits (applied once per --id)")
    add.add_argument("tenant")
    add.add_argument("amount_micros", type=int, help="micro-credits (1 credit = 1,000,000)")
    add.add_argument("--kind", choices=("grant", "topup", "refund"), default="grant")
    add.add_argument("--expires-in", type=float, help="seconds until a grant's unspent rest lapses")
    add.add_argument("--request-id", help="the request a refund is for")
    add.add_argument("--note")
    add.add_argument("--id", help="an id of your own (an invoice number), per tenant: retrying with it applies the change once; "
                          "reusing it for a different change is refused")
    add.set_defaults(run=runs(_cmd_credits_add))
    show = credits.add_parser("show", help="a tenant's available credits")
    show.add_argument("tenant")
    show.set_defaults(run=runs(_cmd_credits_show))

    budgets = sub.add_parser("budgets", help="spending budgets and alerts").add_subparsers(
        dest="budgets_command", required=True)
    put = budgets.add_parser("set", help="create or replace a budget")
    put.add_argument("tenant")
    put.add_argument("name")
    put.add_argument("amount_micros", type=int)
    put.add_argument("--period", choices=("daily", "monthly", "rolling"), default="monthly")
    put.add_argument("--window-s", type=int, help="rolling budgets: the trailing window in seconds")
    put.add_argument("--key", help="a key id: the budget covers that key alone")
    put.add_argument("--mode", choices=("soft", "hard"), default="soft")
    put.add_argument("--thresholds", help="comma-separated percentages (default 50,75,90,100)")
    put.add_argument("--webhook-url")
    put.add_argument("--webhook-secret")
    put.set_defaults(run=runs(_cmd_budgets_set))
    listing = budgets.add_parser("list")
    listing.add_argument("--tenant")
    listing.set_defaults(run=runs(_cmd_budgets_list))
    delete = budgets.add_parser("delete")
    delete.add_argument("id", help="<tenant>.<name>")
    delete.set_defaults(run=runs(_cmd_budgets_delete))
