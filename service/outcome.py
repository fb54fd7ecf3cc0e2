"""How one attempt at a request ended: what the pipeline reports and the settle decides on."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from service.contracts import DeliveryMode, Request, SourceInfo, UploadRequest
from service.errors import CourierError, ErrorCode, RetryableError

Operation = Literal["upload", "delete"]
FileState = Literal["pending", "completed", "failed"]


@dataclass(frozen=True, slots=True)
class PlatformFile:
    """A file at the destination, as its last answer showed it."""

    status: str | None  # the destination's own word ("accepted", "published", ...)
    state: FileState  # what that means: still ingesting, usable, or not going to be
    result: Any = None  # the file object as last read
    uid: str | None = None
    external_id: str | None = None
    reason: str | None = None  # for a failed state: why, in words

    @property
    def final(self) -> bool:
        """Whether the state will not change any more."""
        return self.state != "pending"


@dataclass(frozen=True, slots=True)
class Held:
    """The destination could not take the request now: an open breaker or a rate limit."""

    seconds: float  # until it is expected to take requests again
    reason: str
    tried: bool = False  # whether this attempt had made a real call before it was held


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt at a request ended."""

    duration_ms: float
    destination: str | None
    delivery: DeliveryMode | None = None
    source: SourceInfo | None = None
    result: Any = None
    error: CourierError | None = None
    deduplicated: bool = False
    held: Held | None = None
    operation: Operation = "upload"
    existed: bool | None = None  # a delete: whether there was a file to delete
    replaced_uid: str | None = None  # an upload that replaced an older file
    file: PlatformFile | None = None  # the file an upload made (or found), or a read saw

    @property
    def succeeded(self) -> bool:
        """Whether the attempt succeeded."""
        return self.error is None and self.held is None

    def held_as_failure(self) -> Outcome:
        """A held attempt as the failed try it is where it cannot wait in the broker
        (tried, then held; or ``courier process``): ``destination_unavailable``, retryable
        after the hold. Any other outcome as it is."""
        held = self.held
        if held is None:
            return self
        error = RetryableError(
            ErrorCode.DESTINATION_UNAVAILABLE, held.reason, retry_after=held.seconds
        )
        return dataclasses.replace(self, held=None, error=error)

    @classmethod
    def refused(
        cls,
        error: CourierError,
        *,
        destination: str | None,
        source_url: str | None,
        operation: Operation = "upload",
    ) -> Outcome:
        """A request that never started: unreadable, invalid or poisoned (a delete's event
        is a delete's, with no source)."""
        source = SourceInfo(url=source_url) if source_url and operation == "upload" else None
        return cls(0.0, destination, source=source, error=error, operation=operation)

    def masked(self, mask: Callable[[str], str]) -> Outcome:
        """This outcome with ``mask`` applied to its error message (an API may echo secrets)."""
        error = self.error
        if error is None:
            return self
        text = mask(error.message)
        if text == error.message:
            return self
        copy = type(error)(
            error.code, text, http_status=error.http_status, retry_after=error.retry_after
        )
        return dataclasses.replace(self, error=copy)


@dataclass(frozen=True, slots=True)
class Ingestion:
    """Where a followed file ended up: usable (no error), or not going to be."""

    destination: str
    file: PlatformFile | None  # as last read
    waited_ms: float  # since the upload succeeded
    checks: int  # status reads made
    error: CourierError | None = None

    @property
    def completed(self) -> bool:
        """Whether the file is usable at the destination."""
        return self.error is None


class Work(Protocol):
    """The work a delivery is for (the pipeline): run a request, or read its file."""

    async def process(self, request: Request, request_id: str) -> Outcome:
        """Run one attempt at ``request``."""

    async def follow(self, request: UploadRequest, request_id: str) -> Outcome:
        """Read the state of the file an earlier upload of ``request`` made."""
