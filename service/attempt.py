"""One attempt at a delivery's body: refused (poisoned or invalid), a read of the file
an earlier upload made, or a run of the pipeline."""

from __future__ import annotations

from service.contracts import UploadRequest
from service.messages import Decoded, Envelope, decode, refuse
from service.outcome import Outcome, Work
from service.settle import Policy, poisoned


async def attempt(
    work: Work, body: bytes, envelope: Envelope, policy: Policy, max_bytes: int
) -> tuple[Decoded, Outcome]:
    """What the delivery's body is, and how the attempt at it ended."""
    error = poisoned(envelope, policy)
    decoded = (
        refuse(body, envelope, max_bytes, error)
        if error is not None
        else decode(body, envelope, max_bytes)
    )
    request, rid = decoded.request, decoded.request_id
    if isinstance(request, UploadRequest) and envelope.follow_since is not None:
        return decoded, await work.follow(request, rid)
    if request is not None:
        return decoded, await work.process(request, rid)
    return decoded, refused(decoded)


def refused(decoded: Decoded) -> Outcome:
    """The outcome of a body that is not run: its error, with what could be salvaged."""
    assert decoded.error is not None  # noqa: S101 - a refused body always says why
    return Outcome.refused(
        decoded.error,
        destination=decoded.destination,
        source_url=decoded.source_url,
        operation=decoded.operation,
    )
