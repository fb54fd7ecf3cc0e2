"""`make demo`: the whole flow on loopback in one command, a failure included.

Starts the local stack (the fake Inconvo and Mindset, the example files over
HTTP, moto's S3 with bucket ``courier-examples``), runs `courier run` on queues
of its own, submits every request in examples/ with `courier submit`, and one
that fails (examples/failures/) and ends in the dead-letter queue; prints a
table of the outcomes and `courier dead list`; then the whole life of one file in
Mindset: its upload and ingestion, a changed version that replaces it, and its
delete. Courier's own logs go to a file, named at the end; the peers log nothing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import aio_pika
import orjson

from scripts.local_stack import FILES_PORT, ROOT, local_stack
from testbed.support import AMQP_URL, EventCollector, Names, delete_topology, free_port, wait_status

EXAMPLES = sorted((ROOT / "examples").glob("*.json"))
FAILURES = sorted((ROOT / "examples" / "failures").glob("*.json"))
EXAMPLE_ORIGIN = f"http://127.0.0.1:{FILES_PORT}"


async def _courier(*args: str, env: dict[str, str], stdin: bytes | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        *args,
        env=env,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate(stdin)
    assert proc.returncode is not None  # noqa: S101 - communicate() waited for it
    return proc.returncode, out.decode()


def _row(event: dict[str, Any]) -> tuple[str, ...]:
    data = event["data"]
    source = (data.get("source") or {}).get("url") or "-"
    if data["status"] == "succeeded":
        detail = f"{data['delivery']}, {(data.get('source') or {}).get('bytes')} bytes"
    else:
        detail = f"{data['error']['code']}: {data['error']['message']}"
    return data["requestId"], data["destination"] or "-", source, data["status"], detail


def _table(rows: list[tuple[str, ...]]) -> str:
    header = ("REQUEST", "DESTINATION", "SOURCE", "OUTCOME", "DETAIL")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


async def _dead_letters(names: Names, amqp_url: str, count: int) -> None:
    """Wait until the dead-letter queue holds ``count`` letters (they follow the event)."""
    async with await aio_pika.connect(amqp_url) as connection, asyncio.timeout(30):
        channel = await connection.channel()
        while True:
            queue = await channel.declare_queue(names.dead_queue, passive=True)
            if (queue.declaration_result.message_count or 0) >= count:
                return
            await asyncio.sleep(0.1)


async def main() -> int:
    """Run the demo; returns the exit status."""
    amqp_url = os.environ.get("COURIER_AMQP_URL", AMQP_URL)
    names = Names.fresh()
    log_file = Path(tempfile.gettempdir()) / f"courier-demo-{names.queue.split('.')[0]}.log"
    async with local_stack(files_port=0) as stack:
        http_port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("COURIER_", "INCONVO_"))},
            **stack.env,
            "COURIER_AMQP_URL": amqp_url,
            "COURIER_QUEUE": names.queue,
            "COURIER_EVENTS_EXCHANGE": names.events_exchange,
            "COURIER_HTTP_HOST": "127.0.0.1",
            "COURIER_HTTP_PORT": str(http_port),
            "COURIER_LOG_FORMAT": "console",
            # Short delay tiers: a file's state is read again within seconds.
            "COURIER_RETRY_DELAYS": "1s,5s,30s",
        }
        connection = await aio_pika.connect_robust(amqp_url)
        collector = await EventCollector(connection, names.events_exchange).start()
        everything = await EventCollector(connection, names.events_exchange, keys=("#",)).start()
        with log_file.open("wb") as logs:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "service", "run", env=env, cwd=ROOT, stderr=logs
            )
        try:
            await wait_status(f"http://127.0.0.1:{http_port}/readyz", 200, timeout=30)
            requests = [*EXAMPLES, *FAILURES]
            print(f"courier run is consuming {names.queue}; submitting {len(requests)} requests")
            for path in requests:
                # The examples name the file server of `make run`; this one has a port of its own.
                body = path.read_bytes().replace(EXAMPLE_ORIGIN.encode(), stack.files.url.encode())
                code, out = await _courier("submit", "-", env=env, stdin=body)
                print(f"  $ courier submit {path.relative_to(ROOT)}")
                if code != 0:
                    print(out)
                    return 1
            events = await collector.wait_for(len(requests), timeout=60)
            await _dead_letters(names, amqp_url, len(FAILURES))
            print()
            print(_table([_row(event) for event in events]))
            print("\n$ courier dead list")
            _, listing = await _courier("dead", "list", env=env)
            print(listing.rstrip())
            by_status = {e["data"]["requestId"]: e["data"]["status"] for e in events}
            expected = {
                **{_request_id(p): "succeeded" for p in EXAMPLES},
                **{_request_id(p): "failed" for p in FAILURES},
            }
            ok = by_status == expected and await _life(env, everything, stack.files.url)
            print(
                f"\n{sum(s == 'succeeded' for s in by_status.values())} succeeded, "
                f"{sum(s == 'failed' for s in by_status.values())} failed"
                f"{' as expected' if ok else ', NOT as expected'}; "
                f"courier run's log: {log_file}"
            )
            return 0 if ok else 1
        finally:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
            await delete_topology(names, (10, 60, 300, 1800), amqp_url)
            await connection.close()


def _life_requests(files_url: str) -> list[tuple[str, dict[str, Any]]]:
    """One Mindset file's life: uploaded, replaced by a changed version, deleted."""
    where = {"type": "mindset", "appUid": "app_demo", "contextUid": "ctx_handbook"}
    upload = {**where, "externalId": "handbook"}
    return [
        (
            "upload the handbook",
            {
                "id": "life-v1",
                "source": {"url": f"{files_url}/handbook/v1.txt"},
                "destination": upload,
            },
        ),
        (
            "upload a changed version under the same externalId",
            {
                "id": "life-v2",
                "source": {"url": f"{files_url}/handbook/v2.txt"},
                "destination": upload,
            },
        ),
        (
            "delete it",
            {
                "id": "life-del",
                "operation": "delete",
                "destination": {**where, "externalId": "handbook"},
            },
        ),
    ]


def _life_line(event: dict[str, Any]) -> str:
    data, kind = event["data"], event["type"].removeprefix("courier.")
    keys = ("fileStatus", "checks", "waitedMs", "replaced", "existed")
    notes = [f"{k}={data[k]}" for k in keys if k in data]
    if "error" in data:
        notes.append(data["error"]["code"])
    return f"    {kind:<20} {data['requestId']:<9} {' '.join(notes)}"


async def _life(env: dict[str, str], everything: EventCollector, files_url: str) -> bool:
    """Submit each step with `courier submit`, wait for its final event, print the events."""
    print("\nThe life of one file in Mindset:")
    finals = {"life-v1": "courier.ingestion.completed", "life-v2": "courier.ingestion.completed"}
    finals["life-del"] = "courier.delete.succeeded"
    for what, body in _life_requests(files_url):
        print(f"  {what}: courier submit")
        code, out = await _courier("submit", "-", env=env, stdin=orjson.dumps(body))
        if code != 0:
            print(out)
            return False
        rid = str(body["id"])
        await everything.wait_for_event(rid, finals[rid], timeout=60)
        for event in everything.events:
            if event["data"]["requestId"] == rid:
                print(_life_line(event))
    return True


def _request_id(path: Path) -> str:
    return str(orjson.loads(path.read_bytes())["id"])


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
