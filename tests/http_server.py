"""A real HTTP server on 127.0.0.1, in a background thread, for crawler and ingest tests."""

import asyncio
import threading
from collections import Counter
from collections.abc import Callable

from aiohttp import web

Routes = Callable[["ServedSite"], list[web.RouteDef]]


class ServedSite:
    """An aiohttp app on an ephemeral 127.0.0.1 port; `hits` counts requests per path."""

    def __init__(self, routes: Routes):
        self.hits: Counter[str] = Counter()
        self._routes = routes
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    def __enter__(self) -> "ServedSite":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _start(self) -> None:
        @web.middleware
        async def count(request: web.Request, handler):
            self.hits[request.path] += 1
            return await handler(request)

        app = web.Application(middlewares=[count])
        app.add_routes(self._routes(self))
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"
