"""Wiring: the long-lived clients, built once at start-up and closed at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import signal
import ssl
from collections.abc import AsyncIterator

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from service.amqp.consumer import Consumer
from service.amqp.publisher import Publisher
from service.config import ConfigError, Settings
from service.destinations.base import Destination
from service.destinations.inconvo import Inconvo
from service.destinations.mindset import Mindset
from service.fair import Tenants
from service.flow import FlowControl, flow_middleware
from service.instrument import Instruments, MeteredSource
from service.metrics import Metrics
from service.pipeline import Pipeline
from service.retry import ATTEMPTS, MAX_RETRY_AFTER
from service.sources.base import DeadlineSource, Source, remove_stale_spool_files
from service.sources.guard import AddressPolicy, guarded_connector, parse_allowed_hosts
from service.sources.http import HttpSource
from service.sources.s3 import S3Source
from service.topology import Topology
from service.tracing import client_middleware
from service.web import make_app, start_http

log = logging.getLogger(__name__)
_M_ARENA_MAX = -8  # glibc's mallopt parameter number for MALLOC_ARENA_MAX


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas, as ``MALLOC_ARENA_MAX`` does; call before threads start.

    Spooling runs in worker threads, and glibc gives each thread an arena of its
    own whose freed memory is seldom returned, so peak RSS under many concurrent
    large files grows with the threads (``make bench``, scenario big). An operator's
    own ``MALLOC_ARENA_MAX`` wins; elsewhere than glibc, nothing happens.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_ARENA_MAX, arenas))


def max_attempt_seconds(settings: Settings) -> float:
    """The longest one attempt can keep a spool file: the fetch, then every try of the upload."""
    return settings.source_timeout + ATTEMPTS * (settings.destination_timeout + MAX_RETRY_AFTER)


def s3_http_session(limit: int, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
    """The session for S3's presigned HEADs, with the CA bundle of ``AWS_CA_BUNDLE``.

    The S3 endpoint is the operator's, so no source address policy applies.
    """
    context = ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE") or None)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, ssl=context),
        timeout=timeout,
        cookie_jar=aiohttp.DummyCookieJar(),
        middlewares=[client_middleware()],
    )


@contextlib.asynccontextmanager
async def pipeline_for(
    settings: Settings, instruments: Instruments | None = None
) -> AsyncIterator[Pipeline]:
    """A Pipeline with its HTTP sessions and S3 client; everything is closed on exit."""
    instruments = instruments or Instruments(Metrics())
    metrics = instruments.metrics
    policy = AddressPolicy(
        allow_private=settings.source_allow_private,
        allowed_hosts=parse_allowed_hosts(settings.source_allowed_hosts),
    )
    timeout = aiohttp.ClientTimeout(
        total=None, connect=settings.http_connect_timeout, sock_read=settings.http_read_timeout
    )
    s3_config = AioConfig(
        connect_timeout=settings.http_connect_timeout,
        read_timeout=settings.http_read_timeout,
        retries={"max_attempts": 3, "mode": "standard"},
        max_pool_connections=settings.concurrency * 2,
        signature_version="s3v4",
    )

    flows = FlowControl.from_settings(settings, instruments)

    def api_session(name: str) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=settings.concurrency * 2),
            timeout=aiohttp.ClientTimeout(total=settings.destination_timeout),
            middlewares=[
                flow_middleware(flows.for_destination(name)),
                client_middleware(instruments.destination_call(name)),
            ],
        )

    async with (
        aiohttp.ClientSession(
            connector=guarded_connector(policy, limit=settings.concurrency * 2),
            timeout=timeout,
            auto_decompress=True,
            # Sources belong to different producers: a cookie one server sets must
            # never ride along on another request.
            cookie_jar=aiohttp.DummyCookieJar(),
            middlewares=[client_middleware()],
        ) as source_session,
        api_session("inconvo") as inconvo_session,
        api_session("mindset") as mindset_session,
        get_session().create_client(
            "s3", region_name=settings.aws_region, config=s3_config
        ) as s3_client,
        s3_http_session(settings.concurrency * 2, timeout) as s3_session,
    ):
        http = HttpSource(source_session, policy, settings.tmp_dir)
        s3 = S3Source(
            s3_client,
            s3_session,
            allowed_buckets=settings.s3_allowed_buckets,
            presign_ttl=settings.presign_ttl,
            tmp_dir=settings.tmp_dir,
        )
        deadline = settings.source_timeout
        sources: dict[str, Source] = {
            "http": MeteredSource(DeadlineSource(http, deadline), metrics, "http"),
            "https": MeteredSource(DeadlineSource(http, deadline), metrics, "https"),
            "s3": MeteredSource(DeadlineSource(s3, deadline), metrics, "s3"),
        }
        destinations: dict[str, Destination] = {
            "inconvo": Inconvo(
                inconvo_session,
                base_url=settings.inconvo_base_url,
                api_key=settings.inconvo_api_key,
                agent_id=settings.inconvo_agent_id,
                timeout=settings.destination_timeout,
            ),
            "mindset": Mindset(
                mindset_session,
                base_url=settings.mindset_base_url,
                api_key=settings.mindset_api_key,
                timeout=settings.destination_timeout,
                policy=policy,
            ),
        }
        if (note := await s3.presign_report()) is not None:
            log.warning(note)
        yield Pipeline(sources, destinations, flows)


class Service:
    """``courier run``: web endpoints, pipeline and broker, started and stopped in order."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.instruments = Instruments(self.metrics, Tenants(settings.tenant_weights))
        self.http_port: int | None = None
        self.consumer: Consumer | None = None
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        """Ask the service to shut down gracefully."""
        self._stop.set()

    async def ready(self) -> bool:
        """Readiness: connected, not blocked, and consuming."""
        return self.consumer is not None and await self.consumer.ready()

    async def run(self, *, install_signals: bool = True) -> None:
        """Run until :meth:`request_stop` (or SIGTERM/SIGINT); then stop gracefully."""
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        host, port = self.settings.http_host, self.settings.http_port
        try:
            app = make_app(self.metrics, self.ready)
            runner, self.http_port = await start_http(app, host, port)
        except OSError as exc:
            raise ConfigError(
                "COURIER_HTTP_PORT",
                f"cannot listen on {host}:{port} ({os.strerror(exc.errno) if exc.errno else exc}): "
                "another process holds the port; stop it or choose another port",
            ) from None
        log.info("HTTP endpoints on port %d", self.http_port)
        removed = remove_stale_spool_files(
            self.settings.tmp_dir, max_attempt_seconds(self.settings)
        )
        if removed:
            log.info("removed %d spool files left by an earlier run", removed)
        try:
            async with pipeline_for(self.settings, self.instruments) as pipeline:
                topology = Topology.from_settings(self.settings)
                publisher = Publisher(
                    self.settings.amqp_urls,
                    topology,
                    self.instruments,
                    slow_confirm=self.settings.publish_timeout,
                )
                self.consumer = Consumer(
                    self.settings,
                    topology,
                    pipeline,
                    publisher,
                    self.instruments,
                    self.instruments,
                )
                # What start-up built (imported modules, botocore's models) lives as long
                # as the process: kept out of every later garbage collection, which would
                # walk it again and again (README "Performance" has the figure).
                gc.freeze()
                self.consumer.start()
                await self._stop.wait()
                log.info("shutting down")
                await self.consumer.stop()
        finally:
            await runner.cleanup()
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
        log.info("stopped")
