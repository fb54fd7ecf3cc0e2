"""The RabbitMQ management API, for the doctor's checks that AMQP cannot answer."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import aiohttp

from service.redact import redact_url


@dataclass(frozen=True, slots=True)
class Management:
    """The RabbitMQ management API, when it answers: the only way to read queue arguments."""

    session: aiohttp.ClientSession
    base: str
    vhost: str

    @property
    def quoted_vhost(self) -> str:
        """The virtual host, as a path segment of the API's URLs."""
        return quote(self.vhost, safe="")

    async def get(self, kind: str, name: str) -> dict[str, Any] | None:
        """One object's page, or None when the API does not show it."""
        url = f"{self.base}/api/{kind}/{self.quoted_vhost}/{quote(name, safe='')}"
        async with self.session.get(url) as response:
            if response.status != 200:
                return None
            data = await response.json()
            return data if isinstance(data, dict) else None


async def connect_management(
    amqp_url: str, management_url: str | None, call_timeout: float
) -> Management | str:
    """The management API with the AMQP URL's credentials, or why it cannot be used."""
    parts = urlsplit(amqp_url)
    if management_url is None:
        scheme, port = ("https", 15671) if parts.scheme == "amqps" else ("http", 15672)
        management_url = f"{scheme}://{parts.hostname}:{port}"
    given = urlsplit(management_url)
    # Credentials in the management URL win over the AMQP URL's.
    login = given if given.username is not None else parts
    base = redact_url(management_url).rstrip("/")
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    user_pass = f"{unquote(login.username or '')}:{unquote(login.password or '')}"
    session = aiohttp.ClientSession(
        headers={"Authorization": "Basic " + base64.b64encode(user_pass.encode()).decode()},
        timeout=aiohttp.ClientTimeout(total=call_timeout),
    )
    try:
        async with session.get(f"{base}/api/overview") as response:
            if response.status == 200:
                return Management(session, base, vhost)
            reason = f"answered HTTP {response.status}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        reason = f"does not answer ({type(exc).__name__})"
    await session.close()
    return f"the management API at {base} {reason}"
