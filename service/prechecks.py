"""The checks a request passes or fails without any I/O: what a producer can know up front.

``courier submit`` runs them before publishing, so a request that is certain
to fail is never sent; the pipeline runs the same destination checks (each
adapter's ``precheck`` is the function named here) in the order the error codes
are decided: the request, the scheme, the destination's key, the file name.
The destination's key is the service's business and is not checked here.
"""

from __future__ import annotations

from collections.abc import Callable

from service.contracts import DeleteRequest, Request, UploadRequest
from service.destinations import inconvo, mindset
from service.errors import ErrorCode, PermanentError
from service.urls import scheme_of

SCHEMES = ("s3", "http", "https")
_DESTINATION_CHECKS: dict[str, Callable[[UploadRequest], None]] = {
    "inconvo": inconvo.precheck,
    "mindset": mindset.precheck,
}


def check_scheme(url: str) -> None:
    """``unsupported_source`` for a scheme other than s3, http or https."""
    scheme = scheme_of(url)
    if scheme not in SCHEMES:
        shown = f"scheme {scheme!r}" if scheme else "no scheme"
        raise PermanentError(
            ErrorCode.UNSUPPORTED_SOURCE,
            f"source.url has {shown}: use s3://bucket/key, http:// or https://",
        )


def offline_checks(request: Request) -> None:
    """Raise the CourierError the service would end this request with, where no I/O is needed."""
    if isinstance(request, DeleteRequest):
        return  # all there is to check without I/O, the model has checked
    check_scheme(request.source.url)
    _DESTINATION_CHECKS[request.destination.type](request)
