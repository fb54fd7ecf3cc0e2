"""``courier doctor``: the configuration and every dependency, checked as ``courier run`` uses them.

Each check is one line: a verdict (``ok``, ``fail``, ``note`` for something to
know that is not broken, ``skip`` for what could not be checked) and, for a
failure, the fix in one sentence naming the variable. Doctor changes nothing:
it declares no queue, publishes nothing and uploads nothing.
"""

from __future__ import annotations

import asyncio

from service.config import ConfigError, Settings, load_settings, unknown_variables
from service.doctor.broker import broker_checks, topology_checks
from service.doctor.destinations import inconvo_check, mindset_check
from service.doctor.report import Check, Verdict, as_json, passed, render
from service.doctor.s3 import s3_checks

__all__ = [
    "Check",
    "Verdict",
    "as_json",
    "broker_checks",
    "configuration_checks",
    "destination_checks",
    "diagnose",
    "inconvo_check",
    "mindset_check",
    "passed",
    "policy_checks",
    "render",
    "s3_checks",
    "topology_checks",
]


async def diagnose(*, management_url: str | None = None, call_timeout: float = 5.0) -> list[Check]:
    """Every check, in report order; reads the environment as ``courier run`` does."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        return [
            Check("config", "fail", str(exc), f"correct {exc.variable}, then run doctor again"),
            *configuration_checks(),
            Check("deps", "skip", "dependencies not checked: the configuration is bad"),
        ]
    checks = [
        Check("config", "ok", "settings parsed as `courier run` parses them"),
        *configuration_checks(),
    ]
    groups = await asyncio.gather(
        broker_checks(settings, management_url=management_url, call_timeout=call_timeout),
        s3_checks(settings, call_timeout=call_timeout),
        inconvo_check(settings, call_timeout=call_timeout),
        mindset_check(settings, call_timeout=call_timeout),
    )
    for group in groups:
        checks += group
    return checks + destination_checks(settings) + policy_checks(settings)


def destination_checks(settings: Settings) -> list[Check]:
    """A failure when no destination has a key: then every request would fail."""
    if settings.inconvo_api_key is not None or settings.mindset_api_key is not None:
        return []
    return [
        Check(
            "config",
            "fail",
            "no destination has an API key: every request would fail as destination_not_configured",
            "set COURIER_INCONVO_API_KEY (or INCONVO_API_KEY) or COURIER_MINDSET_API_KEY "
            "(or MINDSET_API_KEY)",
        )
    ]


def configuration_checks() -> list[Check]:
    """A failure for every ``COURIER_*`` variable Courier does not know (a typo, probably)."""
    checks = []
    for name, nearest in unknown_variables():
        if nearest:
            checks.append(
                Check(
                    "config",
                    "fail",
                    f"{name} is not a Courier variable and is ignored (did you mean {nearest}?)",
                    f"rename {name} to {nearest}",
                )
            )
        else:
            checks.append(
                Check(
                    "config",
                    "fail",
                    f"{name} is not a Courier variable and is ignored",
                    f"remove {name} (README, Configuration, lists every variable)",
                )
            )
    return checks


def policy_checks(settings: Settings) -> list[Check]:
    """The source address policy in words."""
    if settings.source_allowed_hosts:
        http = (
            f"HTTP(S) sources: only {', '.join(settings.source_allowed_hosts)} "
            "(COURIER_SOURCE_ALLOWED_HOSTS: a bare host opens any port); every other host refused"
        )
    elif settings.source_allow_private:
        http = (
            "HTTP(S) sources: any address, loopback, private and link-local (the cloud "
            "metadata address 169.254.169.254) included (COURIER_SOURCE_ALLOW_PRIVATE=true)"
        )
    else:
        http = (
            "HTTP(S) sources: any public address; loopback, private, shared, link-local "
            "(the cloud metadata address 169.254.169.254), unique-local, multicast and "
            "reserved addresses refused, on every redirect hop"
        )
    buckets = (
        f"S3 sources: only buckets {', '.join(settings.s3_allowed_buckets)} "
        "(COURIER_S3_ALLOWED_BUCKETS)"
        if settings.s3_allowed_buckets
        else "S3 sources: any bucket the credentials can read (COURIER_S3_ALLOWED_BUCKETS empty)"
    )
    return [
        Check("sources", "note", http),
        Check("sources", "note", buckets),
        Check("sources", "note", "other URL schemes refused (unsupported_source)"),
    ]
