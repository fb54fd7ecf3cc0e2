"""S3: where the credentials come from, the region, and the allowed buckets."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from service.config import Settings
from service.doctor.report import Check
from service.redact import redact_url

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

_CREDENTIAL_SOURCES = {
    "env": "the environment (AWS_ACCESS_KEY_ID)",
    "explicit": "the environment (AWS_ACCESS_KEY_ID)",
    "assume-role-with-web-identity": "web identity (AWS_WEB_IDENTITY_TOKEN_FILE, as IRSA sets)",
    "iam-role": "the instance profile (instance metadata)",
    "container-role": "the container credentials endpoint (ECS task role, EKS Pod Identity)",
    "shared-credentials-file": "the shared credentials file (AWS_SHARED_CREDENTIALS_FILE)",
    "config-file": "the AWS config file (AWS_CONFIG_FILE)",
    "assume-role": "an assumed role from the AWS config file",
    "sso": "AWS SSO",
    "custom-process": "a credential_process in the AWS config file",
}


async def s3_checks(settings: Settings, *, call_timeout: float = 5.0) -> list[Check]:
    """Where the AWS credentials come from, the region, and each allowed bucket (HeadBucket)."""
    session = get_session()
    try:
        credentials = await session.get_credentials()
    except BotoCoreError as exc:
        return [
            Check(
                "s3",
                "fail",
                f"the AWS credentials cannot be loaded ({type(exc).__name__})",
                "correct the AWS_* credential variables or the AWS config file",
            )
        ]
    buckets = settings.s3_allowed_buckets
    if credentials is None:
        if not buckets:
            return [
                Check(
                    "s3",
                    "note",
                    "not configured: no AWS credentials found, so s3:// sources cannot be read",
                )
            ]
        return [
            Check(
                "s3",
                "fail",
                "no AWS credentials found, yet COURIER_S3_ALLOWED_BUCKETS names buckets",
                "give Courier credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "a web identity (IRSA) or an instance profile",
            )
        ]
    region = settings.aws_region or session.get_config_variable("region")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    source = _CREDENTIAL_SOURCES.get(credentials.method, credentials.method)
    checks = [
        Check(
            "s3",
            "ok",
            f"credentials from {source}; region {region or 'not set (us-east-1 is used)'}"
            + (f"; endpoint {redact_url(endpoint)}" if endpoint else ""),
        )
    ]
    if not buckets:
        checks.append(
            Check(
                "s3",
                "note",
                "COURIER_S3_ALLOWED_BUCKETS is empty: any bucket the credentials can read; "
                "no bucket checked, so the credentials were not tried",
            )
        )
        return checks
    config = AioConfig(
        connect_timeout=call_timeout,
        read_timeout=call_timeout,
        retries={"max_attempts": 2, "mode": "standard"},
        signature_version="s3v4",
    )
    async with session.create_client("s3", region_name=settings.aws_region, config=config) as s3:
        for bucket in buckets:
            checks.append(await _bucket_check(s3, bucket))
    return checks


async def _bucket_check(s3: S3Client, bucket: str) -> Check:
    try:
        await s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchBucket", "NotFound"):
            return Check(
                "s3",
                "fail",
                f"bucket {bucket}: does not exist",
                f"remove {bucket} from COURIER_S3_ALLOWED_BUCKETS or correct its name",
            )
        if code in ("403", "AccessDenied", "Forbidden"):
            return Check(
                "s3",
                "fail",
                f"bucket {bucket}: these credentials may not read it (HTTP 403)",
                f"grant s3:ListBucket and s3:GetObject on {bucket} to the role, "
                "or remove it from COURIER_S3_ALLOWED_BUCKETS",
            )
        if code in ("301", "PermanentRedirect", "400"):
            headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
            where = headers.get("x-amz-bucket-region", "another region")
            return Check(
                "s3",
                "fail",
                f"bucket {bucket}: lives in {where}",
                f"set AWS_REGION to {where}" if where != "another region" else "correct AWS_REGION",
            )
        return Check(
            "s3",
            "fail",
            f"bucket {bucket}: S3 answered {code or status}",
            "check the credentials (AWS_*) and COURIER_S3_ALLOWED_BUCKETS",
        )
    except BotoCoreError as exc:
        return Check(
            "s3",
            "fail",
            f"bucket {bucket}: S3 cannot be reached ({type(exc).__name__})",
            "check AWS_ENDPOINT_URL_S3, AWS_REGION and the network path to S3",
        )
    return Check("s3", "ok", f"bucket {bucket}: readable (HeadBucket)")
