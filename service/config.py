"""Settings: every configuration variable (README "Configuration"), read once at start-up.

Each variable may instead be given as ``<NAME>_FILE`` naming a file that holds
the value (surrounding whitespace trimmed), as Kubernetes secrets are mounted.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from service.topology import LONGEST_TENANT, MAX_TTL_MS, TENANT_INFIX

ENV_PREFIX = "COURIER_"
# Variables that hold secrets, and only secrets: masked wherever text leaves the process.
SECRET_VARIABLES = (
    "COURIER_INCONVO_API_KEY",
    "INCONVO_API_KEY",
    "COURIER_MINDSET_API_KEY",
    "MINDSET_API_KEY",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)
MAX_MESSAGE_BYTES = 1024 * 1024  # COURIER_MAX_MESSAGE_BYTES's default
MAX_NAME_BYTES = 255  # an AMQP short string: queue and exchange names
# The longest name Courier adds to COURIER_QUEUE: a delay tier's, or a tenant queue's.
_LONGEST_SUFFIX = max(len(f".retry.{MAX_TTL_MS // 1000}s"), len(TENANT_INFIX) + LONGEST_TENANT)
_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Parse ``10s``, ``1m``, ``12h``, ``250ms`` or a plain number of seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration such as 10s, 5m or 12h")
    number, unit = match.groups()
    return int(number) * _UNIT_SECONDS[(unit or "s").lower()]


def _comma_list(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _default_event_source() -> str:
    return f"urn:courier:{socket.gethostname()}"


class ConfigError(Exception):
    """A configuration value is invalid; ``variable`` names the culprit."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class Settings(BaseSettings):
    """The service's configuration; build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, populate_by_name=True
    )

    amqp_url: str = "amqp://guest:guest@localhost:5672/"
    queue: str = Field(default="courier.uploads", min_length=1, max_length=200)
    events_exchange: str = Field(default="courier.events", min_length=1, max_length=200)
    concurrency: int = Field(default=32, ge=1, le=1000)
    max_attempts: int = Field(default=5, ge=1, le=100)
    retry_delays: Annotated[tuple[int, ...], NoDecode] = (10, 60, 300, 1800)
    max_redeliveries: int = Field(default=5, ge=1, le=1000)
    shutdown_timeout: float = Field(default=25.0, ge=0)
    http_host: str = "0.0.0.0"  # noqa: S104 - a container must listen on all interfaces
    http_port: int = Field(default=8080, ge=0, le=65535)
    inconvo_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("COURIER_INCONVO_API_KEY", "INCONVO_API_KEY"),
    )
    inconvo_base_url: str = Field(
        default="https://app.inconvo.ai/api/v1",
        validation_alias=AliasChoices("COURIER_INCONVO_BASE_URL", "INCONVO_BASE_URL"),
    )
    inconvo_agent_id: str | None = None
    mindset_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("COURIER_MINDSET_API_KEY", "MINDSET_API_KEY"),
    )
    mindset_base_url: str = "https://a.api.mindset.ai"
    aws_region: str | None = Field(
        default=None, validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION")
    )
    presign_ttl: Annotated[int, NoDecode] = 12 * 3600
    source_allowed_hosts: Annotated[tuple[str, ...], NoDecode] = ()
    source_allow_private: bool = False
    s3_allowed_buckets: Annotated[tuple[str, ...], NoDecode] = ()
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    event_source: str = Field(default_factory=_default_event_source, min_length=1)
    max_message_bytes: int = Field(default=MAX_MESSAGE_BYTES, ge=1024)
    http_connect_timeout: float = Field(default=10.0, gt=0)
    http_read_timeout: float = Field(default=60.0, gt=0)
    destination_timeout: float = Field(default=60.0, gt=0)
    publish_timeout: float = Field(default=10.0, gt=0)
    tmp_dir: Path | None = None
    # Flow control.
    breaker_threshold: int = Field(default=5, ge=1, le=1000)
    breaker_min_requests: int = Field(default=3, ge=1, le=1000)
    breaker_cooldown: float = Field(default=10.0, gt=0, le=300)
    hold_max: float = Field(default=3600.0, gt=0)
    inconvo_rate_limit: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    mindset_rate_limit: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    source_timeout: float = Field(default=300.0, gt=0)
    # Fair share between tenants: "web=4,backfill=1"; a tenant not named weighs 1.
    tenant_weights: Annotated[dict[str, float], NoDecode] = Field(default_factory=dict)
    # Following a file after its upload.
    track_ingestion: bool = True
    ingestion_timeout: float = Field(default=6 * 3600.0, gt=0)

    @field_validator("retry_delays", mode="before")
    @classmethod
    def _parse_delays(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        delays = [parse_duration(item) for item in _comma_list(value)]
        if not delays:
            raise ValueError("needs at least one delay, such as 10s,1m,5m,30m")
        if any(d < 1 or d != int(d) for d in delays):
            raise ValueError("delays must be whole seconds of at least 1s")
        if sorted(set(delays)) != delays:
            raise ValueError("delays must be distinct and increasing")
        return tuple(int(d) for d in delays)

    @field_validator("retry_delays")
    @classmethod
    def _delays_fit_the_broker(cls, delays: tuple[int, ...]) -> tuple[int, ...]:
        longest = MAX_TTL_MS // 1000
        if any(d * 1000 > MAX_TTL_MS for d in delays):
            raise ValueError(
                f"a delay may be at most {longest}s (about 49 days), RabbitMQ's x-message-ttl limit"
            )
        return delays

    @field_validator("queue", "events_exchange")
    @classmethod
    def _name_fits_the_broker(cls, name: str, info: ValidationInfo) -> str:
        if name.startswith("amq."):
            raise ValueError("names starting 'amq.' are reserved by RabbitMQ")
        # AMQP names are at most 255 bytes; the queue's tiers and tenant queues add to it.
        room = MAX_NAME_BYTES - (_LONGEST_SUFFIX if info.field_name == "queue" else 0)
        if len(name.encode()) > room:
            raise ValueError(f"at most {room} bytes in UTF-8")
        return name

    @field_validator("presign_ttl", mode="before")
    @classmethod
    def _parse_ttl(cls, value: Any) -> Any:
        if isinstance(value, str):
            seconds = parse_duration(value)
            # SigV4 presigned URLs are valid for at most seven days.
            if not 1 <= seconds <= 7 * 86400:
                raise ValueError("must be between 1s and 7d")
            return int(seconds)
        return value

    @field_validator(
        "breaker_cooldown", "hold_max", "source_timeout", "ingestion_timeout", mode="before"
    )
    @classmethod
    def _parse_seconds(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("inconvo_rate_limit", "mindset_rate_limit", mode="before")
    @classmethod
    def _unset_rate(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("tenant_weights", mode="before")
    @classmethod
    def _parse_weights(cls, value: Any) -> Any:
        if isinstance(value, str):
            from service.fair import parse_weights

            return parse_weights(value)
        return value

    @field_validator("source_allowed_hosts", "s3_allowed_buckets", mode="before")
    @classmethod
    def _parse_list(cls, value: Any) -> Any:
        return _comma_list(value)

    @field_validator("source_allowed_hosts")
    @classmethod
    def _check_hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from service.sources.guard import parse_allowed_hosts

        parse_allowed_hosts(value)
        return value

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _fold_case(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("inconvo_api_key", "mindset_api_key", "inconvo_agent_id", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("inconvo_base_url", "mindset_base_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("amqp_url")
    @classmethod
    def _check_amqp_urls(cls, value: str) -> str:
        urls = _comma_list(value)
        if not urls:
            raise ValueError("needs at least one amqp:// or amqps:// URL")
        for url in urls:
            if not url.startswith(("amqp://", "amqps://")):
                raise ValueError("each URL must start with amqp:// or amqps://")
        return value

    def rate_limit(self, destination: str) -> float | None:
        """``COURIER_<DESTINATION>_RATE_LIMIT``: requests/s to that destination, or None."""
        value: float | None = getattr(self, f"{destination}_rate_limit")
        return value

    @property
    def amqp_urls(self) -> tuple[str, ...]:
        """The broker nodes of ``COURIER_AMQP_URL``, in the order they are tried."""
        return tuple(_comma_list(self.amqp_url))

    def secret_values(self) -> list[str]:
        """Every configured secret (API keys, the AMQP password, AWS secrets), for masking."""
        values = [k.get_secret_value() for k in (self.inconvo_api_key, self.mindset_api_key) if k]
        for url in self.amqp_urls:
            password = urlsplit(url).password
            if password and password != "guest":  # noqa: S105 - the public default is no secret
                values.append(unquote(password))
        # The API keys' variables are read above as settings; AWS's belong to botocore.
        for name in SECRET_VARIABLES:
            if name.startswith("AWS_") and (value := os.environ.get(name)):
                values.append(value)
        return values

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _FileEnvSource(settings_cls))


def env_names(name: str, field: FieldInfo) -> list[str]:
    """The environment variable names that set the field ``name``."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices]
    return [ENV_PREFIX + name.upper()]


class _FileEnvSource(PydanticBaseSettingsSource):
    """Reads ``<VAR>_FILE`` variables: the value is the named file's content."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        for env in env_names(field_name, field):
            path = _environ_get(env + "_FILE")
            if path is None:
                continue
            try:
                return Path(path).read_text(encoding="utf-8").strip(), field_name, False
            except OSError as exc:
                raise ConfigError(env + "_FILE", f"cannot read {path}: {exc.strerror}") from exc
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            value, key, _ = self.get_field_value(field, name)
            if value is not None:
                data[key] = value
        return data


def _environ_get(name: str) -> str | None:
    for key, value in os.environ.items():
        if key.upper() == name:
            return value
    return None


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment (plus explicit overrides).

    Raises :class:`ConfigError` naming the first bad variable.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        field_name = str(error["loc"][0]) if error["loc"] else ""
        field = Settings.model_fields.get(field_name)
        variable = env_names(field_name, field)[0] if field else field_name.upper()
        raise ConfigError(variable, error["msg"]) from None


def known_variables() -> frozenset[str]:
    """Every variable name the settings read, ``_FILE`` variants and fallbacks included."""
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        for env in env_names(name, field):
            names |= {env.upper(), env.upper() + "_FILE"}
    return frozenset(names)


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """``COURIER_*`` variables that Courier does not read (typos), each with the nearest known name.

    Names compare case-insensitively, as the settings read them.
    """
    env = os.environ if environ is None else environ
    known = known_variables()
    # Compared without the shared prefix, which would make every name look close.
    suffixes = sorted(
        name.removeprefix(ENV_PREFIX) for name in known if name.startswith(ENV_PREFIX)
    )
    found: list[tuple[str, str | None]] = []
    for key in sorted(env):
        upper = key.upper()
        if upper.startswith(ENV_PREFIX) and upper not in known:
            nearest = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), suffixes, n=1)
            found.append((key, ENV_PREFIX + nearest[0] if nearest else None))
    return found
