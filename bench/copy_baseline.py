"""The copy baseline for `big`: stream a file from the file server into the fake Inconvo.

A minimal aiohttp script doing just the transfer, with the same concurrency,
so Courier's MB/s can be compared with a plain copy. Prints one JSON line.
"""

from __future__ import annotations

import asyncio
import sys
import time

import aiohttp
import orjson


async def copy_one(session: aiohttp.ClientSession, source: str, target: str, key: str) -> int:
    """Stream one file across; returns its size."""
    async with session.get(source) as response:
        response.raise_for_status()
        size = response.content_length or 0
        form = aiohttp.FormData(quote_fields=False)
        form.add_field(
            "file",
            response.content.iter_chunked(256 * 1024),
            filename="big.csv",
            content_type="text/csv",
        )
        async with session.post(
            target, data=form, headers={"Authorization": f"Bearer {key}"}
        ) as answer:
            answer.raise_for_status()
            await answer.read()
    return size


async def main(source: str, target: str, key: str, count: int, concurrency: int) -> None:
    """Copy ``count`` files, ``concurrency`` at a time; print the rate."""
    limit = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency * 2)
    ) as session:

        async def bounded() -> int:
            async with limit:
                return await copy_one(session, source, target, key)

        started, cpu = time.perf_counter(), time.process_time()
        sizes = await asyncio.gather(*(bounded() for _ in range(count)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    total = sum(sizes)
    print(
        orjson.dumps(
            {
                "files": count,
                "bytes": total,
                "seconds": elapsed,
                "mb_per_s": total / 1e6 / elapsed,
                "cpu_ms_per_file": cpu / count * 1000,
            }
        ).decode()
    )


if __name__ == "__main__":
    src, dst, api_key, n, c = sys.argv[1:6]
    asyncio.run(main(src, dst, api_key, int(n), int(c)))
