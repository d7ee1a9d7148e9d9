"""Who may call the service: API tokens (`curate tokens create`), sent as `Authorization: Bearer`
or held in the `curate_session` cookie that `POST /v1/session` sets for the web UI.

`authorize` guards every /v1 route (create_app installs it app-wide, so no router can forget it):
reads need a `read` or `write` token, anything else a `write` token. `require_read` and
`require_write` are the same checks for a route that wants to say so explicitly. With auth off
(`curate serve --no-auth`) every request passes.
"""

import threading
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response, status
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from curate.catalog import Catalog
from curate.catalog_service import token_sha256
from schemas.api import SessionRequest
from schemas.errors import CurateError, ErrorKind

SESSION_COOKIE = "curate_session"
# Routes anyone may call: the health check, and signing in or out.
PUBLIC_PATHS = frozenset({"/v1/health", "/v1/session"})
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

_bearer = HTTPBearer(auto_error=False, description="an API token: `curate tokens create`")
_cookie = APIKeyCookie(name=SESSION_COOKIE, auto_error=False, description="set by POST /v1/session")


class AuthError(CurateError):
    kind = ErrorKind.INPUT
    http_status = 401
    code = "unauthenticated"


class Unauthenticated(AuthError):
    """No credentials, or a token that is unknown or revoked."""


class Forbidden(AuthError):
    """A valid token without the scope the request needs."""

    http_status = 403
    code = "forbidden"


class TokenCache:
    """Token look-ups, kept until a token is created or revoked: opening the catalog costs
    ~15 ms, and a request should not pay it twice. Creating or revoking a token (in any
    process: `curate tokens revoke` too) changes the catalog's tokens stamp, which empties the
    cache, so a revoked token is refused on its next request; a job committing parts does not."""

    _MAX = 1024

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._tokens: dict[str, dict[str, Any] | None] = {}

    def cached(self, secret: str) -> tuple[bool, dict[str, Any] | None]:
        """(True, the token or None) when the cache knows the secret, else (False, None); reads
        nothing but the stamp (one stat), so the event loop may call it."""
        key = token_sha256(secret)
        stamp = self.catalog.tokens_stamp()
        with self._lock:
            if stamp != self._stamp or len(self._tokens) > self._MAX:
                self._tokens.clear()
                self._stamp = stamp
            if key in self._tokens:
                return True, self._tokens[key]
        return False, None

    def lookup(self, secret: str) -> dict[str, Any] | None:
        known, token = self.cached(secret)
        if known:
            return token
        key = token_sha256(secret)
        # Before the read: a token change after it empties the cache.
        stamp = self.catalog.tokens_stamp()
        token = self.catalog.token_for(secret)
        with self._lock:
            if stamp == self._stamp:
                self._tokens[key] = token
        return token


async def _credentials(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    session: Annotated[str | None, Depends(_cookie)],
) -> dict[str, Any] | None:
    """The caller's token record; None with auth off. Unauthenticated without a valid one.

    Async, and the catalog is read in a worker thread only on a cache miss: a sync dependency
    costs every request a hop to the thread pool, which under load took more of the server's
    time than the request itself (bench/service.py, py-spy)."""
    if not request.app.state.service.auth:
        return None
    secret = bearer.credentials if bearer is not None else session
    if not secret:
        raise Unauthenticated(
            "this service needs an API token: send `Authorization: Bearer <token>` "
            "(create one with `curate tokens create --scope read`)"
        )
    tokens: TokenCache = request.app.state.tokens
    known, token = tokens.cached(secret)
    if not known:
        token = await run_in_threadpool(tokens.lookup, secret)
    if token is None:
        raise Unauthenticated("the token is unknown or revoked")
    return token


Credentials = Annotated[dict[str, Any] | None, Depends(_credentials)]


def _needs(token: dict[str, Any] | None, scope: str) -> None:
    if token is not None and scope == "write" and token["scope"] != "write":
        raise Forbidden(f"token {token['token_id']} is read-only; this request needs a write token")


async def require_read(token: Credentials) -> dict[str, Any] | None:
    return token


async def require_write(token: Credentials) -> dict[str, Any] | None:
    _needs(token, "write")
    return token


async def authorize(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    session: Annotated[str | None, Depends(_cookie)],
) -> None:
    """The app-wide guard: public routes pass, reads need `read`, the rest `write`."""
    if request.url.path in PUBLIC_PATHS:
        return
    token = await _credentials(request, bearer, session)
    _needs(token, "read" if request.method in READ_METHODS else "write")
    request.state.token = token


router = APIRouter(tags=["session"])


@router.post(
    "/session",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="sign in: keep the token in an HttpOnly cookie (the web UI)",
)
def sign_in(body: SessionRequest, request: Request, response: Response) -> None:
    if request.app.state.service.auth and request.app.state.tokens.lookup(body.token) is None:
        raise Unauthenticated("the token is unknown or revoked")
    response.set_cookie(
        SESSION_COOKIE,
        body.token,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )


@router.delete("/session", status_code=status.HTTP_204_NO_CONTENT, summary="sign out")
def sign_out(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
