"""What the HTTP fakes share: lifecycle, request log, delays and failure injection."""

from __future__ import annotations

import abc
import asyncio
import json
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import orjson
from aiohttp import hdrs, web
from multidict import CIMultiDict

from testbed.loopback import Loopback, serve

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class RecordedRequest:
    """One request the fake received; ``status`` is 0 until answered (or if dropped).

    ``done`` turns true when the fake has finished with it (answered, dropped or
    failed): a test can wait on it instead of sleeping.
    """

    method: str
    path: str
    status: int
    headers: CIMultiDict[str]
    done: bool = False


@dataclass(frozen=True, slots=True)
class _Failure:
    status: int
    headers: dict[str, str]
    body: object | None
    method: str | None
    disconnect: bool


RequestPredicate = Callable[[web.Request], bool]


@dataclass(eq=False, slots=True)
class FailureRule:
    """A persistent failure set by :meth:`FakeServer.fail_when`; ``calls`` counts its answers."""

    predicate: RequestPredicate
    status: int
    headers: dict[str, str]
    body: object | None
    disconnect: bool
    calls: int = 0


class SlidingWindow:
    """A strict rate limit: at most ``per_second`` accepted calls in any one-second window.

    Refused calls do not count. Shared by the HTTP fakes and the flow-control
    simulations, so both enforce the same limit.
    """

    def __init__(self, per_second: int, window: float = 1.0) -> None:
        if per_second < 1:
            raise ValueError("per_second must be at least 1")
        self.per_second = per_second
        self.window = window
        self._accepted: deque[float] = deque()

    def admit(self, now: float) -> float | None:
        """None when a call at ``now`` is accepted (and counted); else seconds until one would be."""
        while self._accepted and self._accepted[0] <= now - self.window:
            self._accepted.popleft()
        if len(self._accepted) < self.per_second:
            self._accepted.append(now)
            return None
        return self._accepted[0] + self.window - now


def retry_after_headers(seconds: float, *, millis: bool = True) -> dict[str, str]:
    """``Retry-After`` in whole seconds (rounded up) and, if ``millis``, ``retry-after-ms``."""
    headers = {"Retry-After": str(math.ceil(seconds))}
    if millis:
        headers["retry-after-ms"] = str(math.ceil(seconds * 1000))
    return headers


def media_type(request: web.Request) -> str:
    """The request's media type, lower case, without parameters.

    aiohttp's ``request.content_type`` parses with the standard library's email
    package, which made it the fakes' largest cost in the benchmarks.
    """
    return request.headers.get(hdrs.CONTENT_TYPE, "").split(";", 1)[0].strip().lower()


def json_response(data: object, status: int = 200) -> web.Response:
    """A JSON answer, encoded with orjson (the standard library's encoder showed in profiles)."""
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def drain(request: web.Request) -> None:
    """Read and discard whatever is left of the request body."""
    while await request.content.readany():
        pass


class FakeServer(abc.ABC):
    """Base of the fakes: an aiohttp app on 127.0.0.1 on a free port.

    Attributes: ``requests`` (every request, rejected ones too), ``delay`` (seconds
    slept before a request is handled; if the client has gone by then, the request is
    dropped unhandled), ``delay_after`` (seconds slept after it was handled, before
    answering: the request takes effect even if the client gives up), ``root_url``
    and ``base_url`` (set by :meth:`start`), ``outage_calls`` (requests answered by
    an :meth:`outage`) and ``throttled`` (429s sent by a :meth:`rate_limit`).

    Precedence when several failures could answer a request: an outage, then the
    rate limit, then the :meth:`fail_when` rules (first match), then the queue of
    :meth:`fail_next`; only a request none of them takes reaches its handler.
    """

    _api_prefix = ""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.delay: float = 0.0
        self.delay_after: float = 0.0
        self.root_url = ""
        self.base_url = ""
        self._failures: list[_Failure] = []
        self._rules: list[FailureRule] = []
        self._runner: Loopback | None = None
        self.outage_calls = 0
        self.throttled = 0
        self._outage: _Failure | None = None
        self._outage_left: int | None = None
        self._heal_handle: asyncio.TimerHandle | None = None
        self._healed = asyncio.Event()
        self._healed.set()
        self._limit: SlidingWindow | None = None
        self._limit_millis = True

    # -- to override -------------------------------------------------------------------

    @abc.abstractmethod
    def _routes(self) -> list[web.RouteDef]:
        """The fake API's routes."""

    def _error_body(self, status: int, message: str) -> object:
        """The JSON body of an error answer."""
        return {"error": message}

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> str:
        """Start serving and return the base URL."""
        if self._runner is not None:
            raise RuntimeError("already started")
        app = web.Application(middlewares=[self._middleware])
        app.add_routes(self._routes())
        self._runner = await serve(app)
        self.root_url = self._runner.url
        self.base_url = self.root_url + self._api_prefix
        return self.base_url

    async def close(self) -> None:
        """Stop serving (idempotent)."""
        self.heal()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- failure injection -------------------------------------------------------------

    def fail_next(
        self,
        status: int,
        count: int = 1,
        headers: dict[str, str] | None = None,
        body: object | None = None,
        *,
        method: str | None = None,
        disconnect: bool = False,
    ) -> None:
        """Answer the next ``count`` requests with ``status`` instead of handling them.

        ``body``: None for the fake's usual error body, ``str``/``bytes`` sent as is,
        anything else as JSON. ``method`` limits the failure to requests with that
        method (others pass through). ``disconnect`` closes the connection without
        an answer instead (``status`` is then ignored).
        """
        failure = _Failure(status, dict(headers or {}), body, method, disconnect)
        self._failures.extend([failure] * count)

    def fail_when(
        self,
        predicate: RequestPredicate,
        status: int = 500,
        *,
        headers: dict[str, str] | None = None,
        body: object | None = None,
        disconnect: bool = False,
    ) -> FailureRule:
        """Answer every request ``predicate`` accepts with ``status``, until cleared.

        ``predicate`` sees the aiohttp request (``method``, ``path``, ``headers``,
        ``query``, ``match_info``; never read its body). ``headers``, ``body`` and
        ``disconnect`` work as in :meth:`fail_next`. The returned rule counts the
        requests it answered in ``calls``; :meth:`clear_rule` removes it,
        :meth:`clear_failures` removes all rules.
        """
        rule = FailureRule(predicate, status, dict(headers or {}), body, disconnect)
        self._rules.append(rule)
        return rule

    def clear_rule(self, rule: FailureRule) -> None:
        """Remove one :meth:`fail_when` rule (idempotent)."""
        if rule in self._rules:
            self._rules.remove(rule)

    def clear_failures(self) -> None:
        """Forget queued failures and :meth:`fail_when` rules: the API is healthy again."""
        self._failures.clear()
        self._rules.clear()

    def outage(
        self,
        status: int = 503,
        *,
        seconds: float | None = None,
        calls: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Go down: answer every request with ``status`` (its handler never runs) until healed.

        ``seconds``: heal by itself after that long on the loop clock (needs a
        running loop); ``calls``: heal by itself once it has answered that many
        requests (no clock involved); with both, whichever comes first; with
        neither, call :meth:`heal`. :meth:`wait_healed` waits for the end.
        ``outage_calls`` counts the requests answered meanwhile, across outages.
        ``headers`` go on every answer (``Retry-After``).
        """
        if calls is not None and calls < 1:
            raise ValueError("calls must be at least 1")
        self.heal()
        self._outage = _Failure(status, dict(headers or {}), None, None, False)
        self._outage_left = calls
        self._healed.clear()
        if seconds is not None:
            self._heal_handle = asyncio.get_running_loop().call_later(seconds, self.heal)

    def heal(self) -> None:
        """End an :meth:`outage` (idempotent)."""
        self._outage = None
        self._outage_left = None
        self._healed.set()
        if self._heal_handle is not None:
            self._heal_handle.cancel()
            self._heal_handle = None

    async def wait_healed(self, timeout: float = 30.0) -> None:
        """Return once no outage is going on; TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            await self._healed.wait()

    @property
    def down(self) -> bool:
        """Whether an outage is going on."""
        return self._outage is not None

    def rate_limit(
        self, per_second: int | None, *, millis: bool = True, window: float = 1.0
    ) -> None:
        """Accept at most ``per_second`` requests in any one-second window; None lifts it.

        Requests beyond it get a 429 with ``Retry-After`` (whole seconds, rounded
        up) and, if ``millis``, ``retry-after-ms``: when the window has room again.
        ``throttled`` counts them. The limit applies before queued failures.
        ``window`` stretches the second (so a test need not outrun the clock).
        """
        self._limit = None if per_second is None else SlidingWindow(per_second, window)
        self._limit_millis = millis

    def _throttle(self) -> _Failure | None:
        if self._limit is None:
            return None
        wait = self._limit.admit(asyncio.get_running_loop().time())
        if wait is None:
            return None
        self.throttled += 1
        return _Failure(
            429, retry_after_headers(wait, millis=self._limit_millis), None, None, False
        )

    def _outage_failure(self) -> _Failure | None:
        failure = self._outage
        if failure is None:
            return None
        self.outage_calls += 1
        if self._outage_left is not None:
            self._outage_left -= 1
            if self._outage_left == 0:
                self.heal()
        return failure

    def _rule_failure(self, request: web.Request) -> _Failure | None:
        for rule in self._rules:
            if rule.predicate(request):
                rule.calls += 1
                return _Failure(rule.status, rule.headers, rule.body, None, rule.disconnect)
        return None

    def _take_failure(self, method: str) -> _Failure | None:
        for index, failure in enumerate(self._failures):
            if failure.method is None or failure.method.upper() == method:
                return self._failures.pop(index)
        return None

    def _failure_response(self, failure: _Failure) -> web.Response:
        body = failure.body
        if body is None:
            body = self._error_body(failure.status, "Injected failure")
        headers = CIMultiDict(failure.headers)
        if isinstance(body, bytes):
            data = body
        elif isinstance(body, str):
            data = body.encode()
            headers.setdefault(hdrs.CONTENT_TYPE, "text/plain; charset=utf-8")
        else:
            data = json.dumps(body).encode()
            headers.setdefault(hdrs.CONTENT_TYPE, "application/json")
        return web.Response(status=failure.status, body=data, headers=headers)

    def error(self, status: int, message: str) -> web.Response:
        """A JSON error answer in the fake's error shape."""
        return json_response(self._error_body(status, message), status=status)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        record = RecordedRequest(request.method, request.path, 0, CIMultiDict(request.headers))
        self.requests.append(record)
        try:
            return await self._answer(request, handler, record)
        finally:
            record.done = True

    async def _answer(
        self, request: web.Request, handler: Handler, record: RecordedRequest
    ) -> web.StreamResponse:
        if self.delay > 0:
            await asyncio.sleep(self.delay)
            if request.transport is None or request.transport.is_closing():
                return web.Response(status=499)  # the client gave up: never handled
        failure = (
            self._outage_failure()
            or self._throttle()
            or self._rule_failure(request)
            or self._take_failure(request.method)
        )
        if failure is not None:
            await drain(request)
            if failure.disconnect:
                # aiohttp treats the failed write of this answer as a client disconnect.
                if request.transport is not None:
                    request.transport.close()
                return web.Response(status=500)
            response: web.StreamResponse = self._failure_response(failure)
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                await drain(request)
                response = self.error(exc.status, exc.reason)
            except Exception:
                record.status = 500
                raise
            if self.delay_after > 0:
                await asyncio.sleep(self.delay_after)
        record.status = response.status
        return response
