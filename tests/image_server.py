"""A real aiohttp server for image fetch tests: good images, delays, redirects, 404, 429, 503, bombs.

It runs in a background thread with its own loop, on a loopback address (never anything else).
"""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import time
import zlib
from collections import defaultdict

from aiohttp import web
from PIL import Image


def png(size=(8, 8), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def png_bomb(width=30_000, height=30_000) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression bomb's signature)."""
    data = bytearray(png((1, 1)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


class ImageServer:
    """Serves test images at ``http://HOST:PORT/...``; ``hits[path]`` lists request times."""

    def __init__(self, host: str = "127.0.0.1", oversized: int = 51 * 1024 * 1024):
        from tests.cluster.sandbox import NODE_IP

        # Loopback, or the node's IP in the cluster tests' own network namespace (tests/cluster/sandbox.py).
        assert host.startswith("127.") or host == NODE_IP, "test servers live on loopback or in the sandbox"
        self.host, self.port = host, 0
        self.oversized = oversized
        self.hits: dict[str, list[float]] = defaultdict(list)
        self.image = png()
        self._loop = None
        self._runner = None
        self._thread = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _app(self) -> web.Application:
        app = web.Application()
        image = self.image

        async def record(request):
            self.hits[request.path].append(time.monotonic())
            return len(self.hits[request.path])

        async def ok(request):
            await record(request)
            return web.Response(body=image, content_type="image/png")

        async def sized(request):  # a PNG of the size its name says: rows whose images tell apart
            await record(request)
            size = (int(request.match_info["w"]), int(request.match_info["h"]))
            return web.Response(body=png(size), content_type="image/png")

        async def slow(request):
            await record(request)
            await asyncio.sleep(float(request.query.get("s", "5")))
            return web.Response(body=image, content_type="image/png")

        async def redirect(request):
            await record(request)
            n = int(request.match_info["n"])
            target = "/img/ok.png" if n <= 1 else f"/redirect/{n - 1}"
            raise web.HTTPFound(target)

        async def redirect_to(request):
            await record(request)
            raise web.HTTPFound(request.query["url"])

        async def missing(request):
            await record(request)
            raise web.HTTPNotFound()

        async def busy(request):  # 429 with Retry-After once, then the image
            if await record(request) == 1:
                return web.Response(status=429, headers={"Retry-After": "1"}, text="slow down")
            return web.Response(body=image, content_type="image/png")

        async def always_busy(request):
            await record(request)
            return web.Response(status=429, headers={"Retry-After": "0"}, text="slow down")

        async def flaky(request):  # 503 twice, then the image
            if await record(request) <= 2:
                return web.Response(status=503, text="unavailable")
            return web.Response(body=image, content_type="image/png")

        async def big(request):  # honest Content-Length, over the limit
            await record(request)
            return web.Response(body=b"\0" * self.oversized, content_type="image/png")

        async def big_chunked(request):  # no Content-Length: the limit is counted while reading
            await record(request)
            response = web.StreamResponse(headers={"Content-Type": "image/png"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            chunk = b"\0" * (1 << 20)
            try:
                for _ in range(self.oversized // len(chunk) + 2):
                    await response.write(chunk)
            except (ConnectionResetError, RuntimeError):
                pass  # the client hung up at its limit, as it should
            return response

        async def bomb(request):
            await record(request)
            return web.Response(body=png_bomb(), content_type="image/png")

        async def gzip_bomb(request):  # a small body that inflates past the byte limit
            await record(request)
            return web.Response(body=self._gzip_bomb(), content_type="image/png",
                                headers={"Content-Encoding": "gzip"})

        async def not_image(request):
            await record(request)
            return web.Response(text="<html>hello</html>", content_type="text/html")

        app.add_routes([web.get("/img/{name}", ok), web.get(r"/sized/{w:\d+}x{h:\d+}.png", sized),
                        web.get("/slow", slow),
                        web.get("/redirect/{n}", redirect), web.get("/redirect-to", redirect_to),
                        web.get("/missing.png", missing), web.get("/busy.png", busy),
                        web.get("/always-busy.png", always_busy), web.get("/flaky.png", flaky),
                        web.get("/big.png", big), web.get("/big-chunked.png", big_chunked),
                        web.get("/bomb.png", bomb), web.get("/gzip-bomb.png", gzip_bomb),
                        web.get("/page.html", not_image)])
        return app

    def _gzip_bomb(self) -> bytes:
        if not hasattr(self, "_bomb"):
            packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
            zeros = b"\0" * (1 << 24)
            self._bomb = b"".join(packer.compress(zeros) for _ in range(self.oversized // len(zeros) + 1))
            self._bomb += packer.flush()
        return self._bomb

    def start(self) -> ImageServer:
        ready = threading.Event()

        def serve():
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            self._runner = web.AppRunner(self._app(), shutdown_timeout=0.5)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, self.host, 0)
            loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            pending = asyncio.all_tasks(loop)  # handlers still sleeping (the slow route)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=serve, name="image-server", daemon=True)
        self._thread.start()
        assert ready.wait(30), "image server did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._loop = None

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
