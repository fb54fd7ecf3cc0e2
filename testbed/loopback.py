"""The one way the test bed serves HTTP: an aiohttp application on a loopback port."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from aiohttp import web


@dataclass
class Loopback:
    """An application served on 127.0.0.1; :meth:`close` stops it."""

    runner: web.AppRunner
    port: int

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        """Stop serving."""
        await self.runner.cleanup()


async def serve(app: web.Application, port: int = 0, shutdown_timeout: float = 0.5) -> Loopback:
    """Serve ``app`` on 127.0.0.1 (a free port unless ``port`` is given), access log off.

    No access log: some servers here see presigned URLs, whose signatures must not be logged.
    """
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        bound = int(sock.getsockname()[1])
        await web.SockSite(runner, sock).start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    return Loopback(runner, bound)
