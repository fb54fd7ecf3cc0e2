"""RabbitMQ nodes of the installed server, started for one test: alone or as a cluster.

Each node has its own name, AMQP and distribution ports, and data and logs under
a temporary directory owned by the ``rabbitmq`` user (the server drops to it);
no plugin is enabled. The default node on 5672 is never touched, so a test can
stop, block or kill these nodes without disturbing anything else.

Their ports come from a range outside the kernel's ephemeral ports
(``ip_local_port_range``), a slice of it per pytest-xdist worker: a port handed out
by ``bind(0)`` or taken by an outgoing connection can never be one a node is about
to listen on. A port found taken all the same (another session on this machine)
is skipped, and a node that fails to boot on a taken port is booted again on
other ports. The Erlang VMs run one scheduler without busy-waiting
(:data:`ERL_ARGS`), so an idle test node does not steal CPU from the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import re
import shutil
import signal
import socket
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

BOOT_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
BOOT_ATTEMPTS = 3
# One scheduler, and no busy-waiting when it has nothing to do: a test node's idle
# VM would otherwise spin on a core the tests need.
ERL_ARGS = "+S 1:1 +sbwt none +sbwtdcpu none +sbwtdio none"
# Candidate port ranges for test nodes; the first clear of the ephemeral range is used.
# None holds a port of the machine's own node (5672, 15672, 25672) or epmd (4369).
PORT_RANGES = ((21000, 25000), (61000, 65000), (10000, 14000))
WORKER_SLICE = 200  # ports per pytest-xdist worker: 100 nodes (AMQP + distribution)


class NodeBootError(RuntimeError):
    """A node did not come up; ``port_taken`` when one of its ports was in use."""

    def __init__(self, message: str, *, port_taken: bool = False) -> None:
        super().__init__(message)
        self.port_taken = port_taken


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for ephemeral ports (``bind(0)``, outgoing connections)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def node_port_range() -> range:
    """This worker's slice of the first candidate range clear of the ephemeral ports."""
    low, high = ephemeral_range()
    start, end = next(
        ((a, b) for a, b in PORT_RANGES if b <= low or a > high),
        PORT_RANGES[0],
    )
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    slices = (end - start) // WORKER_SLICE
    index = int(worker) % slices if worker.isdigit() else 0
    first = start + index * WORKER_SLICE
    return range(first, first + WORKER_SLICE)


def _is_free(port: int) -> bool:
    """Nobody listens on (or is bound to) ``port``, on any address."""
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _port_pairs() -> Iterator[tuple[int, int]]:
    """(AMQP, distribution) port pairs from this worker's slice, each pair once, free now."""
    ports = node_port_range()
    pairs = [(ports[i], ports[i + 1]) for i in range(0, len(ports) - 1, 2)]
    # Another session on this machine walks the same slice: start somewhere else in it.
    offset = random.randrange(len(pairs))
    for pair in itertools.islice(itertools.cycle(pairs), offset, offset + len(pairs)):
        if pair not in _handed_out and all(_is_free(port) for port in pair):
            _handed_out.add(pair)
            yield pair


_handed_out: set[tuple[int, int]] = set()


def next_ports() -> tuple[int, int]:
    """A free (AMQP, distribution) port pair for a new node."""
    for pair in _port_pairs():
        return pair
    raise NodeBootError(f"no free port pair left in {node_port_range()}")


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class RabbitNode:
    """One node of the installed server, on ports of its own."""

    name: str  # e.g. courier-t1a2b@localhost
    base: Path
    peers: tuple[str, ...] = ()  # the cluster's nodes: it forms at boot (classic config)
    port: int = 0  # AMQP; both ports are chosen when the node starts
    dist_port: int = 0
    ports_tried: list[tuple[int, int]] = field(default_factory=list)

    @property
    def home(self) -> Path:
        """The node's own directory (config, data, logs, pid file)."""
        return self.base / self.name.split("@")[0]

    @property
    def url(self) -> str:
        """The node's AMQP URL."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _environment(self) -> dict[str, str]:
        home = self.home
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
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": ERL_ARGS,
        }

    def _prepare(self) -> None:
        home = self.home
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
        """Boot the node (detached) and wait until it takes AMQP connections.

        A node that fails to boot because one of its ports is taken is booted again
        on other ports (at most :data:`BOOT_ATTEMPTS` times)."""
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            self.port, self.dist_port = next_ports()
            self.ports_tried.append((self.port, self.dist_port))
            self._prepare()
            proc = await asyncio.create_subprocess_exec(
                "rabbitmq-server", "-detached", env=self._environment(), cwd=self.base
            )
            await proc.wait()
            try:
                await self.wait_amqp()
                return
            except NodeBootError as failed:
                await self.stop()
                if not failed.port_taken or attempt == BOOT_ATTEMPTS:
                    raise
                shutil.rmtree(self.home, ignore_errors=True)  # its log names the failure

    def _boot_failure(self) -> NodeBootError | None:
        """Why the node's boot failed, if its log says it did."""
        for log in (self.home / "log").glob("*.log"):
            with contextlib.suppress(OSError):
                text = log.read_text(errors="replace")
                if "eaddrinuse" in text:
                    return NodeBootError(
                        f"{self.name}: port {self.port} or {self.dist_port} is taken",
                        port_taken=True,
                    )
                if "BOOT FAILED" in text:
                    return NodeBootError(f"{self.name} failed to boot: {text[-2000:]}")
        return None

    def _listening(self) -> bool:
        """Whether the node's log says it listens on its AMQP port."""
        line = f"started TCP listener on 127.0.0.1:{self.port}"
        for log in (self.home / "log").glob("*.log"):
            with contextlib.suppress(OSError):
                if line in log.read_text(errors="replace"):
                    return True
        return False

    async def wait_amqp(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait until the node's AMQP port answers and the node reports it has started."""
        deadline = time.monotonic() + timeout
        # The AMQP listener opens last in the boot; rabbitmqctl await_startup polls
        # only every 10 s, so its port is the quicker sign.
        # The port alone could be another process's: the node's log names its listener.
        while not (_answers(self.port) and self._listening()):
            if (failure := self._boot_failure()) is not None:
                raise failure
            if time.monotonic() > deadline:
                raise NodeBootError(f"{self.name} did not open port {self.port} in {timeout:.0f}s")
            await asyncio.sleep(0.1)

    async def ctl(self, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        """``rabbitmqctl -n <node> ARGS``."""
        return await run("rabbitmqctl", "-q", "-n", self.name, *args, timeout=timeout, check=check)

    async def wait_not_quorum_critical(self, timeout: float = 60.0) -> None:
        """Wait until stopping this node leaves every quorum queue with a majority
        (a node just started again may still be catching up)."""
        deadline = time.monotonic() + timeout
        while True:
            proc = await asyncio.create_subprocess_exec(
                "rabbitmq-diagnostics",
                "-q",
                "-n",
                self.name,
                "check_if_node_is_quorum_critical",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await proc.communicate()
            if proc.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} stayed quorum critical: {out.decode()[-2000:]}")
            await asyncio.sleep(0.5)

    async def stop_app(self) -> None:
        """Stop the RabbitMQ application (the node stays up): clients are disconnected."""
        await self.ctl("stop_app")

    async def start_app(self) -> None:
        """Start the application again and wait for AMQP."""
        await self.ctl("start_app")
        await self.wait_amqp()

    async def stop(self) -> None:
        """Stop the whole node (its Erlang VM too), and make sure it is gone."""
        await self.ctl("stop", check=False, timeout=60)
        await self.wait_gone()

    def _pids(self) -> list[int]:
        """The node's processes: its VM and the scripts that start it, found by the
        ``RABBITMQ_NODENAME`` in their environment (a booting node has no pid file yet)."""
        marker = f"RABBITMQ_NODENAME={self.name}".encode()
        pids = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and int(proc.name) != os.getpid():
                with contextlib.suppress(OSError):
                    if marker in (proc / "environ").read_bytes().split(b"\0"):
                        pids.append(int(proc.name))
        return [pid for pid in pids if _alive(pid)]

    async def wait_gone(self, timeout: float = STOP_TIMEOUT) -> None:
        """Wait until no process of the node is left; terminate, then kill, what outlives
        ``timeout`` (a node still booting ignores ``rabbitmqctl stop``)."""
        deadline = time.monotonic() + timeout
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                for pid in self._pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                deadline = time.monotonic() + 10
            while self._pids():
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            else:
                return
        raise RuntimeError(f"{self.name} is still running (pids {self._pids()})")

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
        """Stop every node, make sure each is gone, then remove their data.

        A node still running keeps its directory: removing the data under a live node
        would leave it failing in ways that look like a test's fault.
        """
        results = await asyncio.gather(
            *(node.stop() for node in self.nodes), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise RuntimeError(f"test nodes did not stop; {self.nodes[0].base} kept: {errors}")
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

    async def _ask(self, *args: str) -> str:
        """One ``rabbitmqctl`` command on the first node that answers (cluster-wide ones)."""
        last = ""
        for node in self.nodes:
            try:
                return await node.ctl(*args)
            except RuntimeError as exc:  # that node is stopped: ask the next one
                last = str(exc)
        raise LookupError(f"no node answered {args}: {last}")

    async def connected_to(self, connection_name: str) -> RabbitNode | None:
        """The node a client connection of that name is on (e.g. ``courier-consume``)."""
        text = await self._ask("list_connections", "pid", "client_properties", "--no-table-headers")
        for line in text.splitlines():
            # A connection's pid names its node: <courier-1a2b3c-0@localhost.1660.0>
            if connection_name in line and (found := re.match(r"\s*<([^.>]+@[^.>]+)\.", line)):
                return self.node(found.group(1))
        return None

    async def leader(self, queue: str) -> RabbitNode:
        """The node leading quorum queue ``queue``."""
        text = await self._ask("list_queues", "name", "leader", "--no-table-headers")
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == queue:
                return self.node(parts[1])
        raise LookupError(f"no leader found for {queue}")

    async def queues_report(self) -> str:
        """Every queue's leader, members, ready and unacked messages and consumers."""
        try:
            return await self._ask(
                "list_queues",
                "name",
                "leader",
                "members",
                "messages_ready",
                "messages_unacknowledged",
                "consumers",
            )
        except LookupError as exc:
            return str(exc)


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
