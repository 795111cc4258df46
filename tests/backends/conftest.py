"""A real local Ray cluster on 127.0.0.1 for the backend tests: the ``ray_cluster`` fixture.

One cluster per test session: a head node (1 CPU) and a worker node (2 CPUs and the custom
resource ``worker_node``, so a task can be pinned to it), each a separate ``ray start``, each
with its own temp dir under pytest's and its own free ports. Tests kill the worker node by its
PID (:meth:`RayCluster.kill_worker_node`, best once :meth:`RayCluster.worker_tasks` shows work
running there) and start another (:meth:`RayCluster.start_worker_node`,
:meth:`RayCluster.ensure_worker_node`). Without Ray the fixture skips, except in CI (``CI``
set), where it fails.

A ``ray.init(address=...)`` driver without ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (see below)
does not fail: it hangs, trying the machine's outward address, where nothing listens.

Loopback only. Ray turns ``127.0.0.1`` into the machine's outward address wherever it reads an
address (``ray start --address/--node-ip-address``, ``ray.init(address=...)``), unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which ``ray start`` refuses for a worker node. So:

* every node starts through :data:`RAY_CLI`, the ``ray`` command with that one rewrite turned
  off, and its processes get ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: every node registers as
  ``127.0.0.1`` and the GCS listens on 127.0.0.1 only;
* for the session the test process sets :data:`DRIVER_ENV` in ``os.environ`` (inherited by the
  drivers the tests start, such as ``phalanx run``) and Ray's in-process copy of that switch, so
  ``ray.init(address=cluster.address)`` connects to 127.0.0.1, here and in subprocesses.

Each node's ``ray start`` runs in a new session, and every process it starts stays in that
session (Ray's workers leave their raylet's process group but not its session, and keep it when
they outlive their raylet), so the fixture finds exactly a node's processes by session id in
``/proc``. It never uses ``ray stop``, which would stop every Ray on the machine. At the end of
the session it shuts down the test process's driver, kills every process of its nodes' sessions
and fails if any is still running; a watchdog process does the same if the test process dies
without its teardown. (A tag in the environment would not do: Ray renames its processes with
``setproctitle``, which wipes most of what ``/proc/<pid>/environ`` shows.)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

INSTALL_HINT = "pip install 'phalanx[ray]'"
LOOPBACK = "127.0.0.1"
HEAD_CPUS = 1
WORKER_CPUS = 2
WORKER_RESOURCE = "worker_node"
OBJECT_STORE_BYTES = 100 * 1024 * 1024
START_TIMEOUT = 90.0
STOP_TIMEOUT = 15.0

HEALTH_CHECK = {
    "RAY_health_check_initial_delay_ms": "0",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "4",
}
"""The GCS checks each raylet every 0.5 s and marks it dead after 4 failed checks in a row: a
killed node is dead in about 2 s (Ray's defaults take about 15 s), while a raylet has to be
unresponsive for 2 s before it is wrongly taken for dead."""

DRIVER_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}
"""Set in the test process for the session (and ``RAY_ADDRESS`` unset), and given to the nodes.
Ray 2.60 turns token authentication on by itself when ``~/.ray/auth_token`` exists (a local
``ray.init()`` writes it): the cluster and its drivers must agree, whatever that file says."""

RAY_CLI = """\
import os
import sys

import ray._private.services as services

services.resolve_ip_for_localhost  # fails loudly if Ray renames what this turns off
services.resolve_ip_for_localhost = lambda host: host
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

from ray.scripts.scripts import main

sys.exit(main())
"""
"""``python -c RAY_CLI start ...`` is ``ray start ...`` keeping a loopback address loopback.

The rewrite off, ``--address 127.0.0.1:port`` and ``--node-ip-address 127.0.0.1`` stay as given.
The environment variable is set only after Ray's constants were read, so this process still
starts a worker node (which Ray refuses when it is ``0``) and every process it starts reads
``0``: anything there that asks Ray for the node's address gets 127.0.0.1.
"""

WATCHDOG = """\
import os
import signal
import sys
import time
from pathlib import Path

sys.stdin.buffer.read()  # until the test process closes the pipe, or dies
sessions = {line.encode() for line in Path(sys.argv[1]).read_text().split()}
for _ in range(20):
    found = False
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[3] in sessions and fields[0] not in (b"Z", b"X"):
            found = True
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                pass
    if not found:
        break
    time.sleep(0.5)
"""
"""Run detached, reading a pipe from the test process, with the file listing the nodes' session
ids: once the pipe closes (at teardown, or when the test process dies without one), kill every
process still running in those sessions."""

PORT_FLAGS = (
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
)
HEAD_PORT_FLAGS = ("--port", "--ray-client-server-port", "--dashboard-port")
HEAD_PORT_ENV = ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT")
"""Ports Ray otherwise takes at fixed numbers (6379, 10001, 8265, 44217, 44227, 52365, ...), so
two clusters on one machine would collide. Workers' own ports are left to the OS (``0``)."""

SOCKET_PATH_MAX = 107
SOCKET_SUFFIX = len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")
NODE_DIR_LEN = len("/w99-2")
"""Ray puts unix sockets at ``<temp dir>/<session>/sockets/plasma_store`` and refuses a path
over 107 bytes, so a node's temp dir must be short (``--temp-dir`` must also be absolute)."""


def _read(path: Path) -> bytes:
    """A /proc file's bytes, or nothing when the process is gone or not ours to read."""
    try:
        return path.read_bytes()
    except OSError:
        return b""


def running(pid: int) -> bool:
    """Whether ``pid`` is a process that runs (a zombie is dead: it only waits to be reaped)."""
    stat = _read(Path(f"/proc/{pid}/stat"))
    return bool(stat) and stat.rsplit(b")", 1)[1].split()[0] not in {b"Z", b"X"}


def session_pids(sessions: set[int]) -> list[int]:
    """The running processes in any of ``sessions`` (session ids), in pid order."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _read(entry / "stat")
            fields = stat.rsplit(b")", 1)[1].split() if stat else []
            if fields and int(fields[3]) in sessions and fields[0] not in {b"Z", b"X"}:
                pids.append(int(entry.name))
    return sorted(pids)


def program(pid: int) -> str:
    """The file name of the program ``pid`` runs (``raylet``, ``gcs_server``, ``python3``)."""
    argv0 = _read(Path(f"/proc/{pid}/cmdline")).split(b"\0")[0].decode(errors="replace")
    return Path(argv0.split()[0]).name if argv0.strip() else ""


def kill_all(pids: list[int]) -> None:
    """SIGKILL each of ``pids`` that is still there."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_for(condition: Callable[[], bool], *, timeout: float, what: str) -> float:
    """Poll ``condition`` every 20 ms until it holds; return the seconds it took. Raise
    ``TimeoutError`` naming ``what`` after ``timeout`` seconds."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - started


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 now (the OS picks them; all are held
    until all are picked, so they differ)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((LOOPBACK, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def short_root(factory: pytest.TempPathFactory) -> tuple[Path, bool]:
    """A fresh folder for the nodes' temp dirs: pytest's ``ray<n>`` when Ray's socket paths fit
    there, else a new folder in the system's temp dir, or in /tmp. The flag says whether the
    folder is outside pytest's (the fixture then removes it at the end)."""
    budget = SOCKET_PATH_MAX - SOCKET_SUFFIX - NODE_DIR_LEN
    root = factory.mktemp("ray").resolve()
    if len(str(root)) <= budget:
        return root, False
    root.rmdir()
    for parent in (tempfile.gettempdir(), "/tmp"):
        root = Path(tempfile.mkdtemp(prefix="phx-ray-", dir=parent)).resolve()
        if len(str(root)) <= budget:
            return root, True
        root.rmdir()
    raise RuntimeError(f"no temp dir short enough for Ray's socket paths ({budget} chars)")


@dataclass
class Node:
    """One ``ray start`` of the cluster: its name, temp dir, ports, the session its processes
    are in (the pid of its ``ray start``) and, once registered, Ray's id for it."""

    name: str
    temp_dir: Path
    ports: dict[str, int]
    session: int = 0
    node_id: str = ""
    killed: bool = False


@dataclass
class RayCluster:
    """A head node and worker nodes on 127.0.0.1, each started with ``ray start``.

    ``address`` is the GCS address a driver passes to ``ray.init(address=...)``; ``root`` holds
    the nodes' temp dirs (Ray's logs) and each ``ray start``'s output; ``nodes`` are the head
    then the worker nodes in start order, the killed ones too; ``sessions`` are the session ids
    of every ``ray start`` so far; ``startup_seconds`` is how long the head and the first worker
    node took to start and register.
    """

    address: str
    root: Path
    env: dict[str, str]
    nodes: list[Node] = field(default_factory=list)
    sessions: set[int] = field(default_factory=set)
    startup_seconds: float = 0.0
    _gcs: Any = None  # ray._raylet.GcsClient, which has no type stubs

    @property
    def head_node_id(self) -> str:
        """The head node's id (Ray's hex node id)."""
        return self.nodes[0].node_id

    @property
    def worker_node_id(self) -> str:
        """The id of the newest worker node not killed ("" when there is none)."""
        node = self._live_worker()
        return node.node_id if node else ""

    def node_states(self) -> dict[str, bool]:
        """Node id -> alive, for every node the GCS knows (dead ones included)."""
        return {node_id: alive for node_id, (alive, _) in self._gcs_nodes().items()}

    def pids(self) -> list[int]:
        """The running processes of the whole cluster, every node's."""
        return session_pids(self.sessions)

    def worker_pids(self) -> list[int]:
        """The running processes of the newest live worker node: its raylet first, then the
        others (its log monitor, its agents, the workers running its tasks) in pid order."""
        node = self._live_worker()
        if node is None:
            return []
        pids = session_pids({node.session})
        return sorted(pids, key=lambda pid: (program(pid) != "raylet", pid))

    def worker_tasks(self) -> dict[int, str]:
        """The worker processes of the newest live worker node that run a task now: pid -> the
        remote function's name (Ray titles such a process ``ray::<name>``; its idle workers
        and its agents are left out). A test waits for this before it kills the node so that
        the kill takes work down."""
        agents = {"IDLE", "DashboardAgent", "RuntimeEnvAgent"}
        tasks = {}
        for pid in self.worker_pids():
            title = _read(Path(f"/proc/{pid}/cmdline")).split(b"\0")[0].decode(errors="replace")
            name = title.removeprefix("ray::").split()[0] if title.startswith("ray::") else ""
            if name and name not in agents:
                tasks[pid] = name
        return tasks

    def kill_worker_node(self, *, timeout: float = 30.0) -> float:
        """Kill the newest live worker node as a machine dies: SIGKILL its raylet, then every
        other process of the node (so none of its tasks runs on), and wait until the GCS
        reports the node dead. Return the seconds from the SIGKILL to that report; raise
        ``TimeoutError`` if it does not come within ``timeout`` seconds."""
        node = self._live_worker()
        if node is None:
            raise RuntimeError("no live worker node to kill")
        pids = self.worker_pids()
        if not pids or program(pids[0]) != "raylet":
            raise RuntimeError(f"worker node {node.name} has no raylet running: {pids}")
        started = time.monotonic()
        kill_all(pids)
        node.killed = True
        wait_for(
            lambda: not self.node_states().get(node.node_id, False),
            timeout=timeout,
            what=f"the GCS to report worker node {node.name} dead",
        )
        took = time.monotonic() - started
        self._kill_sessions({node.session}, timeout=STOP_TIMEOUT)
        return took

    def start_worker_node(
        self, *, num_cpus: int = WORKER_CPUS, resources: Mapping[str, float] | None = None
    ) -> str:
        """Start a worker node with ``num_cpus`` and ``resources`` (by default
        ``{"worker_node": 1}``); return its id once the GCS lists it alive."""
        extra = {WORKER_RESOURCE: 1} if resources is None else dict(resources)
        args = ["--address", self.address, "--num-cpus", str(num_cpus)]
        args += ["--resources", json.dumps(extra)]
        return self._start_node(f"w{len(self.nodes)}", args, PORT_FLAGS, {}).node_id

    def ensure_worker_node(self) -> str:
        """The live worker node's id, after starting one if every worker node was killed."""
        return self.worker_node_id or self.start_worker_node()

    def stop(self) -> None:
        """Shut down this process's driver, kill every process of the cluster and wait until
        none runs; raise ``RuntimeError`` naming any still running after that."""
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        self._gcs = None
        self._kill_sessions(self.sessions, timeout=STOP_TIMEOUT)

    def _kill_sessions(self, sessions: set[int], *, timeout: float) -> None:
        """SIGKILL the processes of ``sessions`` until none runs (a raylet may start a worker
        meanwhile); raise ``RuntimeError`` if some still run after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        left = session_pids(sessions)
        while left and time.monotonic() < deadline:
            kill_all(left)
            time.sleep(0.05)
            left = session_pids(sessions)
        if left:
            raise RuntimeError(f"Ray processes still running after SIGKILL: {left}")

    def _live_worker(self) -> Node | None:
        live = [node for node in self.nodes[1:] if not node.killed]
        return live[-1] if live else None

    def _gcs_nodes(self) -> dict[str, tuple[bool, Any]]:
        """Node id -> (alive, the GCS's node info: a ``GcsNodeInfo`` message) for every node
        the GCS knows."""
        if self._gcs is None:
            self._gcs = gcs_client(self.address)
        infos = self._gcs.get_all_node_info(timeout=10).values()
        return {info.node_id.hex(): (info.state == info.ALIVE, info) for info in infos}

    def _start_node(
        self, name: str, args: list[str], port_flags: tuple[str, ...], env: Mapping[str, str]
    ) -> Node:
        """``ray start`` node ``name`` with ``args``, what every node has, free ports for
        ``port_flags`` and ``env`` added to the cluster's; wait until the GCS lists it alive.
        A start that fails (a port taken meanwhile, say) is cleaned up and tried again with new
        ports, up to three times in all."""
        error = ""
        for attempt in range(3):
            suffix = f"-{attempt}" if attempt else ""
            temp_dir = self.root / f"{name}{suffix}"
            temp_dir.mkdir()
            ports = dict(zip(port_flags, free_ports(len(port_flags)), strict=True))
            node = Node(name=name, temp_dir=temp_dir, ports=ports)
            argv = [sys.executable, "-c", RAY_CLI, "start", *args]
            argv += ["--node-ip-address", LOOPBACK, "--temp-dir", str(temp_dir)]
            argv += ["--object-store-memory", str(OBJECT_STORE_BYTES), "--disable-usage-stats"]
            argv += ["--min-worker-port", "0", "--max-worker-port", "0"]  # any free port
            for flag, port in ports.items():
                argv += [flag, str(port)]
            log = self.root / f"{temp_dir.name}.log"
            with log.open("w") as out:
                start = subprocess.Popen(
                    argv,
                    env={**self.env, **env},
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # the node's own session; spared pytest's Ctrl-C
                )
            node.session = start.pid
            self.sessions.add(start.pid)
            with (self.root / "sessions").open("a") as sessions:
                sessions.write(f"{start.pid}\n")  # for the watchdog
            try:
                code: int | None = start.wait(timeout=START_TIMEOUT)
            except subprocess.TimeoutExpired:
                start.kill()
                code = start.wait()
            if code == 0:
                node.node_id = self._wait_registered(temp_dir)
                self.nodes.append(node)
                return node
            self._kill_sessions({node.session}, timeout=STOP_TIMEOUT)
            error = f"ray start for node {name} exited {code}: {log.read_text()[-3000:]}"
        raise RuntimeError(error)

    def _wait_registered(self, temp_dir: Path) -> str:
        """The id of the node whose temp dir is ``temp_dir``, once the GCS lists it alive; raise
        ``RuntimeError`` if it registered at another address than 127.0.0.1."""
        found: list[Any] = []

        def registered() -> bool:
            infos = self._gcs_nodes().values()
            found[:] = [info for alive, info in infos if alive and info.temp_dir == str(temp_dir)]
            return bool(found)

        wait_for(registered, timeout=START_TIMEOUT, what=f"the node in {temp_dir} to register")
        if found[0].node_manager_address != LOOPBACK:
            raise RuntimeError(f"a node registered at {found[0].node_manager_address}")
        return str(found[0].node_id.hex())


def gcs_client(address: str) -> Any:
    """A client of the GCS at ``address`` (Ray's own, which ``ray.cluster_utils`` uses too), to
    read the node table without a driver in this process."""
    from ray._raylet import GcsClient  # type: ignore[attr-defined]  # compiled; no stub for it

    return GcsClient(address=address)


def import_ray() -> ModuleType:
    """``ray``; without it, skip the test, or fail it in CI (``CI`` set)."""
    try:
        import ray
    except ImportError as error:
        reason = f"ray is not installed ({error}): {INSTALL_HINT}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return ray


def start_cluster(root: Path) -> RayCluster:
    """Start the head node and one worker node under ``root``; if that fails, kill what was
    started and raise."""
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    env.update(DRIVER_ENV)
    del env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"]  # RAY_CLI sets it once past Ray's refusal
    env.update(HEALTH_CHECK)
    head_ports = dict(zip(HEAD_PORT_FLAGS, free_ports(len(HEAD_PORT_FLAGS)), strict=True))
    metric_ports = dict(zip(HEAD_PORT_ENV, map(str, free_ports(len(HEAD_PORT_ENV))), strict=True))
    cluster = RayCluster(address=f"{LOOPBACK}:{head_ports['--port']}", root=root, env=env)
    started = time.monotonic()
    head_args = ["--head", "--num-cpus", str(HEAD_CPUS), "--include-dashboard", "false"]
    for flag, port in head_ports.items():
        head_args += [flag, str(port)]
    try:
        cluster._start_node("head", head_args, PORT_FLAGS, metric_ports).ports.update(head_ports)
        cluster.start_worker_node()
    except BaseException:
        cluster.stop()
        raise
    cluster.startup_seconds = time.monotonic() - started
    return cluster


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """A Ray cluster on 127.0.0.1 for the session, as the module's docstring says; skipped
    without Ray, failed in CI without it. A test that needs a worker node calls
    ``ensure_worker_node()``: an earlier test may have killed it."""
    import_ray()
    from ray._private import ray_constants

    if not Path("/proc/self/stat").exists():
        pytest.skip("the ray_cluster fixture finds its processes in /proc (Linux only)")
    root, outside = short_root(tmp_path_factory)
    (root / "sessions").touch()
    watchdog = subprocess.Popen(
        [sys.executable, "-c", WATCHDOG, str(root / "sessions")],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in DRIVER_ENV.items():
                patch.setenv(name, value)
            patch.delenv("RAY_ADDRESS", raising=False)
            patch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
            cluster = start_cluster(root)
            try:
                yield cluster
            finally:
                cluster.stop()
    finally:
        try:
            watchdog.communicate(timeout=STOP_TIMEOUT)  # closes its pipe: it checks and exits
        except subprocess.TimeoutExpired:
            watchdog.kill()
            watchdog.wait()
        if outside:
            shutil.rmtree(root, ignore_errors=True)
