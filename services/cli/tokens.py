"""`curate tokens create|local|list|revoke`: the API tokens the REST service accepts.

A token's secret is printed once, at creation; the catalog keeps only its sha256, so a lost token
is revoked and replaced, never recovered. `read` tokens may read everything; `write` tokens may
also submit, cancel, resume and delete jobs and register sets.

`curate tokens local` is the exception to "shown once": the token of this machine's own user,
for `make serve` to print on every start without making a new token each time. Its secret is kept
in `<catalog>.serve-token`, a file only its owner may read (0600), and reused while the catalog
accepts it; revoked (or the file lost), the next call makes a new one.
"""

import argparse
import json
import os
from pathlib import Path
from typing import Any

from curate.catalog import Catalog
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


def local_token_file(catalog: Catalog) -> Path:
    """Where `curate tokens local` keeps its token: beside the catalog that accepts it."""
    return Path(f"{catalog.path}.serve-token")


def _kept_secret(path: Path) -> str | None:
    """The secret in the local token file, if it is there and only its owner can read it."""
    try:
        with open(path, encoding="utf-8") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            secret = handle.read().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return secret if secret and not mode & 0o077 else None


def _keep_secret(path: Path, secret: str) -> None:
    """Write the file 0600 from its creation (never readable by others, not even briefly),
    whole or not at all."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (secret + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def local_token(catalog: Catalog, scope: str, name: str) -> tuple[dict[str, Any], str, bool]:
    """(token record, secret, reused): the token kept in `local_token_file` while the catalog
    still accepts it with this scope; else a new one, kept there in its place."""
    path = local_token_file(catalog)
    secret = _kept_secret(path)
    token = catalog.token_for(secret) if secret else None
    if token is not None and token["scope"] == scope:
        return token, secret, True
    if path.exists() and secret is None:
        # Readable by others: it may have leaked, so it is revoked, not only replaced.
        leaked = catalog.token_for(path.read_text(errors="replace").strip())
        if leaked is not None:
            catalog.revoke_token(leaked["token_id"])
    token, secret = catalog.create_token(scope, name)
    _keep_secret(path, secret)
    return token, secret, False


def cmd_tokens_local(args: argparse.Namespace) -> int:
    catalog = open_catalog(load_settings())
    token, secret, reused = local_token(catalog, args.scope, args.name)
    if args.json:
        print(json.dumps({**token, "token": secret, "reused": reused}, default=str))
        return 0
    print(secret)
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
        dest="tokens_command", required=True, metavar="create|local|list|revoke"
    )
    create = tokens.add_parser("create", help="a new token, printed once")
    create.add_argument("--scope", choices=["read", "write"], required=True)
    create.add_argument("--name", help="what the token is for (shown by `tokens list`)")
    create.add_argument("--json", action="store_true")
    create.set_defaults(func=cmd_tokens_create)
    local = tokens.add_parser(
        "local",
        help="this machine's own token (`make serve`): the one kept beside the catalog (0600) "
        "while it is valid, else a new one kept there",
    )
    local.add_argument("--scope", choices=["read", "write"], default="write")
    local.add_argument("--name", default="local", help="the name a new token gets")
    local.add_argument("--json", action="store_true")
    local.set_defaults(func=cmd_tokens_local)
    listing = tokens.add_parser("list", help="every token: id, scope, created, revoked")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_tokens_list)
    revoke = tokens.add_parser("revoke", help="refuse a token from now on")
    revoke.add_argument("token_id")
    revoke.set_defaults(func=cmd_tokens_revoke)
