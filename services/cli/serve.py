"""`curate serve`: the REST service and the web UI (services/api) under uvicorn.

It binds 127.0.0.1 unless told otherwise and asks for API tokens unless started with
`--no-auth`, which is meant for one person on their own machine.
"""

import argparse
import sys

from pydantic import ValidationError

from schemas.job import describe_validation_error
from services.cli.common import load_settings
from services.cli.errors import UsageError


def cmd_serve(args: argparse.Namespace) -> int:
    settings = load_settings()
    # Imported only now: FastAPI and the job manager are not needed by the other commands.
    import uvicorn

    from services.api.app import create_app
    from services.api.settings import ServiceSettings

    overrides = {
        key: value
        for key, value in {"host": args.host, "port": args.port}.items()
        if value is not None
    }
    if args.no_auth:
        overrides["auth"] = False
    try:
        service = ServiceSettings(**overrides)
    except ValidationError as error:
        raise UsageError(f"bad service setting: {describe_validation_error(error)}") from None
    app = create_app(settings, service)
    where = f"http://{service.host}:{service.port}/"
    auth = "tokens required" if service.auth else "NO AUTH: anyone who can reach it may use it"
    print(f"curate serve: {where} ({auth}); API docs at {where}docs", file=sys.stderr)
    uvicorn.run(
        app,
        host=service.host,
        port=service.port,
        log_level="warning",
        # Event streams stay open; a stop should not wait for every client to leave.
        timeout_graceful_shutdown=3,
    )
    return 0


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="the REST service and web UI")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1, CURATE_HOST)")
    serve.add_argument("--port", type=int, help="port (default 8765, CURATE_PORT)")
    serve.add_argument(
        "--no-auth", action="store_true", help="accept requests without a token (local use only)"
    )
    serve.set_defaults(func=cmd_serve)
