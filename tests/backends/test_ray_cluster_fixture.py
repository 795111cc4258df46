"""The ``ray_cluster`` fixture itself: two nodes on 127.0.0.1 with three CPUs; a task pinned to
the worker node runs there; killing the worker node by its PID fails the task running there with
``NodeDiedError`` (``ray.get`` and ``await`` alike) within seconds, and a task after that runs on
the head; ``ray.cancel(force=True)`` kills the task's worker process; a driver in a subprocess
connects with nothing but the address."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.backends.conftest import RayCluster


@pytest.fixture
def ray(ray_cluster: RayCluster) -> Iterator[ModuleType]:
    """``ray``, connected to the cluster as a driver for the test, with a worker node up."""
    import ray

    ray_cluster.ensure_worker_node()
    ray.init(address=ray_cluster.address, log_to_driver=False)
    yield ray
    ray.shutdown()


def _sleeper(ray: ModuleType) -> Any:
    """A remote function, not retried, that writes its process's pid to the file it is given,
    then sleeps a minute. (Defined in here, Ray ships it by value: a worker could not import
    this module, which is not in a package.)"""

    def sleep(pid_file: str) -> int:
        Path(pid_file).write_text(str(os.getpid()))
        time.sleep(60)
        return os.getpid()

    return ray.remote(max_retries=0)(sleep)


def _started(pid_file: Path) -> int:
    """The pid the sleeper wrote to ``pid_file``, once it has."""
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, f"no task wrote {pid_file}"
        time.sleep(0.02)
    return int(pid_file.read_text())


def _node_of(ray: ModuleType, **options: Any) -> str:
    """The id of the node a task with ``options`` runs on."""

    def node_id() -> str:
        return str(ray.get_runtime_context().get_node_id())

    remote = ray.remote(max_retries=0)(node_id)
    return str(ray.get(remote.options(**options).remote(), timeout=60))


def test_the_cluster_has_two_live_nodes_and_three_cpus(
    ray: ModuleType, ray_cluster: RayCluster
) -> None:
    alive = [node for node in ray.nodes() if node["Alive"]]
    assert {node["NodeID"] for node in alive} == {
        ray_cluster.head_node_id,
        ray_cluster.worker_node_id,
    }
    assert {node["NodeManagerAddress"] for node in alive} == {"127.0.0.1"}
    assert ray.cluster_resources()["CPU"] == 3


def test_a_pinned_task_runs_on_the_worker_node_in_one_of_its_processes(
    ray: ModuleType, ray_cluster: RayCluster, tmp_path: Path
) -> None:
    assert _node_of(ray, resources={"worker_node": 0.01}) == ray_cluster.worker_node_id
    pid_file = tmp_path / "pid"
    ref = _sleeper(ray).options(resources={"worker_node": 0.01}).remote(str(pid_file))
    pid = _started(pid_file)
    assert pid in ray_cluster.worker_pids()
    assert ray_cluster.worker_tasks() == {pid: "sleep"}
    ray.cancel(ref, force=True)


def test_a_killed_worker_node_fails_its_tasks_with_node_died_error_and_the_head_runs_on(
    ray: ModuleType, ray_cluster: RayCluster, tmp_path: Path
) -> None:
    """One task awaited with ``ray.get`` in a thread, one with ``await`` in an event loop: the
    node's death reaches both as ``NodeDiedError`` within seconds of the SIGKILL."""
    from ray.exceptions import NodeDiedError

    sleeper = _sleeper(ray).options(resources={"worker_node": 0.01})
    refs = [sleeper.remote(str(tmp_path / f"pid{i}")) for i in range(2)]
    pids = [_started(tmp_path / f"pid{i}") for i in range(2)]
    raised: dict[str, tuple[BaseException, float]] = {}
    killed_at = [0.0]

    def get() -> None:
        try:
            ray.get(refs[0], timeout=60)
        except BaseException as error:  # recorded, asserted below
            raised["get"] = (error, time.monotonic() - killed_at[0])

    async def wait() -> None:
        try:
            await asyncio.wait_for(refs[1], 60)
        except BaseException as error:  # recorded, asserted below
            raised["await"] = (error, time.monotonic() - killed_at[0])

    assert set(pids) <= set(ray_cluster.worker_pids())
    waiters = [threading.Thread(target=get), threading.Thread(target=asyncio.run, args=(wait(),))]
    for waiter in waiters:
        waiter.start()
    killed_at[0] = time.monotonic()
    to_dead = ray_cluster.kill_worker_node()
    for waiter in waiters:
        waiter.join(timeout=60)

    assert to_dead < 10
    assert {way: type(error) for way, (error, _) in raised.items()} == {
        "get": NodeDiedError,
        "await": NodeDiedError,
    }
    assert max(took for _, took in raised.values()) < 15
    assert not set(pids) & set(ray_cluster.pids())
    assert _node_of(ray) == ray_cluster.head_node_id


def test_force_cancel_raises_task_cancelled_error_and_kills_the_worker_process(
    ray: ModuleType, ray_cluster: RayCluster, tmp_path: Path
) -> None:
    from ray.exceptions import TaskCancelledError

    sleeper = _sleeper(ray)
    raised: dict[str, type[BaseException]] = {}
    for way in ("get", "await"):
        pid_file = tmp_path / f"pid-{way}"
        ref = sleeper.remote(str(pid_file))
        pid = _started(pid_file)
        ray.cancel(ref, force=True)
        try:
            if way == "get":
                ray.get(ref, timeout=30)
            else:
                asyncio.run(asyncio.wait_for(ref, 30))
        except BaseException as error:  # recorded, asserted below
            raised[way] = type(error)
        deadline = time.monotonic() + 10
        while pid in ray_cluster.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pid not in ray_cluster.pids()
    assert raised == {"get": TaskCancelledError, "await": TaskCancelledError}


def test_a_driver_in_a_subprocess_connects_with_the_address(ray_cluster: RayCluster) -> None:
    """What ``phalanx run`` does: a new process, the test process's environment."""
    ray_cluster.ensure_worker_node()
    script = (
        "import ray\n"
        f"ray.init(address={ray_cluster.address!r}, log_to_driver=False)\n"
        "print(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']))\n"
        "print(ray.get_runtime_context().get_node_id())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["['127.0.0.1', '127.0.0.1']", ray_cluster.head_node_id]
