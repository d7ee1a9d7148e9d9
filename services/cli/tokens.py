"""`curate tokens create|list|revoke`: the API tokens the REST service accepts.

A token's secret is printed once, at creation; the catalog keeps only its sha256, so a lost token
is revoked and replaced, never recovered. `read` tokens may read everything; `write` tokens may
also submit, cancel, resume and delete jobs and register sets.
"""

import argparse
import json

from services.cli.common import load_settings, open_catalog


def _when(value) -> str:
    return value.isoformat(timespec="seconds") + "Z" if value is not None else "-"


def cmd_tokens_create(args: argparse.Namespace) -> int:
    token, secret = open_catalog(load_settings()).create_token(args.scope, args.name)
    if args.json:
        print(json.dumps({**token, "token": secret}, default=str))
        return 0
    print(f"token {token['token_id']} ({token['scope']}): {secret}")
    print("It is shown only now; send it as `Authorization: Bearer <token>`.")
    return 0


def cmd_tokens_list(args: argparse.Namespace) -> int:
    tokens = open_catalog(load_settings()).tokens()
    if args.json:
        print(json.dumps(tokens, default=str, indent=2))
        return 0
    if not tokens:
        print("no tokens yet: create one with `curate tokens create --scope read`")
        return 0
    print(f"{'id':<14}{'scope':<7}{'created':<22}{'revoked':<22}name")
    for token in tokens:
        print(
            f"{token['token_id']:<14}{token['scope']:<7}{_when(token['created_at']):<22}"
            f"{_when(token['revoked_at']):<22}{token['name'] or ''}"
        )
    return 0


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    token = open_catalog(load_settings()).revoke_token(args.token_id)
    print(f"token {token['token_id']} revoked at {_when(token['revoked_at'])}")
    return 0


def add_tokens_parser(commands: argparse._SubParsersAction) -> None:
    tokens = commands.add_parser("tokens", help="API tokens of the REST service").add_subparsers(
        dest="tokens_command", required=True, metavar="create|list|revoke"
    )
    create = tokens.add_parser("create", help="a new token, printed once")
    create.add_argument("--scope", choices=["read", "write"], required=True)
    create.add_argument("--name", help="what the token is for (shown by `tokens list`)")
    create.add_argument("--json", action="store_true")
    create.set_defaults(func=cmd_tokens_create)
    listing = tokens.add_parser("list", help="every token: id, scope, created, revoked")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_tokens_list)
    revoke = tokens.add_parser("revoke", help="refuse a token from now on")
    revoke.add_argument("token_id")
    revoke.set_defaults(func=cmd_tokens_revoke)
