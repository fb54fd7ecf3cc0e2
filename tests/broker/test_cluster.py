"""A three-node RabbitMQ cluster loses the node Courier is connected to, then the request
queue's leader, during 1,000 requests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from testbed.fakes import FakeInconvo
from testbed.node_loss import node_loss_run
from testbed.rabbit import rabbit_cluster
from testbed.support import FileServer, Names


@pytest.mark.timeout(240)
async def test_node_loss_in_a_three_node_cluster(
    process_env: Callable[..., dict[str, str]],
    names: Names,
    files: FileServer,
    inconvo: FakeInconvo,
) -> None:
    """Stop the node Courier is connected to, then the request queue's leader: every request ends in one terminal event (a repeat only for work interrupted mid-flight), and events flow again within 10 s of each loss."""
    inconvo.delay = 0.25
    url = files.add("/a.csv", b"1\n")
    env = process_env(COURIER_CONCURRENCY="16")
    async with rabbit_cluster(3) as cluster:
        result = await node_loss_run(cluster, env, names.queue, names.events_exchange, url, n=1000)
    print("\n" + "\n".join(result.rows()))
    assert result.ended == result.sent == 1000, "requests were lost"
    assert result.succeeded == 1000
    assert result.duplicated <= 2 * 16, "more repeats than the work in flight at the losses"
    assert [loss.what for loss in result.losses] == [
        "the node Courier is connected to",
        "the request queue's leader",
    ]
    assert all(loss.recovered_s < 10 for loss in result.losses), result.rows()
