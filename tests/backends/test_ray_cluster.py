"""The ray backend on a real cluster started by the tests on 127.0.0.1 (a head node and a
worker node, separate ``ray start`` processes): a 500-partition pipeline commits every
partition exactly once in the orchestrator's data bus, also when the worker node is killed by
its PID in the middle of the run; the attempts it took down are recorded as ``worker-lost``
and run again on the node that is left."""

from __future__ import annotations

import json
import sqlite3
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.backends.conftest import RayCluster
    from tests.conftest import Project, ProjectFactory

PARTITIONS = 500

AGENTS = textwrap.dedent(
    """
    import json
    import os
    import time


    def work(ctx):
        import ray

        time.sleep(0.1)
        node = ray.get_runtime_context().get_node_id()
        (ctx.output_dir / "out.json").write_text(json.dumps({
            "key": ctx.key, "attempt": ctx.attempt, "node": node, "pid": os.getpid(),
        }))
    """
)


def _project(make_project: ProjectFactory, address: str) -> Project:
    pipeline: dict[str, Any] = {
        "name": "cluster",
        "backend": {"type": "ray", "address": address},
        "stages": [
            {
                "name": "s",
                "partitions": [{"id": f"p{i:03d}"} for i in range(PARTITIONS)],
                "output": "data/{PARTITION_KEY}/",
                "expect": ["out.json"],
                "runner": {"type": "python", "function": "agents:work"},
                "retries": 3,
                "backoff": {"base": 0.05, "max": 0.2},
                "timeout": 120,
            }
        ],
    }
    return make_project(pipeline, {"agents.py": AGENTS})


def _ledger(project: Project, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(project.root / ".phalanx" / "ledger.db", timeout=30) as conn:
        return conn.execute(sql).fetchall()


def _committed(project: Project) -> int:
    try:
        return int(
            _ledger(project, "SELECT count(*) FROM instances WHERE status = 'committed'")[0][0]
        )
    except sqlite3.OperationalError:  # not created yet
        return 0


def _exactly_once(project: Project) -> dict[str, dict[str, Any]]:
    """Every partition has one committed attempt in the ledger and one output folder, whose
    manifest names that attempt."""
    rows = _ledger(
        project,
        "SELECT key, count(*), max(attempt) FROM attempts WHERE outcome = 'committed' GROUP BY key",
    )
    assert len(rows) == PARTITIONS
    assert {count for _, count, _ in rows} == {1}
    folders = sorted(p.name for p in (project.root / "data").iterdir())
    assert folders == [f"p{i:03d}" for i in range(PARTITIONS)]
    outputs = {}
    for key, _, attempt in rows:
        folder = project.root / "data" / key
        manifest = json.loads((folder / ".phalanx-manifest.json").read_text())
        written = json.loads((folder / "out.json").read_text())
        assert manifest["attempt"] == attempt == written["attempt"]
        outputs[key] = written
    assert project.staging_leftovers() == []
    return outputs


def test_500_partitions_commit_exactly_once_through_a_killed_worker_node(
    make_project: ProjectFactory, ray_cluster: RayCluster
) -> None:
    ray_cluster.ensure_worker_node()  # an earlier test may have killed it
    project = _project(make_project, ray_cluster.address)
    running = project.start("run", "pipeline.yaml", "--quiet")
    project.wait_until(
        lambda: _committed(project) >= 50, timeout=180, what="50 partitions committed"
    )
    # Kill it while it runs attempts, so that the kill takes work down.
    project.wait_until(
        lambda: bool(ray_cluster.worker_tasks()), timeout=120, what="a task on the worker node"
    )
    assert running.poll() is None, "the run ended before the worker node could be killed"
    assert _committed(project) < PARTITIONS
    ray_cluster.kill_worker_node()
    ray_cluster.start_worker_node()  # the rest may run on a new node, as a cluster would heal
    out, err = running.communicate(timeout=600)
    assert running.returncode == 0, f"{out}\n{err}"

    outputs = _exactly_once(project)
    nodes = {written["node"] for written in outputs.values()}
    assert len(nodes) >= 2, "the partitions ran on more than one node"

    lost = _ledger(
        project,
        "SELECT key, attempt, message FROM attempts WHERE outcome = 'failed'",
    )
    assert lost, "the killed node took no attempt down"
    assert {cause for (cause,) in _ledger(
        project, "SELECT DISTINCT cause FROM attempts WHERE outcome = 'failed'"
    )} == {"worker-lost"}  # fmt: skip
    for key, attempt, _ in lost:
        committed = outputs[key]
        assert committed["attempt"] > attempt  # run again, and committed, after the loss
    notes = project.notes()
    assert "cause: worker-lost" in notes
    total = _ledger(project, "SELECT count(*) FROM attempts")[0][0]
    assert total == PARTITIONS + len(lost)  # Ray retried nothing behind phalanx's back


def test_a_command_agent_runs_on_the_cluster_and_its_logs_come_back(
    make_project: ProjectFactory, ray_cluster: RayCluster, tmp_path: Path
) -> None:
    """A ``command`` agent runs in a scratch folder on a worker; what it wrote and its log
    files are shipped back; a failing one's stderr is in the ledger and in its logs."""
    runner = make_project.runner("write", "bad=exit3")
    pipeline = make_project.one_stage(runner, ["a", "b", "bad"])
    pipeline["backend"] = {"type": "ray", "address": ray_cluster.address}
    project = make_project(pipeline)
    began = time.monotonic()
    done = project.cli("run", "pipeline.yaml", "--quiet", timeout=300)
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - began < 240
    for key in ("a", "b"):
        written = json.loads((project.root / "data" / key / "out.json").read_text())
        assert written["key"] == key
    assert not (project.root / "data" / "bad").exists()
    ((log_dir, detail),) = _ledger(
        project, "SELECT log_dir, detail FROM attempts WHERE key = 'bad'"
    )
    logs = project.root / log_dir
    assert (logs / "stderr.log").is_file()
    assert "stderr.log" in {p.name for p in logs.iterdir()}
    assert detail


def test_auto_finds_the_cluster_and_the_runtime_env_reaches_the_workers(
    make_project: ProjectFactory, ray_cluster: RayCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``address: auto`` connects to the cluster ``RAY_ADDRESS`` names; the pipeline's
    ``runtime_env`` is the workers' environment."""
    agents = textwrap.dedent(
        """
        import json, os


        def work(ctx):
            (ctx.output_dir / "out.json").write_text(json.dumps(
                {"mark": os.environ.get("PHALANX_MARK")}
            ))
        """
    )
    pipeline: dict[str, Any] = {
        "name": "env",
        "backend": {"type": "ray", "runtime_env": {"env_vars": {"PHALANX_MARK": "travelled"}}},
        "stages": [
            {
                "name": "s",
                "partitions": [{"id": "a"}, {"id": "b"}],
                "output": "data/{PARTITION_KEY}/",
                "expect": ["out.json"],
                "runner": {"type": "python", "function": "agents:work"},
            }
        ],
    }
    project = make_project(pipeline, {"agents.py": agents})
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.address)
    done = project.cli("run", "pipeline.yaml", "--quiet", timeout=300)
    assert done.returncode == 0, done.stderr
    for key in ("a", "b"):
        written = json.loads((project.root / "data" / key / "out.json").read_text())
        assert written == {"mark": "travelled"}


def test_a_timed_out_command_agent_on_the_cluster_is_stopped(
    make_project: ProjectFactory, ray_cluster: RayCluster
) -> None:
    """The attempt's task is interrupted, the runner stops the agent's process and its
    child: nothing it started outlives the timeout."""
    runner = make_project.runner("--pids", str(make_project.pids), "write", "slow=hang")
    pipeline = make_project.one_stage(runner, ["ok", "slow"], timeout=10)
    pipeline["backend"] = {"type": "ray", "address": ray_cluster.address}
    project = make_project(pipeline)
    done = project.cli("run", "pipeline.yaml", "--quiet", timeout=300)
    assert done.returncode == 1, done.stderr
    rows = _ledger(project, "SELECT key, cause FROM attempts ORDER BY key")
    assert rows == [("ok", None), ("slow", "timeout")]
    pids = project.recorded()["slow"]
    assert len(pids) == 2  # the agent and its child
    project.wait_until(
        lambda: not any(project.alive(pid) for pid in pids),
        timeout=15,
        what="the timed-out agent and its child gone",
    )


def _where_agents(make_project: ProjectFactory, backend: dict[str, Any], **stage: Any) -> Project:
    agents = textwrap.dedent(
        """
        import json


        def work(ctx):
            import ray

            (ctx.output_dir / "out.json").write_text(json.dumps({
                "node": ray.get_runtime_context().get_node_id(),
                "output_dir": str(ctx.output_dir),
            }))
        """
    )
    pipeline: dict[str, Any] = {
        "name": "where",
        "backend": backend,
        "stages": [
            {
                "name": "s",
                "partitions": [{"id": f"k{i}"} for i in range(6)],
                "output": "data/{PARTITION_KEY}/",
                "expect": ["out.json"],
                "runner": {"type": "python", "function": "agents:work"},
                **stage,
            }
        ],
    }
    return make_project(pipeline, {"agents.py": agents})


def test_custom_resources_decide_where_attempts_run(
    make_project: ProjectFactory, ray_cluster: RayCluster
) -> None:
    """A stage's ``resources.custom`` are Ray resources: a stage asking for the worker node's
    ``worker_node`` resource runs there only; its attempts work in a scratch folder there."""
    worker = ray_cluster.ensure_worker_node()
    backend = {"type": "ray", "address": ray_cluster.address}
    project = _where_agents(
        make_project, backend, resources={"num_cpus": 0.5, "custom": {"worker_node": 0.01}}
    )
    done = project.cli("run", "pipeline.yaml", "--quiet", timeout=300)
    assert done.returncode == 0, done.stderr
    for i in range(6):
        written = json.loads((project.root / "data" / f"k{i}" / "out.json").read_text())
        assert written["node"] == worker
        assert not written["output_dir"].startswith(str(project.root))  # a scratch folder


def test_shared_fs_writes_in_place(make_project: ProjectFactory, ray_cluster: RayCluster) -> None:
    """With ``shared_fs: true`` the agent writes straight into the orchestrator's staging
    folder (the same path on every node), and the commit is the usual rename."""
    backend = {"type": "ray", "address": ray_cluster.address, "shared_fs": True}
    project = _where_agents(make_project, backend)
    done = project.cli("run", "pipeline.yaml", "--quiet", timeout=300)
    assert done.returncode == 0, done.stderr
    for i in range(6):
        written = json.loads((project.root / "data" / f"k{i}" / "out.json").read_text())
        assert written["output_dir"].startswith(str(project.root / ".phalanx" / "staging"))
    assert project.staging_leftovers() == []
