"""The crawler against real HTTP servers on 127.0.0.1; nothing here leaves the machine."""

import asyncio
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from urllib.parse import quote

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from curate.settings import CrawlSettings
from curate.stages.ingest import crawl
from curate.stages.ingest.crawl import Crawler, Fetched, is_blocked_address
from schemas.reasons import Reason
from tests.http_server import ServedSite
from tests.images import jpeg, truncated_jpeg

MAX_BYTES = 64 << 10
JPEG = jpeg()
TRUNCATED = truncated_jpeg()
HTML = b"<!doctype html><html><body><p>not an image</p></body></html>"
SETTINGS = CrawlSettings(
    timeout_s=0.5,
    connect_timeout_s=0.5,
    retries=2,
    backoff_s=0.01,
    max_backoff_s=0.05,
    max_bytes=MAX_BYTES,
    max_redirects=3,
    allow_private_networks=True,
)
assert len(JPEG) < MAX_BYTES

RETRY_LATER = {"Retry-After": "3600"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
IN_FLIGHT: Counter[str] = Counter()  # requests inside /pause now, and the most at once


def _image(headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=JPEG, content_type="image/jpeg", headers=headers)


async def _chunked(request: web.Request, chunks: int, size: int) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    for _ in range(chunks):
        await response.write(b"\xff" * size)
    await response.write_eof()
    return response


def answer(make: Callable[[web.Request], web.StreamResponse]) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return make(request)

    return handler


def _routes(site: ServedSite) -> list[web.RouteDef]:
    def redirect(location: str, status: int = 302) -> web.Response:
        return web.Response(status=status, headers={"Location": location})

    async def flaky(request: web.Request) -> web.Response:
        # Per-test state: each test uses its own path, and hits already counts this request.
        if site.hits[request.path] == 1:
            return web.Response(status=429, headers={"Retry-After": "0"})
        return _image()

    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await response.prepare(request)
        await response.write(JPEG[:100])
        await asyncio.sleep(2)
        await response.write(JPEG[100:])
        return response

    async def pause(request: web.Request) -> web.Response:
        IN_FLIGHT["now"] += 1
        IN_FLIGHT["peak"] = max(IN_FLIGHT["peak"], IN_FLIGHT["now"])
        try:
            await asyncio.sleep(0.15)
        finally:
            IN_FLIGHT["now"] -= 1
        return _image()

    async def chain(request: web.Request) -> web.Response:
        step = int(request.match_info["step"])
        return _image() if step >= 5 else redirect(f"/chain/{step + 1}")

    routes = [
        web.get("/image.jpg", answer(lambda r: _image())),
        web.get("/missing", answer(lambda r: web.Response(status=404))),
        web.get("/error", answer(lambda r: web.Response(status=500))),
        web.get("/unavailable", answer(lambda r: web.Response(status=503, headers=RETRY_LATER))),
        web.get("/flaky/{test}", flaky),
        web.get("/slow", slow),
        web.get("/pause/{n}", pause),
        web.get("/loop/a", answer(lambda r: redirect("b", 301))),  # relative Locations
        web.get("/loop/b", answer(lambda r: redirect("/loop/a", 307))),
        web.get("/chain/{step}", chain),
        web.get("/no-location", answer(lambda r: web.Response(status=302))),
        web.get("/redirect", answer(lambda r: redirect(r.query["to"]))),
        web.get("/big", answer(lambda r: web.Response(body=b"\xff" * (MAX_BYTES + 1)))),
        web.get("/big-chunked", partial(_chunked, chunks=16, size=16 << 10)),
        web.get("/exact-chunked", partial(_chunked, chunks=4, size=MAX_BYTES // 4)),
        web.get("/page.html", answer(lambda r: web.Response(body=HTML, content_type="text/html"))),
        web.get("/truncated.jpg", answer(lambda r: web.Response(body=TRUNCATED))),
        web.get("/empty", answer(lambda r: web.Response(body=b""))),
        web.get("/user-agent", answer(lambda r: web.Response(text=r.headers["User-Agent"]))),
        web.get("/noai", answer(lambda r: _image({"X-Robots-Tag": "noai"}))),
        web.get("/otherbot", answer(lambda r: _image({"X-Robots-Tag": "otherbot: noimageai"}))),
        web.get("/indexing-only", answer(lambda r: _image({"X-Robots-Tag": "noindex, nofollow"}))),
    ]

    async def two_robots_headers(request: web.Request) -> web.Response:
        response = _image({"X-Robots-Tag": "noindex"})
        response.headers.add("X-Robots-Tag", "googlebot: nofollow, NoAI")
        return response

    routes.append(web.get("/two-robots-headers", two_robots_headers))
    return routes


@pytest.fixture(scope="module")
def other() -> Iterator[ServedSite]:
    with ServedSite(lambda site: [web.get("/image.jpg", answer(lambda r: _image()))]) as site:
        yield site


@pytest.fixture(scope="module")
def site() -> Iterator[ServedSite]:
    with ServedSite(_routes) as site:
        yield site


def redirect_to(site: ServedSite, target: str) -> str:
    return site.url(f"/redirect?to={quote(target, safe='')}")


def fetch(url: str, **overrides: object) -> Fetched:
    async def go() -> Fetched:
        async with Crawler(SETTINGS.model_copy(update=overrides)) as crawler:
            return await crawler.fetch(url)

    return asyncio.run(go())


def fetch_all(urls: list[str], **overrides: object) -> list[Fetched]:
    async def go() -> list[Fetched]:
        async with Crawler(SETTINGS.model_copy(update=overrides)) as crawler:
            return await asyncio.gather(*(crawler.fetch(url) for url in urls))

    return asyncio.run(go())


def assert_failed(fetched: Fetched, reason: Reason) -> None:
    assert fetched.reason is reason, fetched
    assert fetched.data is None
    assert fetched.detail


# -- success ------------------------------------------------------------------------------


def test_fetches_an_image(site: ServedSite) -> None:
    url = site.url("/image.jpg")
    fetched = fetch(url)
    assert fetched == Fetched(url, url, JPEG, None, "", 200, 1)


def test_sends_the_configured_user_agent(site: ServedSite) -> None:
    fetched = fetch(site.url("/user-agent"), user_agent="curate-test/1.0")
    assert fetched.data == b"curate-test/1.0"


def test_html_and_truncated_bodies_are_the_decoders_problem(site: ServedSite) -> None:
    assert fetch(site.url("/page.html")).data == HTML
    truncated = fetch(site.url("/truncated.jpg"))
    assert (truncated.reason, truncated.data) == (None, TRUNCATED)


def test_empty_body_is_returned_as_empty_bytes(site: ServedSite) -> None:
    fetched = fetch(site.url("/empty"))
    assert (fetched.reason, fetched.data, fetched.status) == (None, b"", 200)


def test_body_of_exactly_max_bytes_is_accepted(site: ServedSite) -> None:
    fetched = fetch(site.url("/exact-chunked"))
    assert fetched.reason is None
    assert fetched.data == b"\xff" * MAX_BYTES


# -- HTTP status and retries ----------------------------------------------------------------


def test_404_fails_at_once(site: ServedSite) -> None:
    fetched = fetch(site.url("/missing"))
    assert_failed(fetched, Reason.HTTP_STATUS)
    assert (fetched.detail, fetched.status, fetched.attempts) == ("HTTP 404", 404, 1)
    assert site.hits["/missing"] == 1


def test_5xx_is_retried_then_reported(site: ServedSite) -> None:
    before = site.hits["/error"]
    fetched = fetch(site.url("/error"), retries=3)
    assert_failed(fetched, Reason.HTTP_STATUS)
    assert (fetched.detail, fetched.status, fetched.attempts) == ("HTTP 500", 500, 4)
    assert site.hits["/error"] - before == 4


def test_no_retries_means_one_attempt(site: ServedSite) -> None:
    fetched = fetch(site.url("/error"), retries=0)
    assert (fetched.reason, fetched.attempts) == (Reason.HTTP_STATUS, 1)


def test_429_is_retried_after_retry_after_and_then_succeeds(site: ServedSite) -> None:
    url = site.url("/flaky/429-then-200")
    start = time.monotonic()
    fetched = fetch(url, backoff_s=5, max_backoff_s=10)
    assert fetched == Fetched(url, url, JPEG, None, "", 200, 2)
    assert site.hits["/flaky/429-then-200"] == 2
    assert time.monotonic() - start < 2  # Retry-After: 0 wins over the 5 s backoff


def test_retry_after_is_capped_by_max_backoff(site: ServedSite) -> None:
    start = time.monotonic()
    fetched = fetch(site.url("/unavailable"), retries=2, max_backoff_s=0.05)
    assert (fetched.reason, fetched.status, fetched.attempts) == (Reason.HTTP_STATUS, 503, 3)
    assert time.monotonic() - start < 2  # not 3600 s


def test_backoff_doubles_between_retries(site: ServedSite) -> None:
    start = time.monotonic()
    fetched = fetch(site.url("/error"), retries=3, backoff_s=0.1, max_backoff_s=10)
    assert fetched.attempts == 4
    # 0.1 + 0.2 + 0.4 s of sleeping, plus at most 10% jitter on each.
    assert 0.7 <= time.monotonic() - start < 2


def test_slow_body_times_out_without_retry(site: ServedSite) -> None:
    before = site.hits["/slow"]
    start = time.monotonic()
    fetched = fetch(site.url("/slow"))
    assert_failed(fetched, Reason.TIMEOUT)
    assert (fetched.status, fetched.attempts) == (200, 1)
    assert "0.5" in fetched.detail
    assert time.monotonic() - start < 1.5
    assert site.hits["/slow"] - before == 1


# -- redirects ------------------------------------------------------------------------------


def test_redirect_to_a_second_server(site: ServedSite, other: ServedSite) -> None:
    before = other.hits["/image.jpg"]
    fetched = fetch(redirect_to(site, other.url("/image.jpg")))
    assert fetched.reason is None
    assert fetched.data == JPEG
    assert fetched.final_url == other.url("/image.jpg")
    assert (fetched.status, fetched.attempts) == (200, 2)
    assert other.hits["/image.jpg"] - before == 1


def test_redirect_loop(site: ServedSite) -> None:
    fetched = fetch(site.url("/loop/a"), max_redirects=10)
    assert_failed(fetched, Reason.REDIRECT_LOOP)
    assert fetched.final_url == site.url("/loop/b")
    assert fetched.attempts == 2


def test_too_many_redirects(site: ServedSite) -> None:
    fetched = fetch(site.url("/chain/0"))  # 5 hops, 3 allowed
    assert_failed(fetched, Reason.TOO_MANY_REDIRECTS)
    assert fetched.attempts == 4
    assert fetched.final_url == site.url("/chain/3")


def test_exactly_max_redirects_is_allowed(site: ServedSite) -> None:
    fetched = fetch(site.url("/chain/2"))  # 3 hops
    assert fetched.reason is None
    assert fetched.final_url == site.url("/chain/5")
    assert fetched.attempts == 4


def test_zero_redirects_allowed(site: ServedSite) -> None:
    fetched = fetch(redirect_to(site, site.url("/image.jpg")), max_redirects=0)
    assert_failed(fetched, Reason.TOO_MANY_REDIRECTS)
    assert fetched.status == 302


def test_redirect_without_location(site: ServedSite) -> None:
    fetched = fetch(site.url("/no-location"))
    assert_failed(fetched, Reason.HTTP_STATUS)
    assert fetched.status == 302


def test_redirect_to_another_scheme(site: ServedSite) -> None:
    fetched = fetch(redirect_to(site, "ftp://127.0.0.1/image.jpg"))
    assert_failed(fetched, Reason.BAD_URL)
    assert "ftp" in fetched.detail


# -- size and opt-outs ----------------------------------------------------------------------


def test_content_length_over_the_cap(site: ServedSite) -> None:
    fetched = fetch(site.url("/big"))
    assert_failed(fetched, Reason.TOO_LARGE)
    assert "Content-Length" in fetched.detail
    assert fetched.attempts == 1


def test_streamed_body_over_the_cap(site: ServedSite) -> None:
    fetched = fetch(site.url("/big-chunked"))
    assert_failed(fetched, Reason.TOO_LARGE)
    assert "Content-Length" not in fetched.detail
    assert fetched.attempts == 1


@pytest.mark.parametrize("path", ["/noai", "/otherbot", "/two-robots-headers"])
def test_x_robots_tag_opt_out(site: ServedSite, path: str) -> None:
    fetched = fetch(site.url(path))
    assert_failed(fetched, Reason.ROBOTS_OPT_OUT)
    assert (fetched.status, fetched.attempts) == (200, 1)


def test_other_robots_directives_do_not_opt_out(site: ServedSite) -> None:
    assert fetch(site.url("/indexing-only")).data == JPEG


# -- bad URLs and the network policy ---------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1/x",
        "file:///etc/passwd",
        "not a url",
        "http://[::1/",
        "http:///x",
        "http://127.0.0.1:99999/",
        "http://127.1/",
        "http://2130706433/",
    ],
)
def test_bad_urls(url: str) -> None:
    fetched = fetch(url)
    assert_failed(fetched, Reason.BAD_URL)
    assert fetched.attempts == 0


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.1",
        "192.168.1.1",
        "172.16.0.1",
        "127.0.0.1",
        "169.254.1.1",
        "224.0.0.1",
        "100.64.0.1",
        "0.0.0.0",
        "240.0.0.1",
        "::1",
        "::",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "2002:7f00:1::",
        "fe80::1%eth0",
        "not an address",
    ],
)
def test_classifier_blocks(address: str) -> None:
    assert is_blocked_address(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "2001:4860:4860::8888", "::ffff:8.8.8.8"])
def test_classifier_allows(address: str) -> None:
    assert not is_blocked_address(address)


def test_private_ip_literal_is_blocked_before_any_request(site: ServedSite) -> None:
    before = site.hits["/image.jpg"]
    for host, named in [("127.0.0.1", "127.0.0.1"), ("[::ffff:127.0.0.1]", "::ffff:7f00:1")]:
        fetched = fetch(f"http://{host}:{site.port}/image.jpg", allow_private_networks=False)
        assert_failed(fetched, Reason.BLOCKED_ADDRESS)
        assert named in fetched.detail
        assert fetched.attempts == 0
    assert site.hits["/image.jpg"] == before


def test_hostname_resolving_to_loopback_is_blocked(site: ServedSite) -> None:
    before = site.hits["/image.jpg"]
    fetched = fetch(f"http://localhost:{site.port}/image.jpg", allow_private_networks=False)
    assert_failed(fetched, Reason.BLOCKED_ADDRESS)  # not DNS_ERROR, though aiohttp wraps it so
    assert "localhost" in fetched.detail and "127.0.0.1" in fetched.detail
    assert fetched.attempts == 1
    assert site.hits["/image.jpg"] == before


class _FakeDNS(AbstractResolver):
    """Names under .test, answered without any DNS traffic."""

    zone = {
        "public.test": ["127.0.0.1"],
        "private.test": ["127.0.0.2"],
        "mixed.test": ["127.0.0.1", "127.0.0.2"],
    }

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host not in self.zone:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        flags = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET,
                proto=0,
                flags=flags,
            )
            for address in self.zone[host]
        ]

    async def close(self) -> None:
        pass


@pytest.fixture
def only_127_0_0_1_is_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend 127.0.0.1 is a public address, so a policy-on crawl can reach the test server."""
    monkeypatch.setattr(crawl, "DefaultResolver", _FakeDNS)
    monkeypatch.setattr(crawl, "is_blocked_address", lambda address: address != "127.0.0.1")


@pytest.mark.usefixtures("only_127_0_0_1_is_public")
def test_policy_applies_to_every_redirect_hop(site: ServedSite) -> None:
    port = site.port
    allowed = fetch(f"http://public.test:{port}/image.jpg", allow_private_networks=False)
    assert (allowed.reason, allowed.data) == (None, JPEG)

    before = site.hits["/image.jpg"]
    for target, address in [
        (f"http://127.0.0.2:{port}/image.jpg", "127.0.0.2"),  # literal: checked before the hop
        (f"http://private.test:{port}/image.jpg", "127.0.0.2"),  # name: checked by the resolver
        (f"http://mixed.test:{port}/image.jpg", "127.0.0.2"),  # one bad address is enough
    ]:
        start = redirect_to(site, target).replace("127.0.0.1", "public.test")
        fetched = fetch(start, allow_private_networks=False)
        assert_failed(fetched, Reason.BLOCKED_ADDRESS)
        assert address in fetched.detail
        assert fetched.status == 302  # the first hop was made; the second was refused
    assert site.hits["/image.jpg"] == before


@pytest.mark.usefixtures("only_127_0_0_1_is_public")
def test_unresolvable_name_is_a_dns_error(site: ServedSite) -> None:
    fetched = fetch(f"http://missing.test:{site.port}/image.jpg", allow_private_networks=False)
    assert_failed(fetched, Reason.DNS_ERROR)
    assert "missing.test" in fetched.detail
    assert fetched.attempts == 1  # not retried


# -- connections that break ----------------------------------------------------------------


async def _raw_server(reply: Callable[[int], bytes | None]) -> tuple[asyncio.Server, list[int]]:
    """A bare TCP server; `reply(n)` answers the n-th connection, None closes it unanswered."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(len(connections) + 1)
        while (await reader.readline()) not in (b"\r\n", b""):
            pass  # the request head
        answer = reply(len(connections))
        if answer is None:
            writer.transport.abort()  # no response at all, and an RST rather than a FIN
            return
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, connections


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"


def _against_raw(reply: Callable[[int], bytes | None], **overrides: object) -> tuple[Fetched, int]:
    async def go() -> tuple[Fetched, int]:
        server, connections = await _raw_server(reply)
        async with server:
            port = server.sockets[0].getsockname()[1]
            async with Crawler(SETTINGS.model_copy(update=overrides)) as crawler:
                fetched = await crawler.fetch(f"http://127.0.0.1:{port}/x")
        return fetched, len(connections)

    return asyncio.run(go())


# aiohttp itself resends an idempotent request once when the connection drops before a response
# (RFC 9112, section 9.3.1), so one attempt of ours may be two connections.


def test_abrupt_close_is_retried_then_reported() -> None:
    fetched, connections = _against_raw(lambda n: None, retries=2)
    assert_failed(fetched, Reason.CONNECTION_ERROR)
    assert fetched.status is None
    assert fetched.attempts == 3
    assert 3 <= connections <= 6


def test_abrupt_close_twice_then_success() -> None:
    fetched, connections = _against_raw(lambda n: None if n <= 2 else OK)
    assert (fetched.reason, fetched.data, fetched.status) == (None, b"hello", 200)
    assert 2 <= fetched.attempts <= 3
    assert connections == 3


def test_truncated_payload_is_retried_as_a_connection_error() -> None:
    short = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\n0123456789"
    fetched, connections = _against_raw(lambda n: short, retries=1)
    assert_failed(fetched, Reason.CONNECTION_ERROR)
    assert (fetched.status, fetched.attempts, connections) == (200, 2, 2)


def test_garbage_instead_of_http_is_a_read_error() -> None:
    fetched, connections = _against_raw(lambda n: b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    assert_failed(fetched, Reason.READ_ERROR)
    assert (fetched.attempts, connections) == (1, 1)


def test_connection_refused_is_retried() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago, and is closed now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fetched = fetch(f"http://127.0.0.1:{port}/", retries=2)
    assert_failed(fetched, Reason.CONNECTION_ERROR)
    assert fetched.attempts == 3


# -- limits ---------------------------------------------------------------------------------


def test_queued_fetches_do_not_time_out_while_waiting_for_a_slot(site: ServedSite) -> None:
    # 8 requests of 0.15 s, one at a time: 1.2 s in all, over twice the 0.5 s timeout.
    urls = [site.url(f"/pause/{n}") for n in range(8)]
    results = fetch_all(urls, per_host=1, retries=0)
    assert [r.reason for r in results] == [None] * 8
    assert all(r.data == JPEG for r in results)


@pytest.mark.parametrize(("per_host", "concurrency"), [(2, 8), (8, 3)])
def test_in_flight_limits(site: ServedSite, per_host: int, concurrency: int) -> None:
    IN_FLIGHT.clear()
    urls = [site.url(f"/pause/limit-{n}") for n in range(8)]
    results = fetch_all(urls, per_host=per_host, concurrency=concurrency, timeout_s=5)
    assert [r.reason for r in results] == [None] * 8
    assert IN_FLIGHT["peak"] == min(per_host, concurrency)
