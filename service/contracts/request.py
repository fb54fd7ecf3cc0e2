"""The request message, as producers publish it: the models and every rule they check."""

from __future__ import annotations

import re
from collections.abc import Container
from typing import Annotated, Any, Literal, Self, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    TypeAdapter,
    field_validator,
    model_validator,
)

from service import schemas
from service.urls import check_http_url, parse_s3_url, scheme_of

MindsetMimeType = Literal[
    "video/mp4",
    "audio/mpeg",
    "application/pdf",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "text/html",
    "text/plain",
    "application/zip",
]
MINDSET_MIME_TYPES: tuple[str, ...] = get_args(MindsetMimeType)
DeliveryMode = Literal["multipart", "sourceUrl", "documentContent"]
DestinationName = Literal["inconvo", "mindset"]

IDENT_PATTERN = r"^[A-Za-z0-9_.@-]{1,256}$"
CONTEXT_KEY_PATTERN = r"^[A-Za-z0-9_.-]{1,256}$"
TENANT_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
MAX_HTTP_URL = 2048
_CONTROL = re.compile("[\x00-\x1f\x7f]")
MINDSET_MAX_URL = 2048  # sourceUrl, externalUrl, thumbnailUrl
MINDSET_MAX_NAME = 100  # the limit of `name` below
MINDSET_MAX_HASH = 200  # the limit of `contentHash` below

Identifier = Annotated[str, StringConstraints(pattern=IDENT_PATTERN)]
Text = Annotated[str, StringConstraints(min_length=1)]


def api_length(text: str) -> int:
    """The length the Mindset API counts: UTF-16 code units, as JavaScript does."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def api_cut(text: str, limit: int) -> str:
    """The longest start of ``text`` within ``limit`` UTF-16 code units, no half character."""
    if len(text) * 2 <= limit:
        return text
    return text.encode("utf-16-le", "surrogatepass")[: limit * 2].decode("utf-16-le", "ignore")


def _api_max(limit: int) -> AfterValidator:
    """Mindset's limit of ``limit`` characters, counted as the API counts them.

    Kept beside ``max_length`` (code points, what JSON Schema's maxLength means):
    every value within this limit is within that one too.
    """

    def check(value: str) -> str:
        if api_length(value) > limit:
            raise ValueError(
                f"at most {limit} characters, counted as UTF-16 code units as the API does"
            )
        return value

    return AfterValidator(check)


def _no_nulls(data: Any, fields: Container[str]) -> Any:
    """``null`` counts as absent for the named ``fields`` only.

    An unknown name stays, whatever its value, so ``extra="forbid"`` rejects it.
    """
    if isinstance(data, dict) and None in data.values():
        return {key: value for key, value in data.items() if value is not None or key not in fields}
    return data


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        return _no_nulls(data, cls.model_fields)


class SourceSpec(_Strict):
    """Where the file comes from."""

    url: Annotated[str, StringConstraints(min_length=1, max_length=4096)] = Field(
        description="s3://bucket/key[?versionId=v] (the key percent-decoded) or http(s)://... "
        "(at most 2048 characters). Other schemes fail as unsupported_source.",
        json_schema_extra=schemas.SOURCE_URL,
    )
    fileName: Annotated[str, StringConstraints(min_length=1, max_length=255)] | None = Field(
        None,
        description="The file's name; default the Content-Disposition name, else the URL's "
        "last path segment.",
        examples=["sales_report_q4.csv"],
        json_schema_extra={"pattern": schemas.PRINTABLE},
    )
    contentType: Annotated[str, StringConstraints(min_length=3, max_length=255)] | None = Field(
        None,
        description="The file's content type; default the response's, then the extension's.",
        examples=["text/csv"],
        json_schema_extra={"pattern": schemas.PRINTABLE},
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        scheme = scheme_of(url)
        if scheme in ("http", "https"):
            if api_length(url) > MAX_HTTP_URL:  # Mindset's sourceUrl limit, counted as it does
                raise ValueError(f"an http(s) URL may have at most {MAX_HTTP_URL} characters")
            check_http_url(url)
        elif scheme == "s3":
            parse_s3_url(url)
        # Any other scheme is left to the pipeline: it is `unsupported_source`.
        return url

    @field_validator("fileName", "contentType")
    @classmethod
    def _printable(cls, value: str) -> str:
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise ValueError("must not contain control characters")
        return value


FileName = Annotated[str, StringConstraints(min_length=1, max_length=255)]


class _InconvoScope(_Strict):
    """An Inconvo dataset scope: a user, or a context key and value (optionally of an agent)."""

    model_config = ConfigDict(json_schema_extra=schemas.INCONVO_SCOPES)

    type: Literal["inconvo"] = Field(description="Inconvo: datasets of CSV and JSON files.")
    userIdentifier: Identifier | None = Field(
        None, description="The user scope.", examples=["user_123"]
    )
    contextKey: Annotated[str, StringConstraints(pattern=CONTEXT_KEY_PATTERN)] | None = Field(
        None, description="The context scope's key, with contextValue.", examples=["orgId"]
    )
    contextValue: Identifier | None = Field(
        None, description="The context scope's value, with contextKey.", examples=["org_456"]
    )
    agentId: Annotated[str, StringConstraints(pattern=IDENT_PATTERN)] | None = Field(
        None, description="Use the agent-scoped routes (else COURIER_INCONVO_AGENT_ID)."
    )

    @model_validator(mode="after")
    def _one_scope(self) -> Self:
        user = self.userIdentifier is not None
        context = self.contextKey is not None or self.contextValue is not None
        if user == context:
            raise ValueError("give exactly one scope: userIdentifier, or contextKey + contextValue")
        if context and (self.contextKey is None or self.contextValue is None):
            raise ValueError("a context scope needs both contextKey and contextValue")
        return self


class InconvoDestination(_InconvoScope):
    """Upload to an Inconvo dataset; one scope: userIdentifier, or contextKey + contextValue."""

    fileName: FileName | None = Field(
        None,
        description="The dataset file's name: ends .csv or .json; no '..', '/' or '\\'. "
        "Default the source's file name (which must then end so).",
        examples=["sales_q4.csv"],
        json_schema_extra={"pattern": schemas.INCONVO_FILE_NAME},
    )
    notes: Annotated[str, StringConstraints(max_length=10000)] | None = Field(
        None, description="Free text stored with the file.", examples=["Q4 2024 sales data"]
    )

    @field_validator("fileName")
    @classmethod
    def _file_name(cls, name: str) -> str:
        check_upload_file_name(name)
        return name


class InconvoDelete(_InconvoScope):
    """Delete one file of an Inconvo dataset scope, by its name."""

    fileName: FileName = Field(
        description="The dataset file's name, as it was uploaded: ends .csv or .json.",
        examples=["sales_q4.csv"],
        json_schema_extra={"pattern": schemas.INCONVO_FILE_NAME},
    )

    @field_validator("fileName")
    @classmethod
    def _file_name(cls, name: str) -> str:
        check_upload_file_name(name)
        if not name.strip().lower().endswith(INCONVO_EXTENSIONS):
            raise ValueError("Inconvo holds only .csv and .json files")
        return name


SOURCE_ONLY_TYPES = frozenset(
    {
        "video/mp4",
        "audio/mpeg",
        "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "application/zip",
    }
)


class MindsetDestination(_Strict):
    """Ingest into a Mindset AI context, by URL or inline content."""

    model_config = ConfigDict(json_schema_extra=schemas.mindset_delivery(SOURCE_ONLY_TYPES))

    type: Literal["mindset"] = Field(description="Mindset AI: a JSON ingest.")
    appUid: Text = Field(description="The Mindset app.", examples=["app_demo"])
    contextUid: Text = Field(description="The context in the app.", examples=["ctx_handbook"])
    name: (
        Annotated[str, StringConstraints(min_length=1, max_length=100), _api_max(MINDSET_MAX_NAME)]
        | None
    ) = Field(None, description="The file's name in Mindset; default the source's (cut to 100).")
    mimeType: MindsetMimeType | None = Field(
        None, description="The file's type; default inferred from the content type or extension."
    )
    delivery: Literal["auto", "sourceUrl", "documentContent"] = Field(
        "auto",
        description="sourceUrl: Mindset fetches the file (S3 by a presigned URL); "
        "documentContent: Courier inlines it; auto: documentContent for text/plain, "
        "else sourceUrl.",
    )
    onExisting: Literal["replaceChanged", "keep", "replace"] = Field(
        "replaceChanged",
        description="When a file with this externalId exists: replaceChanged keeps it if its "
        "contentHash is the same and replaces it otherwise; keep always keeps it; replace "
        "always replaces it.",
    )
    externalId: Text | None = Field(
        None,
        description="Your id of the file in Mindset; default courier:<request id>. One live "
        "file per externalId.",
        examples=["handbook-onboarding"],
    )
    zipType: Annotated[str, StringConstraints(max_length=20), _api_max(20)] | None = None
    autoPublish: bool | None = None
    hideContentSegments: bool | None = None
    knownAs: Annotated[str, StringConstraints(max_length=200), _api_max(200)] | None = None
    externalUrl: Annotated[str, StringConstraints(max_length=2048), _api_max(2048)] | None = Field(
        None, json_schema_extra={"pattern": schemas.HTTP_URL}
    )
    thumbnailUrl: Annotated[str, StringConstraints(max_length=2048), _api_max(2048)] | None = Field(
        None, json_schema_extra={"pattern": schemas.HTTP_URL}
    )
    thumbnail: Annotated[str, StringConstraints(max_length=65536), _api_max(65536)] | None = None
    viewOriginalSource: bool | None = None
    contentHash: (
        Annotated[str, StringConstraints(max_length=MINDSET_MAX_HASH), _api_max(MINDSET_MAX_HASH)]
        | None
    ) = None
    labels: Annotated[list[Text], Field(max_length=10)] | None = None
    runId: Annotated[str, StringConstraints(max_length=200), _api_max(200)] | None = None

    @field_validator("externalUrl", "thumbnailUrl")
    @classmethod
    def _http_url(cls, url: str) -> str:
        # The API takes only absolute http(s) URLs here; Mindset fetches thumbnailUrl.
        check_http_url(url)
        return url

    @model_validator(mode="after")
    def _delivery_allowed(self) -> MindsetDestination:
        if self.mimeType is not None:
            check_mindset_delivery(self.mimeType, self.delivery)
        return self


class MindsetDelete(_Strict):
    """Delete the Mindset context file a request made (or any file), by its ``externalId``."""

    type: Literal["mindset"] = Field(description="Mindset AI.")
    appUid: Text = Field(description="The Mindset app.", examples=["app_demo"])
    contextUid: Text = Field(description="The context in the app.", examples=["ctx_handbook"])
    externalId: Text = Field(
        description="The file's externalId (courier:<request id> for one Courier named).",
        examples=["handbook-onboarding"],
    )


Destination = Annotated[InconvoDestination | MindsetDestination, Field(discriminator="type")]
DeleteDestination = Annotated[InconvoDelete | MindsetDelete, Field(discriminator="type")]
# The destinations' names, as the requests' ``destination.type`` spells them.
DESTINATIONS: tuple[str, ...] = tuple(
    get_args(model.model_fields["type"].annotation)[0]
    for model in get_args(get_args(Destination)[0])
)


Tenant = Annotated[str, StringConstraints(pattern=TENANT_PATTERN)]
DEFAULT_TENANT = "default"


class _Request(_Strict):
    id: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = Field(
        None,
        description="The request id and idempotency key; else the AMQP message_id, else one "
        "derived from the body.",
        examples=["req-2024-q4-0001"],
    )
    tenant: Tenant = Field(
        DEFAULT_TENANT,
        description="Whose work this is, for fair sharing between tenants.",
        examples=["acme"],
    )
    metadata: Annotated[dict[str, str], Field(max_length=50)] = Field(
        default_factory=dict,
        description="Flat string values (at most 50 keys), echoed in every event.",
        json_schema_extra=schemas.METADATA,
    )

    @field_validator("metadata")
    @classmethod
    def _metadata_keys(cls, metadata: dict[str, str]) -> dict[str, str]:
        for key, value in metadata.items():
            if not 1 <= len(key) <= 200 or len(value) > 2048:
                raise ValueError("metadata keys are 1-200 characters and values at most 2048")
        return metadata


class UploadRequest(_Request):
    """Upload one file to a destination."""

    model_config = ConfigDict(json_schema_extra=schemas.REQUEST_RULES)

    operation: Literal["upload"] = Field("upload", description="Upload (the default).")
    source: SourceSpec = Field(description="Where the file comes from.")
    destination: Destination = Field(
        description="Where it goes: `type` selects Inconvo or Mindset AI."
    )


class DeleteRequest(_Request):
    """Delete one file from a destination; there is no source."""

    operation: Literal["delete"] = Field(description="Delete a file.")
    destination: DeleteDestination = Field(
        description="The file to delete: `type` selects Inconvo or Mindset AI."
    )


def _operation(data: Any) -> str:
    """The request's ``operation``: ``upload`` when absent or null."""
    value = data.get("operation") if isinstance(data, dict) else getattr(data, "operation", None)
    return "upload" if value is None else str(value)


Request = UploadRequest | DeleteRequest
# Validates a request body: ``operation`` picks the model (``upload`` when absent).
REQUEST: TypeAdapter[Request] = TypeAdapter(
    Annotated[
        Annotated[UploadRequest, Tag("upload")] | Annotated[DeleteRequest, Tag("delete")],
        Discriminator(_operation),
    ]
)


def check_mindset_delivery(mime_type: str, delivery: str) -> None:
    """Raise ValueError when the API forbids ``delivery`` for ``mime_type``."""
    if delivery == "sourceUrl" and mime_type == "text/plain":
        raise ValueError("text/plain can only be delivered as documentContent")
    if delivery == "documentContent" and mime_type in SOURCE_ONLY_TYPES:
        raise ValueError(f"{mime_type} can only be delivered as sourceUrl")


INCONVO_EXTENSIONS = (".csv", ".json")


def check_upload_file_name(name: str) -> None:
    """Raise ValueError for an Inconvo file name with path tricks or control characters."""
    if ".." in name or "/" in name or "\\" in name:
        raise ValueError("a file name may not contain '..', '/' or '\\'")
    if _CONTROL.search(name):
        raise ValueError("a file name may not contain control characters")
    if not name.strip():
        raise ValueError("a file name may not be blank")
