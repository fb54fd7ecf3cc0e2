"""What an S3 existence check costs the service: botocore's HeadObject against a presigned HEAD.

Starts moto's S3 server in a process of its own, then times both ways of
checking the same objects from this process, and prints this process's CPU
milliseconds per check (the server's own CPU is not counted). It does so twice:
against moto's S3 server, which closes every connection, and against a
keep-alive HEAD responder (as S3 itself keeps connections). Run with
``python -m bench.s3_head [N]``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from aiohttp import web

from bench.servers import AWS
from testbed.loopback import serve
from testbed.support import free_port

N = 1000
CONCURRENCY = 32


async def cpu_ms_per_call(call: Callable[[int], Awaitable[object]], n: int) -> float:
    """This process's CPU time per ``call``, ``CONCURRENCY`` at a time, after a warm-up."""
    limit = asyncio.Semaphore(CONCURRENCY)

    async def bounded(i: int) -> None:
        async with limit:
            await call(i)

    await asyncio.gather(*(bounded(i) for i in range(min(n, 100))))
    started = time.process_time()
    await asyncio.gather(*(bounded(i) for i in range(n)))
    return (time.process_time() - started) / n * 1000


async def checks(endpoint: str, n: int, *, moto: bool) -> dict[str, float]:
    """CPU ms per check, both ways, against ``endpoint``."""
    config = AioConfig(signature_version="s3v4", max_pool_connections=CONCURRENCY * 2)
    async with (
        get_session().create_client("s3", endpoint_url=endpoint, config=config) as s3,
        aiohttp.ClientSession() as http,
    ):
        if moto:
            await s3.create_bucket(Bucket="bench-head")
            for i in range(8):
                await s3.put_object(Bucket="bench-head", Key=f"k{i}", Body=b"x" * 1024)

        async def head_object(i: int) -> object:
            return await s3.head_object(Bucket="bench-head", Key=f"k{i % 8}")

        async def presigned_head(i: int) -> object:
            url = await s3.generate_presigned_url(
                "head_object", Params={"Bucket": "bench-head", "Key": f"k{i % 8}"}, ExpiresIn=60
            )
            async with http.head(url) as response:
                response.raise_for_status()
                return response.headers

        return {
            "botocore_head_object_cpu_ms": round(await cpu_ms_per_call(head_object, n), 3),
            "presigned_head_cpu_ms": round(await cpu_ms_per_call(presigned_head, n), 3),
        }


async def listening(port: int, timeout: float = 60) -> None:
    """Wait until something accepts connections on loopback ``port``."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return


async def serve_heads(port: int) -> None:
    """A keep-alive HEAD responder with S3's headers: the client's side of a persistent S3."""

    async def head(_: web.Request) -> web.Response:
        return web.Response(
            headers={
                "Content-Type": "video/mp4",
                "Content-Length": "1024",
                "ETag": '"0f343b0931126a20f133d67c2b018a3b"',
                "Last-Modified": "Wed, 25 Nov 2026 10:00:00 GMT",
                "x-amz-request-id": "BENCH",
            }
        )

    app = web.Application()
    app.router.add_route("HEAD", "/{tail:.*}", head)
    await serve(app, port)
    await asyncio.Event().wait()


async def main(n: int) -> None:
    """Time both checks against moto (which closes every connection) and a keep-alive server."""
    os.environ.update(AWS)
    results: dict[str, dict[str, float]] = {}
    for name, command in (
        ("moto", ["-m", "moto.server", "-H", "127.0.0.1", "-p"]),
        ("keep_alive", ["-m", "bench.s3_head", "serve"]),
    ):
        port = free_port()
        server = await asyncio.create_subprocess_exec(
            sys.executable,
            *command,
            str(port),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await listening(port)
            results[name] = await checks(f"http://127.0.0.1:{port}", n, moto=name == "moto")
        finally:
            server.terminate()
            await server.wait()
    print(orjson.dumps(results).decode())


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        asyncio.run(serve_heads(int(sys.argv[2])))
    else:
        asyncio.run(main(int(sys.argv[1]) if sys.argv[1:] else N))
