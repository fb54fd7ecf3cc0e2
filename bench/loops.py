"""What the baseline consumers share: a task per delivery, until SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue


async def consume_until_sigterm(
    queue: AbstractQueue, handle: Callable[[AbstractIncomingMessage], Coroutine[Any, Any, None]]
) -> None:
    """Run ``handle`` in a task of its own for every delivery; print ``ready``; return on SIGTERM."""
    tasks: set[asyncio.Task[None]] = set()

    async def on_message(message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(handle(message))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    await queue.consume(on_message)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
