"""Everything Courier talks to, on loopback: the fake Inconvo and Mindset, the example files
over HTTP and, where moto is installed, an S3 server holding them in bucket ``courier-examples``.

``make run`` starts it when no destination key is set, ``make demo`` always; the
files in ``examples/`` name these addresses, so they run as they are.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from testbed.fakes import FakeInconvo, FakeMindset, IngestionRule
from testbed.loopback import Loopback, serve

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_FILES = ROOT / "examples" / "files"
FILES_PORT = 8765  # examples/*.json name http://127.0.0.1:8765/...
BUCKET = "courier-examples"  # and s3://courier-examples/...
INGESTION_SECONDS = 1.0
LOCAL_KEYS = {"inconvo": "local-inconvo-key", "mindset": "local-mindset-key"}
# Variables that give a real destination key: any of them switches the fakes off.
KEY_VARIABLES = (
    "COURIER_INCONVO_API_KEY",
    "INCONVO_API_KEY",
    "COURIER_MINDSET_API_KEY",
    "MINDSET_API_KEY",
)


def real_keys_configured(environ: dict[str, str] | None = None) -> bool:
    """Whether the environment names a destination key (or a file holding one)."""
    env = os.environ if environ is None else environ
    names = {key.upper() for key, value in env.items() if value.strip()}
    return any(name in names or f"{name}_FILE" in names for name in KEY_VARIABLES)


@dataclass
class Stack:
    """The running pieces and the environment that points Courier at them."""

    inconvo: FakeInconvo
    mindset: FakeMindset
    files: Loopback
    s3_endpoint: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    def banner(self) -> str:
        """One line saying what runs where."""
        s3 = (
            f", S3 (moto) at {self.s3_endpoint} with bucket {BUCKET}"
            if self.s3_endpoint
            else " (no S3: moto is not installed; `make install` adds it)"
        )
        return (
            f"no destination key set: using the local fakes of Inconvo ({self.inconvo.base_url}) "
            f"and Mindset ({self.mindset.base_url}), the example files on {self.files.url}{s3}; "
            "set COURIER_INCONVO_API_KEY or COURIER_MINDSET_API_KEY to use the real APIs"
        )


def _files_app() -> web.Application:
    app = web.Application()
    app.router.add_static("/", EXAMPLE_FILES, show_index=True)
    return app


@contextlib.asynccontextmanager
async def _moto() -> AsyncIterator[dict[str, str] | None]:
    """moto's S3 server with the example files, when moto is installed (a dev dependency)."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        yield None
        return
    for name in ("werkzeug", "moto"):  # their access logs would show presigned URLs
        logging.getLogger(name).setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "local-key-id",
        "AWS_SECRET_ACCESS_KEY": "local-secret",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}",
    }
    try:
        from aiobotocore.session import get_session

        async with get_session().create_client(
            "s3",
            region_name=env["AWS_REGION"],
            endpoint_url=env["AWS_ENDPOINT_URL_S3"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        ) as s3:
            await s3.create_bucket(Bucket=BUCKET)
            for path in sorted(EXAMPLE_FILES.rglob("*")):
                if path.is_file():
                    key = path.relative_to(EXAMPLE_FILES).as_posix()
                    await s3.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes())
        yield env
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def local_stack(files_port: int = FILES_PORT) -> AsyncIterator[Stack]:
    """Start the fakes, the file server and (if installed) moto; stop them on exit."""
    async with (
        FakeInconvo(api_key=LOCAL_KEYS["inconvo"]) as inconvo,
        FakeMindset(api_key=LOCAL_KEYS["mindset"]) as mindset,
        _moto() as aws,
    ):
        # As the real Mindset does: a file is accepted, and ingested a little later.
        mindset.ingestion = IngestionRule("ingested", after_seconds=INGESTION_SECONDS)
        files = await serve(_files_app(), port=files_port)
        try:
            stack = Stack(inconvo, mindset, files, aws["AWS_ENDPOINT_URL_S3"] if aws else None)
            stack.env = {
                **(aws or {}),
                "COURIER_INCONVO_API_KEY": LOCAL_KEYS["inconvo"],
                "COURIER_INCONVO_BASE_URL": inconvo.base_url,
                "COURIER_MINDSET_API_KEY": LOCAL_KEYS["mindset"],
                "COURIER_MINDSET_BASE_URL": mindset.base_url,
                "COURIER_SOURCE_ALLOWED_HOSTS": f"127.0.0.1:{files.port}",
            }
            yield stack
        finally:
            await files.close()
