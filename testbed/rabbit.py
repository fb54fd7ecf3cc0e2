"""RabbitMQ nodes of the installed server, started for one test: alone or as a cluster.

Each node has its own name, AMQP and distribution ports, and data and logs under
a temporary directory owned by the ``rabbitmq`` user (the server drops to it);
no plugin is enabled. The default node on 5672 is never touched, so a test can
stop, block or kill these nodes without disturbing anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from testbed.support import free_port

BOOT_TIMEOUT = 60.0


def rabbitmq_available() -> bool:
    """Whether the RabbitMQ server and its tools are installed here."""
    return bool(shutil.which("rabbitmq-server") and shutil.which("rabbitmqctl"))


async def run(*args: str, timeout: float = 60.0, check: bool = True) -> str:
    """Run a command; returns its output (stdout and stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    text = out.decode(errors="replace")
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {text[-2000:]}")
    return text


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class RabbitNode:
    """One node of the installed server, on ports of its own."""

    name: str  # e.g. courier-t1a2b@localhost
    base: Path
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    peers: tuple[str, ...] = ()  # the cluster's nodes: it forms at boot (classic config)

    @property
    def url(self) -> str:
        """The node's AMQP URL."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _environment(self) -> dict[str, str]:
        home = self.base / self.name.split("@")[0]
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(home / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(home / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(home / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(home / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(home / "pid"),
        }

    def _prepare(self) -> None:
        home = self.base / self.name.split("@")[0]
        for sub in ("mnesia", "log"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        (home / "enabled_plugins").write_text("")
        (home / "rabbitmq-env.conf").write_text("")
        (home / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            "loopback_users = none\n"
            # The test machines' disks are shared and sometimes nearly full.
            "disk_free_limit.absolute = 1MB\n"
            + (
                "cluster_formation.peer_discovery_backend = classic_config\n"
                + "".join(
                    f"cluster_formation.classic_config.nodes.{i} = {peer}\n"
                    for i, peer in enumerate(self.peers, 1)
                )
                if self.peers
                else ""
            )
        )
        shutil.chown(self.base, "rabbitmq", "rabbitmq")
        for path in [home, *home.rglob("*")]:
            shutil.chown(path, "rabbitmq", "rabbitmq")

    async def start(self) -> None:
        """Boot the node (detached) and wait until it takes AMQP connections."""
        self._prepare()
        proc = await asyncio.create_subprocess_exec(
            "rabbitmq-server", "-detached", env=self._environment(), cwd=self.base
        )
        await proc.wait()
        await self.wait_amqp()

    async def wait_amqp(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait until the node's AMQP port answers and the node reports it has started."""
        deadline = time.monotonic() + timeout
        # The AMQP listener opens last in the boot; rabbitmqctl await_startup polls
        # only every 10 s, so its port is the quicker sign.
        while not _answers(self.port):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not open port {self.port}")
            await asyncio.sleep(0.1)

    async def ctl(self, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        """``rabbitmqctl -n <node> ARGS``."""
        return await run("rabbitmqctl", "-q", "-n", self.name, *args, timeout=timeout, check=check)

    async def stop_app(self) -> None:
        """Stop the RabbitMQ application (the node stays up): clients are disconnected."""
        await self.ctl("stop_app")

    async def start_app(self) -> None:
        """Start the application again and wait for AMQP."""
        await self.ctl("start_app")
        await self.wait_amqp()

    async def stop(self) -> None:
        """Stop the whole node (its Erlang VM too)."""
        await self.ctl("stop", check=False, timeout=60)

    async def set_memory_watermark(self, fraction: float) -> None:
        """Set ``vm_memory_high_watermark``: a tiny one raises the memory alarm."""
        await self.ctl("set_vm_memory_high_watermark", str(fraction))


@dataclass
class RabbitCluster:
    """Nodes joined into one cluster (or a single node)."""

    nodes: list[RabbitNode]

    @property
    def urls(self) -> str:
        """``COURIER_AMQP_URL`` for all nodes, comma-separated."""
        return ",".join(node.url for node in self.nodes)

    async def stop(self) -> None:
        """Stop every node and remove their data."""
        await asyncio.gather(*(node.stop() for node in self.nodes), return_exceptions=True)
        if self.nodes:
            shutil.rmtree(self.nodes[0].base, ignore_errors=True)

    def node(self, name: str) -> RabbitNode:
        """The node called ``name``."""
        return next(n for n in self.nodes if n.name == name)

    async def wait_formed(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait until every node runs as a member of the one cluster."""
        deadline = time.monotonic() + timeout
        while True:
            text = await self.nodes[0].ctl(
                "eval", "rabbit_mnesia:cluster_nodes(running).", check=False
            )
            if all(node.name.split("@")[0] in text for node in self.nodes):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster did not form: {text}")
            await asyncio.sleep(0.5)

    async def connected_to(self, connection_name: str) -> RabbitNode | None:
        """The node a client connection of that name is on (e.g. ``courier-consume``)."""
        for node in self.nodes:
            text = await node.ctl("list_connections", "client_properties", check=False)
            if f'"{connection_name}"' in text or connection_name in text:
                return node
        return None

    async def leader(self, queue: str) -> RabbitNode:
        """The node leading quorum queue ``queue``."""
        for node in self.nodes:
            text = await node.ctl(
                "list_queues", "name", "leader", "--no-table-headers", check=False
            )
            for line in text.splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[0] == queue:
                    return self.node(parts[1])
        raise LookupError(f"no leader found for {queue}")


async def start_cluster(size: int = 3) -> RabbitCluster:
    """Start ``size`` fresh nodes forming one cluster (one node: a lone broker)."""
    base = Path(tempfile.mkdtemp(prefix="courier-rabbit-"))
    tag = uuid.uuid4().hex[:6]
    names = tuple(f"courier-{tag}-{i}@localhost" for i in range(size))
    cluster = RabbitCluster([RabbitNode(n, base, peers=names if size > 1 else ()) for n in names])
    try:
        await asyncio.gather(*(node.start() for node in cluster.nodes))
        await cluster.wait_formed()
    except BaseException:
        await cluster.stop()
        raise
    return cluster


@contextlib.asynccontextmanager
async def rabbit_cluster(size: int = 3) -> AsyncIterator[RabbitCluster]:
    """A cluster of ``size`` fresh nodes for the block; every node is stopped at the end."""
    cluster = await start_cluster(size)
    try:
        yield cluster
    finally:
        await cluster.stop()
