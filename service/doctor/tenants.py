"""The tenants: their weights, and the queues their moved work waits in (docs/isolation.md)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import aiohttp
import aiormq

from service.contracts import DEFAULT_TENANT
from service.doctor.report import Check
from service.topology import TENANT_INFIX, Topology

if TYPE_CHECKING:
    from service.doctor.management import Management

# Tenant queues listed at most; a deployment with more names them in a note.
PAGE_SIZE = 500


def weights_check(weights: Mapping[str, float]) -> Check:
    """The configured weights, as the dispatcher reads them."""
    if not weights:
        return Check("tenants", "ok", "COURIER_TENANT_WEIGHTS: none, every tenant weighs 1")
    named = ", ".join(f"{tenant}={weight:g}" for tenant, weight in sorted(weights.items()))
    return Check("tenants", "ok", f"COURIER_TENANT_WEIGHTS: {named}; any other tenant weighs 1")


async def tenant_queue_checks(
    connection: aiormq.abc.AbstractConnection,
    topology: Topology,
    weights: Mapping[str, float],
    management: Management | None,
) -> list[Check]:
    """Every tenant queue the management API lists, or (without it) those of the default
    tenant and the tenants named in the weights: each with its depth."""
    prefix = topology.requests.name + TENANT_INFIX
    listed = await _listed(management, prefix) if management is not None else None
    if listed is None:
        found = await _declared(connection, [prefix + t for t in (DEFAULT_TENANT, *weights)])
        note = Check(
            "tenants",
            "note",
            "only the default tenant's queue and those of the tenants in "
            "COURIER_TENANT_WEIGHTS were looked for: the management API lists the others",
        )
        return [*_depths(found, prefix), note]
    return _depths(listed, prefix) or [
        Check("tenants", "ok", "no tenant queue: no work is waiting moved aside")
    ]


def _depths(queues: Iterable[tuple[str, int, int]], prefix: str) -> list[Check]:
    return [
        Check(
            "tenants",
            "ok",
            f"tenant {name.removeprefix(prefix)}: queue {name}, "
            f"{ready} messages ready, {consumers} consumers",
        )
        for name, ready, consumers in queues
    ]


async def _listed(management: Management, prefix: str) -> list[tuple[str, int, int]] | None:
    """The tenant queues as the management API lists them, or None if it would not."""
    url = f"{management.base}/api/queues/{management.quoted_vhost}"
    params = {
        "page": "1",
        "page_size": str(PAGE_SIZE),
        "name": f"^{re.escape(prefix)}",
        "use_regex": "true",
        "columns": "name,messages_ready,consumers",
    }
    try:
        async with management.session.get(url, params=params) as response:
            if response.status != 200:
                return None
            page = await response.json()
    except (aiohttp.ClientError, TimeoutError):
        return None
    items = page.get("items", []) if isinstance(page, dict) else []
    return [
        (str(q["name"]), int(q.get("messages_ready") or 0), int(q.get("consumers") or 0))
        for q in items
        if isinstance(q, dict) and str(q.get("name", "")).startswith(prefix)
    ]


async def _declared(
    connection: aiormq.abc.AbstractConnection, names: list[str]
) -> list[tuple[str, int, int]]:
    """Those of ``names`` that exist (passive declares), with their depth."""
    found = []
    for name in names:
        channel = await connection.channel()
        try:
            ok = await channel.queue_declare(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            continue
        finally:
            if not channel.is_closed:
                await channel.close()
        found.append((name, int(ok.message_count or 0), int(ok.consumer_count or 0)))
    return found
