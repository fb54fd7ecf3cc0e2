"""`make demo`: the whole flow on loopback in one command.

Starts the fake Inconvo and Mindset, a file server and an S3 server (moto),
runs `courier run` as a subprocess, submits every request in examples/ and
prints the result events.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import uuid
from pathlib import Path
from string import Template

import aio_pika
import aiohttp
import orjson
from aiobotocore.session import get_session
from moto.server import ThreadedMotoServer

from testbed.fakes import FakeInconvo, FakeMindset
from testbed.support import AMQP_URL, EventCollector, FileServer, Names, delete_topology, publish

ROOT = Path(__file__).resolve().parent.parent
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def main() -> int:
    """Run the demo; returns the exit status."""
    amqp_url = os.environ.get("COURIER_AMQP_URL", AMQP_URL)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    s3_host, s3_port = moto.get_host_and_port()
    aws = {
        "AWS_ACCESS_KEY_ID": "demo-key-id",
        "AWS_SECRET_ACCESS_KEY": "demo-secret",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": f"http://{s3_host}:{s3_port}",
    }
    os.environ.update(aws)
    bucket = f"courier-demo-{uuid.uuid4().hex[:8]}"
    async with get_session().create_client("s3") as s3:
        await s3.create_bucket(Bucket=bucket)
        await s3.put_object(
            Bucket=bucket, Key="shared/pricing.json", Body=b'[{"sku": "A", "price": 10}]'
        )
        await s3.put_object(Bucket=bucket, Key="training/onboarding.pdf", Body=PDF)

    files = await FileServer().start()
    files.add("/exports/sales_report_q4.csv", b"region,total\neu,10\nus,12\n")
    files.add(
        "/notes/release-notes.txt", b"Courier 0.1: first release.\n", content_type="text/plain"
    )
    inconvo, mindset = FakeInconvo(api_key="demo-inconvo"), FakeMindset(api_key="demo-mindset")
    await inconvo.start()
    await mindset.start()
    names = Names.fresh()
    http_port = _free_port()
    env = {
        **os.environ,
        **aws,
        "COURIER_AMQP_URL": amqp_url,
        "COURIER_QUEUE": names.queue,
        "COURIER_EVENTS_EXCHANGE": names.events_exchange,
        "COURIER_HTTP_HOST": "127.0.0.1",
        "COURIER_HTTP_PORT": str(http_port),
        "COURIER_INCONVO_API_KEY": "demo-inconvo",
        "COURIER_INCONVO_BASE_URL": inconvo.base_url,
        "COURIER_MINDSET_API_KEY": "demo-mindset",
        "COURIER_MINDSET_BASE_URL": mindset.base_url,
        "COURIER_SOURCE_ALLOWED_HOSTS": f"127.0.0.1:{files.port}",
        "COURIER_LOG_FORMAT": "console",
        "COURIER_LOG_LEVEL": "WARNING",
    }
    connection = await aio_pika.connect_robust(amqp_url)
    collector = await EventCollector(connection, names.events_exchange).start()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "run", env=env, cwd=ROOT
    )
    try:
        async with aiohttp.ClientSession() as session, asyncio.timeout(30):
            while True:
                try:
                    async with session.get(f"http://127.0.0.1:{http_port}/readyz") as answer:
                        if answer.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        examples = sorted((ROOT / "examples").glob("*.json"))
        for path in examples:
            text = Template(path.read_text()).substitute(
                FILES=files.url("").rstrip("/"), BUCKET=bucket
            )
            print(f"--> submitting {path.name}")
            await publish(connection, names.queue, text.encode())
        events = await collector.wait_for(len(examples), timeout=60)
        for event in events:
            print(orjson.dumps(event, option=orjson.OPT_INDENT_2).decode())
        ok = all(e["data"]["status"] == "succeeded" for e in events)
        print(f"{len(events)} events, {'all succeeded' if ok else 'some failed'}")
        return 0 if ok else 1
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
        await delete_topology(names, (10, 60, 300, 1800), amqp_url)
        await connection.close()
        await files.close()
        await inconvo.close()
        await mindset.close()
        moto.stop()


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
