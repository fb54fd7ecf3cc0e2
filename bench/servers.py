"""The benchmark's peers in a process of their own: file server, fake APIs and S3.

Prints one JSON line with their addresses, then serves until stdin closes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import uuid

import orjson
from aiobotocore.session import get_session
from aiohttp import web
from moto.server import ThreadedMotoServer

from testbed.fakes import FakeInconvo, FakeMindset
from testbed.loopback import serve
from testbed.support import FileServer

MIB = 1024 * 1024
INCONVO_KEY = "bench-inconvo-key"
MINDSET_KEY = "bench-mindset-key"
S3_OBJECTS = 64
AWS = {
    "AWS_ACCESS_KEY_ID": "bench-key-id",
    "AWS_SECRET_ACCESS_KEY": "bench-secret",
    "AWS_REGION": "us-east-1",
}


def csv_bytes(size: int) -> bytes:
    """A CSV file of exactly ``size`` bytes."""
    row = b"2026-11-24,eu-west,widget,12,34.50\n"
    body = b"date,region,item,qty,price\n" + row * (size // len(row) + 1)
    return body[:size]


def control_app(inconvo: FakeInconvo) -> web.Application:
    """Lets the benchmark make the fake Inconvo sick and read what it saw (the flow scenario).

    POST /outage?seconds=S: 503 for S seconds. POST /rate?per_second=N&seconds=S: at most
    N requests a second (429 + Retry-After beyond) for S seconds. POST /delay?seconds=S:
    every answer takes S seconds from now on. GET /stats: the counts.
    """
    loop = asyncio.get_running_loop()

    async def outage(request: web.Request) -> web.Response:
        inconvo.outage(503, seconds=float(request.query["seconds"]))
        return web.json_response({"ok": True})

    async def rate(request: web.Request) -> web.Response:
        inconvo.rate_limit(int(request.query["per_second"]))
        loop.call_later(float(request.query["seconds"]), inconvo.rate_limit, None)
        return web.json_response({"ok": True})

    async def delay(request: web.Request) -> web.Response:
        inconvo.delay = float(request.query["seconds"])
        return web.json_response({"ok": True})

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(
            {
                "requests": len(inconvo.requests),
                "outage_calls": inconvo.outage_calls,
                "throttled": inconvo.throttled,
            }
        )

    app = web.Application()
    app.router.add_post("/outage", outage)
    app.router.add_post("/rate", rate)
    app.router.add_post("/delay", delay)
    app.router.add_get("/stats", stats)
    return app


async def main() -> None:
    """Start everything, print the addresses, serve until stdin closes."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per S3 request otherwise
    # Courier hangs up on oversized downloads by design: not worth a traceback each.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(AWS)
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    async with get_session().create_client("s3", endpoint_url=endpoint) as s3:
        await s3.create_bucket(Bucket=bucket)
        for i in range(S3_OBJECTS):
            await s3.put_object(
                Bucket=bucket, Key=f"media/talk-{i}.mp4", Body=os.urandom(64 * 1024)
            )

    files = await FileServer().start()
    files.add("/small.csv", csv_bytes(1024))
    files.add("/big.csv", csv_bytes(10 * MIB))
    files.add("/note.txt", csv_bytes(4096), content_type="text/plain")
    files.add("/bomb.csv", b"0" * (200 * MIB), gzip=True)
    files.files["/bomb.csv"].encoded()  # compress once, before the clock starts
    files.add("/endless.csv", stream_bytes=20 * MIB)
    inconvo = FakeInconvo(api_key=INCONVO_KEY, keep_content=False)
    mindset = FakeMindset(api_key=MINDSET_KEY)
    await inconvo.start()
    await mindset.start()
    control = await serve(control_app(inconvo))
    info = {
        "files": files.url("").rstrip("/"),
        "files_port": files.port,
        "inconvo": inconvo.base_url,
        "mindset": mindset.base_url,
        "s3_endpoint": endpoint,
        "bucket": bucket,
        "s3_objects": S3_OBJECTS,
        "aws": AWS,
        "inconvo_key": INCONVO_KEY,
        "mindset_key": MINDSET_KEY,
        "control": control.url,
    }
    sys.stdout.write(orjson.dumps(info).decode() + "\n")
    sys.stdout.flush()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the harness closes our stdin
    await control.close()
    await files.close()
    await inconvo.close()
    await mindset.close()
    moto.stop()


if __name__ == "__main__":
    asyncio.run(main())
