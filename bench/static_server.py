"""A minimal HTTP/1.1 file server on 127.0.0.1 for the crawl benchmarks.

Every file is read into memory before the port is printed (so that no crawler, the first one
run included, waits on the disk), and requests are parsed no further than the request line, so
the server costs next to nothing per request and the benchmark measures the crawlers, not the
server they share. Prints its port, then serves until killed.
"""

import asyncio
import sys
from pathlib import Path

_TYPES = {".jpg": b"image/jpeg", ".png": b"image/png", ".webp": b"image/webp"}


class FileServer(asyncio.Protocol):
    def __init__(self, root: Path, cache: dict[str, bytes]):
        self.root = root
        self.cache = cache
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            path = head.split(b"\r\n", 1)[0].split(b" ")[1].decode()
            self.respond(path)

    def respond(self, path: str) -> None:
        body = self.cache.get(path)
        if body is None:
            file = (self.root / path.lstrip("/")).resolve()
            if file.is_relative_to(self.root) and file.is_file():
                body = self.cache[path] = file.read_bytes()
        if body is None:
            self.transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            return
        kind = _TYPES.get(Path(path).suffix, b"application/octet-stream")
        head = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (
            kind,
            len(body),
        )
        self.transport.write(head + body)


async def serve(root: Path) -> None:
    loop = asyncio.get_running_loop()
    cache = {f"/{p.relative_to(root)}": p.read_bytes() for p in root.rglob("*") if p.is_file()}
    server = await loop.create_server(lambda: FileServer(root, cache), "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(Path(sys.argv[1]).resolve()))
