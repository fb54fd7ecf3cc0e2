"""The broker's nodes and Courier's topology on them, looked at without declaring anything."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import aiormq

from service.config import Settings
from service.doctor.management import Management, connect_management
from service.doctor.report import Check
from service.doctor.tenants import tenant_queue_checks, weights_check
from service.redact import redact_url
from service.topology import QueueSpec, Topology


async def broker_checks(
    settings: Settings, *, management_url: str | None = None, call_timeout: float = 5.0
) -> list[Check]:
    """Each node of COURIER_AMQP_URL, then the topology on the first node that answers."""
    checks: list[Check] = []
    reached: tuple[str, aiormq.abc.AbstractConnection] | None = None
    for url in settings.amqp_urls:
        shown = redact_url(url)
        try:
            connection = await asyncio.wait_for(aiormq.connect(url), call_timeout)
        except Exception as exc:  # every failure becomes a report line
            checks.append(_broker_failure(shown, exc, call_timeout))
            continue
        props = connection.server_properties or {}
        product = f"{_text(props.get('product'))} {_text(props.get('version'))}".strip()
        checks.append(
            Check("broker", "ok", f"{shown}: reachable, credentials accepted ({product})")
        )
        if reached is None:
            reached = (url, connection)
        else:
            await connection.close()
    if reached is None:
        checks.append(Check("topology", "skip", "not checked: no broker node answered"))
        return checks
    first_url, first = reached
    try:
        management = await connect_management(first_url, management_url, call_timeout)
        checks += await topology_checks(
            first, Topology.from_settings(settings), management, settings.tenant_weights
        )
    finally:
        await first.close()
    return checks


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


def _broker_failure(shown: str, exc: BaseException, call_timeout: float) -> Check:
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return Check(
            "broker",
            "fail",
            f"{shown}: the broker refused the user name or password",
            "set the right user and password in COURIER_AMQP_URL",
        )
    if isinstance(exc, TimeoutError):
        problem = f"no answer within {call_timeout:g} s"
    elif isinstance(exc, aiormq.exceptions.InvalidFrameError):
        # RabbitMQ closes the connection at Connection.Open: the virtual host.
        return Check(
            "broker",
            "fail",
            f"{shown}: the broker refused the virtual host (missing, or no access for this user)",
            "name an existing virtual host the user may use in COURIER_AMQP_URL",
        )
    else:
        problem = f"unreachable ({exc})"
    return Check(
        "broker",
        "fail",
        f"{shown}: {problem}",
        "point COURIER_AMQP_URL at a running RabbitMQ (host and port)",
    )


async def topology_checks(
    connection: aiormq.abc.AbstractConnection,
    topology: Topology,
    management: Management | str,
    weights: Mapping[str, float] | None = None,
) -> list[Check]:
    """Each queue and the events exchange: present (passive declares), arguments compared
    where the management API shows them; then the tenants' weights and queues."""
    checks: list[Check] = []
    try:
        for spec in (topology.requests, *topology.tiers, topology.dead):
            checks.append(await _queue_check(connection, spec, management))
        checks.append(await _exchange_check(connection, topology.events_exchange, management))
        checks.append(weights_check(weights or {}))
        api = management if isinstance(management, Management) else None
        checks += await tenant_queue_checks(connection, topology, weights or {}, api)
    finally:
        if isinstance(management, Management):
            await management.session.close()
    if isinstance(management, str):
        checks.append(
            Check(
                "topology",
                "note",
                f"arguments not compared: {management}, and plain AMQP shows a queue's "
                "arguments only to a declare, which doctor does not make "
                "(courier doctor --management-url URL names another address)",
            )
        )
    return checks


_ABSENT = "absent; `courier run` declares it at start-up (the user needs the configure permission)"


async def _queue_check(
    connection: aiormq.abc.AbstractConnection, spec: QueueSpec, management: Management | str
) -> Check:
    channel = await connection.channel()
    try:
        ok = await channel.queue_declare(spec.name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        until = (
            ", and until then producers' requests are dropped unrouted"
            if spec.role == "requests"
            else ""
        )
        return Check("topology", "note", f"queue {spec.name}: {_ABSENT}{until}")
    except aiormq.exceptions.ChannelAccessRefused:
        return Check(
            "topology",
            "fail",
            f"queue {spec.name}: the user may not use it",
            "grant the user of COURIER_AMQP_URL configure, write and read on Courier's queues",
        )
    finally:
        if not channel.is_closed:
            await channel.close()
    facts = f"{ok.message_count} messages ready, {ok.consumer_count} consumers"
    if not isinstance(management, Management):
        return Check("topology", "ok", f"queue {spec.name}: present ({facts})")
    info = await management.get("queues", spec.name)
    if info is None:
        return Check("topology", "ok", f"queue {spec.name}: present ({facts}; arguments unseen)")
    differences = _differences(spec.arguments, info.get("arguments") or {})
    if not differences:
        return Check(
            "topology", "ok", f"queue {spec.name}: present, arguments as expected ({facts})"
        )
    return Check(
        "topology",
        "fail",
        f"queue {spec.name}: arguments differ from Courier's: {'; '.join(differences)}",
        "move its messages away and delete the queue so `courier run` declares it anew, "
        f"or set COURIER_QUEUE to a new name ({facts})",
    )


def _differences(expected: Any, actual: dict[str, Any]) -> list[str]:
    found = []
    for key, value in expected.items():
        if key not in actual:
            found.append(f"{key} missing (expected {value!r})")
        elif actual[key] != value:
            found.append(f"{key} is {actual[key]!r} (expected {value!r})")
    found += [
        f"{key} is {actual[key]!r} (Courier sets none)" for key in actual if key not in expected
    ]
    return found


async def _exchange_check(
    connection: aiormq.abc.AbstractConnection, name: str, management: Management | str
) -> Check:
    channel = await connection.channel()
    try:
        await channel.exchange_declare(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return Check(
            "topology",
            "note",
            f"exchange {name}: absent; `courier run` declares it at start-up, "
            "and event consumers cannot bind to it until then",
        )
    finally:
        if not channel.is_closed:
            await channel.close()
    if isinstance(management, Management):
        info = await management.get("exchanges", name)
        if info is not None and (info.get("type") != "topic" or not info.get("durable")):
            return Check(
                "topology",
                "fail",
                f"exchange {name}: a {'durable' if info.get('durable') else 'transient'} "
                f"{info.get('type')} exchange, Courier publishes to a durable topic exchange",
                "delete the exchange so `courier run` declares it anew, "
                "or set COURIER_EVENTS_EXCHANGE to a new name",
            )
    return Check("topology", "ok", f"exchange {name}: present")
