"""`make run`: `courier run`, against the local fakes when no destination key is set.

With a key in the environment (COURIER_INCONVO_API_KEY, INCONVO_API_KEY,
COURIER_MINDSET_API_KEY, MINDSET_API_KEY or a ``_FILE`` form) this is exactly
`courier run`. Without one, every request would fail as
``destination_not_configured``; so the fakes of ``scripts/local_stack.py`` start
on loopback, one banner line says so, and Courier is pointed at them: a fresh
clone's ``courier submit --wait examples/inconvo-http.json`` then succeeds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from scripts.local_stack import ROOT, local_stack, real_keys_configured


async def _run_with_fakes() -> int:
    async with local_stack() as stack:
        sys.stderr.write(f"make run: {stack.banner()}\n")
        sys.stderr.flush()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service", "run", env={**os.environ, **stack.env}, cwd=ROOT
        )

        def forward(sig: signal.Signals) -> None:
            if proc.returncode is None:
                proc.send_signal(sig)

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            # Courier stops gracefully on either; the fakes stay up until it has.
            loop.add_signal_handler(sig, forward, sig)
        return await proc.wait()


def main() -> int:
    """Run Courier; with the fakes when no destination key is configured."""
    if real_keys_configured():
        os.execv(sys.executable, [sys.executable, "-m", "service", "run"])  # noqa: S606 - fixed argv
    try:
        return asyncio.run(_run_with_fakes())
    except OSError as exc:  # the example files' port is taken (another `make run`?)
        sys.stderr.write(f"make run: cannot start the local fakes: {exc.strerror or exc}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
