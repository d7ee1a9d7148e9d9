"""Fetch URLs politely and defensively: bounded, retried, redirect-checked, opt-out aware.

Every per-URL problem comes back as a `Fetched` with a stable `Reason`; `fetch` never raises
for one. An empty 2xx body comes back as `data=b""` with no reason: the decoder owns the
EMPTY verdict, so a fetch reports only transport problems.
"""

import asyncio
import ipaddress
import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from curate.settings import CrawlSettings
from schemas.reasons import Reason

__all__ = ["Crawler", "Fetched", "is_blocked_address"]

_SCHEMES = frozenset({"http", "https"})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_OPT_OUTS = frozenset({"noai", "noimageai"})
_CHUNK = 64 << 10

_E = TypeVar("_E", bound=BaseException)


@dataclass(frozen=True)
class Fetched:
    url: str  # the URL asked for
    final_url: str  # after redirects
    data: bytes | None  # body on success, None on failure
    reason: Reason | None  # None on success
    detail: str  # human-readable detail on failure, "" on success
    status: int | None  # last HTTP status seen, if any
    attempts: int  # requests made, retries included


def is_blocked_address(address: str) -> bool:
    """Whether the crawler must not connect to `address` when private networks are off."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return True  # fail closed on anything we cannot classify
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv4 address tunnelled inside IPv6 reaches the IPv4 host: judge that one.
        ip = ip.ipv4_mapped or ip.sixtofour or ip
    return not ip.is_global or ip.is_multicast or ip.is_reserved


class BlockedAddressError(OSError):
    """A destination refused by the network policy (an OSError, as resolvers must raise)."""


class _PolicyResolver(AbstractResolver):
    """Refuses a host if any of its addresses is blocked.

    Checking here, rather than resolving separately beforehand, means the connection is made to
    exactly the addresses checked: no window for DNS rebinding between check and connect.
    """

    def __init__(self, inner: AbstractResolver, allow_private: bool) -> None:
        self._inner = inner
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if not self._allow_private:
            for result in results:
                if is_blocked_address(result["host"]):
                    raise BlockedAddressError(
                        f"{host} resolves to {result['host']}, not a public address"
                    )
        return results

    async def close(self) -> None:
        await self._inner.close()


class _Failure(Exception):
    def __init__(
        self,
        reason: Reason,
        detail: str,
        *,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.retryable = retryable
        self.retry_after = retry_after


@dataclass
class _Trace:
    final_url: str
    status: int | None = None
    attempts: int = 0
    retries: int = 0


class _Slots:
    """In-flight limits held around each request.

    aiohttp counts time spent queueing for a pooled connection against the request's timeout;
    a caller that starts thousands of fetches at once would then see spurious timeouts. Waiting
    here first means the timeout clock only runs once the connector has a free connection.
    """

    def __init__(self, total: int, per_host: int) -> None:
        self._total = asyncio.Semaphore(total)
        self._per_host = per_host
        self._hosts: dict[tuple[str, str, int | None], tuple[asyncio.Semaphore, int]] = {}

    @asynccontextmanager
    async def hold(self, key: tuple[str, str, int | None]) -> AsyncIterator[None]:
        host, users = self._hosts.get(key) or (asyncio.Semaphore(self._per_host), 0)
        self._hosts[key] = (host, users + 1)
        try:
            # Host first, so a request queued behind its host does not sit on a global slot.
            async with host, self._total:
                yield
        finally:
            host, users = self._hosts[key]
            # Forget idle hosts, or a long crawl keeps one semaphore per host it ever saw.
            if users == 1:
                del self._hosts[key]
            else:
                self._hosts[key] = (host, users - 1)


class Crawler:
    """Use as `async with Crawler(settings) as crawler: await crawler.fetch(url)`.

    The timeouts bound each request (every redirect hop and every retry is one), not a whole
    fetch; retries draw on one budget per fetch, shared by all its hops.
    """

    def __init__(self, settings: CrawlSettings) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._resolver: _PolicyResolver | None = None
        self._slots = _Slots(settings.concurrency, settings.per_host)

    async def __aenter__(self) -> "Crawler":
        s = self._settings
        self._resolver = _PolicyResolver(DefaultResolver(), s.allow_private_networks)
        connector = aiohttp.TCPConnector(
            limit=s.concurrency, limit_per_host=s.per_host, resolver=self._resolver
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=s.timeout_s, connect=s.connect_timeout_s),
            headers={"User-Agent": s.user_agent},
            # No cookies carried between unrelated sites, and no proxy from the environment:
            # a proxy would connect on our behalf and bypass the address checks.
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._resolver is not None:
            # The connector closes only resolvers it created itself.
            await self._resolver.close()
            self._resolver = None

    async def fetch(self, url: str) -> Fetched:
        trace = _Trace(final_url=url)
        data: bytes | None = None
        reason: Reason | None = None
        detail = ""
        try:
            data = await self._follow(url, trace)
        except _Failure as failure:
            reason, detail = failure.reason, failure.detail
        return Fetched(url, trace.final_url, data, reason, detail, trace.status, trace.attempts)

    async def _follow(self, url: str, trace: _Trace) -> bytes:
        current = self._checked(url, "")
        seen = {current}
        while True:
            trace.final_url = str(current)
            outcome = await self._with_retries(current, trace)
            if isinstance(outcome, bytes):
                return outcome
            target = self._checked(outcome, "redirect to ")
            if target in seen:
                raise _Failure(Reason.REDIRECT_LOOP, f"redirect loop back to {target}")
            if len(seen) > self._settings.max_redirects:
                raise _Failure(
                    Reason.TOO_MANY_REDIRECTS, f"more than {self._settings.max_redirects} redirects"
                )
            seen.add(target)
            current = target

    def _checked(self, url: str | URL, context: str) -> URL:
        """Parse and vet one hop; IP literals never reach the resolver, so they are judged here."""
        try:
            parsed = URL(url) if isinstance(url, str) else url
            scheme, host = parsed.scheme, parsed.host
        except (ValueError, TypeError) as exc:
            raise _Failure(Reason.BAD_URL, f"{context}malformed URL: {exc}") from exc
        if scheme not in _SCHEMES:
            raise _Failure(Reason.BAD_URL, f"{context}unsupported scheme {scheme!r}")
        if not host:
            raise _Failure(Reason.BAD_URL, f"{context}URL without a host")
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            # Digits and dots that are not a dotted quad (127.1, 2130706433) are legacy forms the
            # socket layer would still map onto an address: refuse them outright.
            if host.replace(".", "").isdigit():
                raise _Failure(Reason.BAD_URL, f"{context}non-canonical address {host}") from None
        else:
            if not self._settings.allow_private_networks and is_blocked_address(str(literal)):
                raise _Failure(Reason.BLOCKED_ADDRESS, f"{context}{literal}, not a public address")
        # The fragment never goes on the wire; without it, loop detection sees equal hops.
        return parsed.with_fragment(None)

    async def _with_retries(self, url: URL, trace: _Trace) -> bytes | URL:
        s = self._settings
        while True:
            trace.attempts += 1
            try:
                return await self._attempt(url, trace)
            except _Failure as failure:
                if not failure.retryable or trace.retries >= s.retries:
                    raise
                if failure.retry_after is not None:
                    delay = min(failure.retry_after, s.max_backoff_s)
                else:
                    delay = s.backoff_s * 2 ** min(trace.retries, 32)
                    # Jitter spreads out retries of many fetches that failed together.
                    delay = min(delay * (1 + random.uniform(0, 0.1)), s.max_backoff_s)
                trace.retries += 1
                await asyncio.sleep(delay)

    async def _attempt(self, url: URL, trace: _Trace) -> bytes | URL:
        """One request: the body of a 2xx, the next URL of a redirect, or a _Failure."""
        assert self._session is not None, "use Crawler as an async context manager"
        async with self._slots.hold((url.scheme, url.host or "", url.port)):
            try:
                async with self._session.get(url, allow_redirects=False) as response:
                    trace.status = response.status
                    return await self._read(url, response)
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                raise self._failure(exc) from exc

    async def _read(self, url: URL, response: aiohttp.ClientResponse) -> bytes | URL:
        status = response.status
        if status in _REDIRECTS:
            location = response.headers.get(aiohttp.hdrs.LOCATION)
            if not location:
                raise _Failure(Reason.HTTP_STATUS, f"HTTP {status} without Location")
            try:
                return url.join(URL(location))
            except ValueError as exc:
                raise _Failure(Reason.BAD_URL, f"bad redirect Location {location!r}") from exc
        if status == 429 or 500 <= status <= 599:
            raise _Failure(
                Reason.HTTP_STATUS,
                f"HTTP {status}",
                retryable=True,
                retry_after=_retry_after(response.headers.get(aiohttp.hdrs.RETRY_AFTER)),
            )
        if not 200 <= status <= 299:
            raise _Failure(Reason.HTTP_STATUS, f"HTTP {status}")

        for value in response.headers.getall("X-Robots-Tag", ()):
            if _opts_out(value):
                raise _Failure(Reason.ROBOTS_OPT_OUT, f"X-Robots-Tag: {value}")

        limit = self._settings.max_bytes
        length = response.content_length
        if length is not None and length > limit:
            raise _Failure(Reason.TOO_LARGE, f"Content-Length {length} exceeds {limit} bytes")
        body = bytearray()
        # Counted as decoded, so a small compressed body cannot inflate past the cap.
        async for chunk in response.content.iter_chunked(_CHUNK):
            body += chunk
            if len(body) > limit:
                raise _Failure(Reason.TOO_LARGE, f"body exceeds {limit} bytes")
        return bytes(body)

    def _failure(self, exc: BaseException) -> _Failure:
        """Map an aiohttp or socket error onto a reason, and whether another try may help."""
        s = self._settings
        blocked = _cause(exc, BlockedAddressError)
        if blocked is not None:
            # aiohttp wraps OSErrors from the resolver in ClientConnectorDNSError: unwrap first.
            return _Failure(Reason.BLOCKED_ADDRESS, str(blocked))
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return _Failure(Reason.TIMEOUT, f"connect timed out after {s.connect_timeout_s}s")
        if isinstance(exc, TimeoutError):
            return _Failure(Reason.TIMEOUT, f"timed out after {s.timeout_s}s")
        if isinstance(exc, aiohttp.InvalidURL):
            return _Failure(Reason.BAD_URL, _describe(exc))
        if isinstance(exc, aiohttp.ClientConnectorDNSError):
            return _Failure(Reason.DNS_ERROR, f"cannot resolve {exc.host}: {exc.os_error}")
        if isinstance(exc, aiohttp.ClientSSLError):
            # Certificate and handshake failures do not heal on their own.
            return _Failure(Reason.CONNECTION_ERROR, _describe(exc))
        if isinstance(
            exc,
            aiohttp.ClientConnectorError
            | aiohttp.ServerDisconnectedError
            | aiohttp.ClientPayloadError
            | aiohttp.ClientOSError
            | ConnectionError,
        ):
            return _Failure(Reason.CONNECTION_ERROR, _describe(exc), retryable=True)
        if isinstance(exc, aiohttp.ClientResponseError):
            # aiohttp's verdict on a malformed response: the server spoke, but not HTTP.
            return _Failure(Reason.READ_ERROR, _describe(exc))
        if isinstance(exc, ValueError):
            return _Failure(Reason.BAD_URL, _describe(exc))
        return _Failure(Reason.CONNECTION_ERROR, _describe(exc))


def _cause(exc: BaseException | None, kind: type[_E]) -> _E | None:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _retry_after(value: str | None) -> float | None:
    # Only delta-seconds; an HTTP-date falls back to our own backoff.
    value = (value or "").strip()
    return float(value) if value.isascii() and value.isdigit() else None


def _opts_out(value: str) -> bool:
    """Whether one X-Robots-Tag value carries noai or noimageai, for any user agent."""
    for token in value.split(","):
        # "somebot: noai" names the agent before the colon; the directive follows it.
        directive = token.rpartition(":")[2]
        if directive.strip().lower() in _OPT_OUTS:
            return True
    return False
