"""Choosing a backend: names are checked before anything runs, a missing Ray or an address
with nobody behind it is a clear usage error, a stage cannot send an API runner to a cluster,
and Ctrl-C under the process backend stops the workers and leaves the data bus consistent."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from phalanx import UsageError, load_pipeline, plan_pipeline, run_pipeline
from phalanx._errors import BackendUnavailable, UnknownPluginError
from phalanx._scheduler import check_runners
from phalanx.backends import backend_names

if TYPE_CHECKING:
    from tests.conftest import ProjectFactory

AGENTS = textwrap.dedent(
    """
    import os
    import time
    from pathlib import Path


    def work(ctx):
        if ctx.params.get("mode") == "sleepy":
            Path(ctx.params["pids"], ctx.key).write_text(str(os.getpid()))
            time.sleep(60)
        (ctx.output_dir / "out.json").write_text("{}")
    """
)


def _pipeline(backend: Any, items: list[dict[str, Any]], **stage: Any) -> dict[str, Any]:
    return {
        "name": "setup",
        "backend": backend,
        "stages": [
            {
                "name": "s",
                "partitions": items,
                "output": "data/{PARTITION_KEY}/",
                "expect": ["out.json"],
                "runner": {"type": "python", "function": "agents:work"},
                "retries": 0,
                **stage,
            }
        ],
    }


def test_the_builtin_backends_are_registered() -> None:
    assert {"local", "process", "ray"} <= set(backend_names())


def test_an_unknown_backend_is_named_before_anything_runs(make_project: ProjectFactory) -> None:
    project = make_project(_pipeline("cluster", [{"id": "a"}]), {"agents.py": AGENTS})
    with pytest.raises(UnknownPluginError, match=r"backend.*no backend 'cluster'.*local, process"):
        check_runners(plan_pipeline(load_pipeline(project.pipeline)))
    done = project.cli("run", "pipeline.yaml")
    assert done.returncode == 2
    assert "no backend 'cluster'" in done.stderr
    assert not (project.root / "data").exists()
    overridden = project.cli("run", "pipeline.yaml", "--backend", "nope")
    assert overridden.returncode == 2
    assert "no backend 'nope'" in overridden.stderr


def test_a_stage_cannot_send_an_api_runner_to_a_cluster(make_project: ProjectFactory) -> None:
    config = _pipeline("local", [{"id": "a"}])
    config["stages"][0]["backend"] = "ray"
    config["stages"][0]["runner"] = {
        "type": "openai",
        "model": "m",
        "base_url": "http://127.0.0.1:9/v1",
    }
    config["stages"][0]["prompt"] = "reference"
    project = make_project(config, {"agents.py": AGENTS})
    with pytest.raises(
        UsageError, match=r"\(s\)\.backend: the ray backend does not execute openai"
    ):
        check_runners(plan_pipeline(load_pipeline(project.pipeline)))


def test_without_ray_the_error_says_how_to_install_it(
    make_project: ProjectFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = make_project(_pipeline({"type": "ray"}, [{"id": "a"}]), {"agents.py": AGENTS})
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(BackendUnavailable, match=r"pip install 'phalanx\[ray\]'"):
        asyncio.run(run_pipeline(project.pipeline))
    assert not (project.root / "data").exists()
    assert not (project.root / ".phalanx" / "ledger.db").exists()  # nothing was recorded


def test_an_unreachable_cluster_is_a_clear_error(make_project: ProjectFactory) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = {"type": "ray", "address": f"127.0.0.1:{port}", "connect_timeout": 5}
    project = make_project(_pipeline(backend, [{"id": "a"}]), {"agents.py": AGENTS})
    done = project.cli("run", "pipeline.yaml", timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"nothing answers at '127.0.0.1:{port}'" in done.stderr
    assert "ray start --head" in done.stderr
    assert not (project.root / "data").exists()


def test_ctrl_c_under_the_process_backend_stops_the_workers(
    make_project: ProjectFactory, tmp_path: Path
) -> None:
    pids = tmp_path / "worker-pids"
    pids.mkdir()
    items = [{"id": "done"}] + [
        {"id": f"slow{i}", "mode": "sleepy", "pids": str(pids)} for i in range(2)
    ]
    project = make_project(
        _pipeline({"type": "process", "workers": 2}, items, concurrency=3),
        {"agents.py": AGENTS},
    )
    running = project.start("run", "pipeline.yaml", "--quiet")
    project.wait_until(lambda: len(list(pids.iterdir())) == 2, what="both slow agents running")
    workers = [int(path.read_text()) for path in pids.iterdir()]
    running.send_signal(signal.SIGINT)
    _, err = running.communicate(timeout=60)
    assert running.returncode == 130, err
    project.wait_until(
        lambda: not any(project.alive(pid) for pid in workers), what="the workers gone"
    )
    assert project.staging_leftovers() == []
    assert (project.root / "data" / "done" / "out.json").exists()
    assert not (project.root / "data" / "slow0").exists()
