"""``tollgate nats-auth`` and ``tollgate identity``: the secrets a deployment outside ``tollgate up`` needs."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from bus.settings import Settings
from bus.signing import Identity
from infra.nats import roles


def _cmd_nats_auth(settings: Settings, args) -> int:
    """Print the nats-server ``authorization`` block, or the role passwords as ``NATS_PASSWORD_<ROLE>=`` lines.

    Passwords are made once and kept in ``<state_dir>/nats-auth.json``, so both
    forms (and a local ``tollgate up`` in that state dir) agree.
    """
    Path(settings.state_dir).mkdir(parents=True, exist_ok=True)
    passwords = roles.load_or_create(roles.auth_file(settings.state_dir), tuple(settings.services),
                                     tuple(settings.models))  # a worker user per model
    if args.env:
        for role, password in passwords.items():
            user = roles.credentials(role, password)["TOLLGATE_NATS_USER"]
            # A variable name (compose, secrets) has no dashes: worker_smollm2-135m -> WORKER_SMOLLM2_135M.
            print(f"NATS_PASSWORD_{re.sub(r'[^A-Z0-9_]', '_', user.upper())}={password}")
    else:
        print(roles.render(passwords), end="")
    return 0


def _cmd_identity(settings: Settings, args) -> int:
    """Create a signing seed at PATH if there is none, and print its public key (for ``tollgate issuers add``)."""
    print(Identity.load_or_create(Path(args.path)).public_key)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the deployment commands on the ``tollgate`` parser."""
    auth = sub.add_parser("nats-auth", help="NATS users and permissions for a cluster outside `tollgate up`")
    auth.add_argument("--env", action="store_true", help="print the role passwords as NATS_PASSWORD_<ROLE>= lines")
    auth.set_defaults(run=_cmd_nats_auth)
    identity = sub.add_parser("identity", help="make a signing seed (edge or worker) and print its public key")
    identity.add_argument("path")
    identity.set_defaults(run=_cmd_identity)
