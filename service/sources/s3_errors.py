"""What S3's answers mean for a request: its locations and its errors in the contract's codes."""

from __future__ import annotations

from dataclasses import dataclass

from botocore.exceptions import ClientError, NoCredentialsError, ParamValidationError

from service.errors import CourierError, ErrorCode, PermanentError, RetryableError
from service.urls import parse_s3_url

# S3 error codes by what they mean for the request. Those not listed go by HTTP status.
_NOT_FOUND = frozenset(
    {
        "NoSuchKey",
        "NoSuchBucket",
        "NoSuchVersion",
        "404",
        "NotFound",
        "InvalidArgument",  # for these calls: a malformed versionId
        "InvalidBucketName",
        "KeyTooLongError",
        "MethodNotAllowed",  # the version asked for is a delete marker
    }
)
_FORBIDDEN = frozenset(
    {
        "AccessDenied",
        "403",
        "Forbidden",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AllAccessDisabled",
    }
)
_TRANSIENT = frozenset(
    {
        "RequestTimeout",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "ServiceUnavailable",
        "InternalError",
        "OperationAborted",
        "ExpiredToken",  # temporary credentials are refreshed before the next try
        "TokenRefreshRequired",
    }
)
# The bucket lives in another region than the one the request was signed for.
_WRONG_REGION = frozenset(
    {"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"}
)


@dataclass(frozen=True, slots=True)
class S3Location:
    """``s3://bucket/key?versionId=v``, the key percent-decoded."""

    bucket: str
    key: str
    version_id: str | None

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """Parse an s3 URL by the contract's rules (:func:`parse_s3_url`), else invalid_request."""
        try:
            bucket, key, version = parse_s3_url(url)
        except ValueError as exc:
            raise PermanentError(ErrorCode.INVALID_REQUEST, str(exc)) from None
        return cls(bucket=bucket, key=key, version_id=version)

    @property
    def url(self) -> str:
        """The location as an s3 URL (the key decoded, for people), fit for messages."""
        version = f"?versionId={self.version_id}" if self.version_id else ""
        return f"s3://{self.bucket}/{self.key}{version}"

    def params(self) -> dict[str, str]:
        """Bucket, Key and (when given) VersionId, as the S3 API takes them."""
        params = {"Bucket": self.bucket, "Key": self.key}
        if self.version_id:
            params["VersionId"] = self.version_id
        return params


def answer_error(
    where: S3Location,
    code: str,
    status: int | None,
    retry_after: float | None = None,
    region: str | None = None,
) -> CourierError:
    """The contract's code for an S3 error answer (its error code, HTTP status or both).

    Only what a later try may change is retryable: throttling, timeouts, 5xx,
    a temporary redirect. A wrong region, a bad versionId or any other 4xx is
    permanent: retrying it would only delay the same failure by half an hour.
    """
    what, why = where.url, code or str(status)
    if code in _TRANSIENT or (
        code not in _NOT_FOUND | _FORBIDDEN | _WRONG_REGION
        and (status is None or status in (302, 307, 408, 429) or status >= 500)
    ):
        return RetryableError(
            ErrorCode.SOURCE_UNAVAILABLE,
            f"S3 answered {why} for {what}",
            http_status=status,
            retry_after=retry_after,
        )
    if code in _FORBIDDEN or (code not in _NOT_FOUND and status in (401, 403)):
        return PermanentError(
            ErrorCode.SOURCE_FORBIDDEN, f"access to {what} was denied ({why})", http_status=status
        )
    if code in _WRONG_REGION or (code not in _NOT_FOUND and status == 301):
        named = f" ({region})" if region else ""
        return PermanentError(
            ErrorCode.SOURCE_NOT_FOUND,
            f"the bucket of {what} is in another region{named} than this S3 client ({why});"
            " set AWS_REGION to the bucket's region",
            http_status=status,
        )
    if code in _NOT_FOUND or status in (404, 410):
        return PermanentError(
            ErrorCode.SOURCE_NOT_FOUND, f"{what} does not exist ({why})", http_status=status
        )
    return PermanentError(
        ErrorCode.SOURCE_NOT_FOUND, f"S3 refused the request for {what} ({why})", http_status=status
    )


def map_error(exc: Exception, where: S3Location) -> CourierError:
    """Translate a botocore or transport failure into the contract's codes."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        meta = exc.response.get("ResponseMetadata", {})
        status = int(meta.get("HTTPStatusCode") or 0) or None
        region = meta.get("HTTPHeaders", {}).get("x-amz-bucket-region")
        return answer_error(where, str(error.get("Code", "")), status, region=region)
    if isinstance(exc, NoCredentialsError):
        return PermanentError(ErrorCode.SOURCE_FORBIDDEN, "no AWS credentials were found")
    if isinstance(exc, ParamValidationError):
        # botocore refuses the parameters before sending anything: no retry can help.
        return PermanentError(
            ErrorCode.INVALID_REQUEST, f"S3 cannot take the bucket, key or versionId of {where.url}"
        )
    what = "did not answer in time" if isinstance(exc, TimeoutError) else "could not be reached"
    return RetryableError(ErrorCode.SOURCE_UNAVAILABLE, f"S3 {what} ({type(exc).__name__})")
