"""``gastrolens api token NAME --role ROLE``: make an access token for the HTTP API and dashboard.

The token is printed once; the settings keep only its sha256, in the printed
``[[api.tokens]]`` table that the operator pastes into the configuration file.
"""

from __future__ import annotations

import argparse
import re
import sys

from gastrolens.api.auth import Role, new_token, token_table

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("api", help="the HTTP API and dashboard")
    actions = parser.add_subparsers(dest="api_command", required=True, metavar="ACTION")
    token = actions.add_parser("token", help="print a new access token and the settings table that admits it")
    token.add_argument("name", metavar="NAME", help="who or what uses it (audited as api:NAME)")
    token.add_argument("--role", choices=[r.value for r in Role], default=Role.VIEWER.value,
                       help="viewer: studies, results, deliveries; auditor: also the audit trail; "
                            "sender: stores by STOW-RS only (default viewer)")
    token.set_defaults(func=run_token)


def run_token(args: argparse.Namespace) -> int:
    if not NAME_PATTERN.match(args.name):
        print("gastrolens: error: NAME: 1-64 letters, digits and . _ @ -", file=sys.stderr)
        return 2
    role = Role(args.role)
    token = new_token()
    print(f"Token for {args.name} (role {role.value}); it is shown only this once:\n")
    print(f"    {token}\n")
    print("Add this table to the settings file (it holds only the token's sha256) and restart the service:\n")
    print(token_table(args.name, role, token))
    return 0
