"""The REST service: `create_app` builds the FastAPI app, every /v1 router and the web UI at `/`.

Errors end every request the same way: a CurateError's kind becomes its HTTP status in one table
(`HTTP_STATUS`), a request that does not validate is a 422 naming the field (400 when the body is
not JSON at all), an unknown route a 404, and anything else a 500 (a bug: the tests assert none
happen). Every error body is `{"error": {"kind", "code", "message", "field"}}`.
"""

import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from curate import __version__
from curate.browse.store import Browser
from curate.catalog import Catalog
from curate.settings import Settings
from schemas.api import ErrorBody, ErrorDetail, FieldMessage, Health
from schemas.errors import CurateError, ErrorKind
from services.api import auth, images, jobs, results, sets
from services.api.auth import AuthError, TokenCache, authorize
from services.api.manager import JobManager
from services.api.settings import ServiceSettings
from services.api.warm import IndexWarmer

log = logging.getLogger("curate.api")

UI_DIR = Path(__file__).resolve().parent.parent / "ui" / "static"

# The one table from error kinds to HTTP statuses.
HTTP_STATUS: dict[ErrorKind, int] = {
    ErrorKind.INPUT: 422,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.CONFLICT: 409,
    ErrorKind.MODEL: 422,
    ErrorKind.DATA: 422,
    ErrorKind.INTERNAL: 500,
}
_HTTP_CODES = {404: ("not_found", "route_not_found"), 405: ("input", "method_not_allowed")}


def _error(
    status: int,
    kind: str,
    code: str,
    message: str,
    field: str | None = None,
    details: list[FieldMessage] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorBody(
        error=ErrorDetail(kind=kind, code=code, message=message, field=field, details=details or [])
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def _dotted(loc: tuple | list) -> str:
    return ".".join(str(part) for part in loc)


async def _curate_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, CurateError)
    if isinstance(error, AuthError):
        status = error.http_status
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    else:
        status, headers = HTTP_STATUS[error.kind], None
    if status >= 500:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=error)
    field = getattr(error, "field", None)
    return _error(status, str(error.kind), error.code, str(error), field, headers=headers)


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    items = list(error.errors())
    details = [
        FieldMessage(field=_dotted(item.get("loc", ())), message=item.get("msg", ""))
        for item in items
    ]
    first = items[0] if items else {}
    malformed = first.get("type") == "json_invalid"
    if malformed:  # pydantic's location is a character offset, not a field
        details = [FieldMessage(field="body", message=first.get("msg", "not JSON"))]
    return _error(
        400 if malformed else 422,
        str(ErrorKind.INPUT),
        "malformed_request" if malformed else "validation_failed",
        "; ".join(f"{d.field}: {d.message}" for d in details) or "invalid request",
        details[0].field if details else None,
        details,
    )


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    kind, code = _HTTP_CODES.get(error.status_code, ("input", "http_error"))
    message = str(error.detail)
    if error.status_code == 404:
        message = f"no such route: {request.method} {request.url.path}"
    return _error(error.status_code, kind, code, message, headers=error.headers)


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    log.error("bug on %s %s", request.method, request.url.path, exc_info=error)
    return _error(500, "internal", "internal", f"internal error: {type(error).__name__}")


_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


async def _no_route(request: Request) -> JSONResponse:
    raise HTTPException(404)


def create_app(settings: Settings | None = None, service: ServiceSettings | None = None) -> FastAPI:
    settings = settings or Settings()
    service = service or ServiceSettings()
    catalog = Catalog(settings.catalog_file, settings.root)
    manager = JobManager(settings, service, catalog)

    browser = Browser(settings, catalog, service.thumb_dir)
    warmer = IndexWarmer(browser, catalog)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Jobs whose driver died while no service watched read as failed from the start.
        manager.reconcile()
        if service.warm_indexes:
            warmer.start()
        try:
            yield
        finally:
            await run_in_threadpool(warmer.stop)

    app = FastAPI(
        title="lvd-curate",
        version=__version__,
        description="Curation jobs, seed sets and their results over REST (README: Service).",
        dependencies=[Depends(authorize)],
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = service
    app.state.catalog = catalog
    app.state.manager = manager
    app.state.tokens = TokenCache(catalog)
    app.state.browser = browser
    app.state.warmer = warmer
    app.state.thumb_dir = service.thumb_dir or settings.thumb_dir

    app.add_exception_handler(CurateError, _curate_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    if service.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=service.cors_origins,
            allow_credentials=True,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
            expose_headers=["X-Next-Offset"],
        )

    @app.get("/v1/health", tags=["health"], summary="liveness; needs no token")
    def health() -> Health:
        return Health(status="ok", version=__version__, auth=service.auth)

    app.include_router(auth.router, prefix="/v1")
    app.include_router(jobs.router, prefix="/v1")
    app.include_router(sets.router, prefix="/v1")
    app.include_router(results.router, prefix="/v1")
    app.include_router(images.router, prefix="/v1")
    # Unknown /v1 paths are 404 (the UI's files below would answer 405 to a POST).
    app.add_route("/v1/{rest:path}", _no_route, methods=_ALL_METHODS, include_in_schema=False)
    # After every router: the UI's files answer whatever /v1 does not.
    app.mount("/", StaticFiles(directory=UI_DIR, html=True), name="ui")
    return app
