"""Each destination's API key, tried with one harmless authenticated read."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from urllib.parse import quote

import aiohttp

from service.config import Settings, env_names
from service.doctor.report import Check
from service.redact import redact_url

# Any harmless name: Inconvo lists the files of this user scope, Mindset looks up an
# externalId that nobody uses.
PROBE = "courier-doctor"


def _set_by(field_name: str) -> str:
    """The variable that set a settings field (``_FILE`` variants and fallbacks included)."""
    names = env_names(field_name, Settings.model_fields[field_name])
    present = {key.upper() for key in os.environ}
    for name in names:
        for candidate in (name, name + "_FILE"):
            if candidate in present:
                return candidate
    return names[0]


async def _probe(
    area: str,
    url: str,
    headers: dict[str, str],
    variable: str,
    base_variable: str,
    accepted: Callable[[int], bool],
    call_timeout: float,
) -> Check:
    """One authenticated GET; ``accepted`` tells from the status whether the key works."""
    shown = redact_url(url)
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=call_timeout)) as session,
            session.get(url, headers=headers, allow_redirects=False) as response,
        ):
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Check(
            area,
            "fail",
            f"cannot reach {shown} ({type(exc).__name__})",
            f"correct {base_variable} or the network path to it",
        )
    if status in (401, 403):
        return Check(
            area,
            "fail",
            f"the API key was refused (HTTP {status} from {shown})",
            f"set {variable} to a valid key",
        )
    if accepted(status):
        return Check(
            area, "ok", f"API key accepted (HTTP {status} from {shown}; key from {variable})"
        )
    return Check(
        area,
        "fail",
        f"unexpected HTTP {status} from {shown}",
        f"check {base_variable} (it should name the API root)",
    )


async def inconvo_check(settings: Settings, *, call_timeout: float = 5.0) -> list[Check]:
    """Inconvo's key, by listing the files of a user scope nobody uses."""
    key = settings.inconvo_api_key
    if key is None:
        return [
            Check(
                "inconvo",
                "note",
                "not configured (COURIER_INCONVO_API_KEY and INCONVO_API_KEY unset): "
                "Inconvo requests fail as destination_not_configured",
            )
        ]
    agent = settings.inconvo_agent_id
    prefix = f"/agents/{quote(agent, safe='')}" if agent else ""
    url = f"{settings.inconvo_base_url}{prefix}/datasets/user/{PROBE}"
    check = await _probe(
        "inconvo",
        url,
        {"Authorization": f"Bearer {key.get_secret_value()}"},
        _set_by("inconvo_api_key"),
        _set_by("inconvo_base_url"),
        lambda status: 200 <= status < 300,
        call_timeout,
    )
    if agent and check.verdict == "fail" and "HTTP 404" in check.detail:
        check = Check("inconvo", "fail", check.detail, "correct COURIER_INCONVO_AGENT_ID")
    return [check]


async def mindset_check(settings: Settings, *, call_timeout: float = 5.0) -> list[Check]:
    """Mindset's key, by looking up an externalId that does not exist: 404 means it works."""
    key = settings.mindset_api_key
    if key is None:
        return [
            Check(
                "mindset",
                "note",
                "not configured (COURIER_MINDSET_API_KEY and MINDSET_API_KEY unset): "
                "Mindset requests fail as destination_not_configured",
            )
        ]
    url = (
        f"{settings.mindset_base_url}/api/v1/appuid/{PROBE}/contexts/{PROBE}"
        f"/files/externalId/{PROBE}-{uuid.uuid4().hex[:12]}"
    )
    return [
        await _probe(
            "mindset",
            url,
            {"x-api-key": key.get_secret_value()},
            _set_by("mindset_api_key"),
            "COURIER_MINDSET_BASE_URL",
            lambda status: status == 404 or 200 <= status < 300,
            call_timeout,
        )
    ]
