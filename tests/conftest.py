"""Shared fixtures for the invariant, runner, scheduler and CLI tests.

``make_project`` writes a project (a pipeline file plus any other files) into a fresh folder and
returns a :class:`Project` that runs it in process (:meth:`Project.run`) or through the real
``phalanx`` command (:meth:`Project.cli`, :meth:`Project.start`). ``make_project.runner(...)``
writes the ``runner:`` setting of a ``command`` stage that runs ``tests/agents/agent.py`` with the
interpreter running the tests. ``Project.pids`` is a folder (outside the project) where those
agents record their pids; every process recorded there is killed when the test ends.

The test folders are not packages, so test modules reach these helpers through the fixtures and
import the classes only for type checking (``if TYPE_CHECKING: from tests.conftest import ...``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from phalanx import RunResult, run_pipeline

PYTHON = sys.executable
AGENT = Path(__file__).parent / "agents" / "agent.py"
PHALANX = Path(sys.executable).parent / "phalanx"
CHILD_MARK = "phalanx-test-child"


def agent_runner(*args: str, **settings: object) -> dict[str, object]:
    """The ``runner:`` setting of a command stage running ``tests/agents/agent.py`` with
    ``args``; ``settings`` adds runner fields (``kill_grace``, ``prompt``)."""
    return {"type": "command", "argv": [PYTHON, str(AGENT), *args], **settings}


def pipeline_text(config: Mapping[str, object]) -> str:
    """A pipeline file from a mapping (JSON is YAML: no quoting surprises)."""
    return json.dumps(config, indent=1, ensure_ascii=False)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie counts as dead: it runs nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in {"Z", "X"}


def wait_until(
    condition: Callable[[], bool], *, timeout: float = 20.0, what: str = "the condition"
) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


def read_pids(folder: Path) -> dict[str, list[int]]:
    """Key -> pids (the agent's, then its child's) from the files agents wrote in ``folder``."""
    return {
        path.stem: [int(n) for n in path.read_text().split()]
        for path in sorted(folder.glob("*.pid"))
    }


def survivors(pids: Iterable[int], *, timeout: float = 10.0) -> list[int]:
    """The pids still alive after waiting up to ``timeout`` seconds for all to die."""
    wanted = list(pids)
    deadline = time.monotonic() + timeout
    while (left := [pid for pid in wanted if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def _ours(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace")
    except OSError:
        return False
    return str(AGENT) in cmdline or CHILD_MARK in cmdline


def kill_recorded(folder: Path) -> None:
    """SIGKILL every still-running process recorded in ``folder`` and its process group,
    checking first (by its command line) that the pid is still one of the test agents."""
    for numbers in read_pids(folder).values() if folder.is_dir() else ():
        for pid in numbers:
            if alive(pid) and _ours(pid):
                for kill in (os.killpg, os.kill):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        kill(pid, signal.SIGKILL)


def tree(root: Path) -> set[str]:
    """Every path under ``root`` (relative, with ``/``); empty when ``root`` does not exist."""
    return {path.relative_to(root).as_posix() for path in root.rglob("*")}


@dataclass
class Project:
    """A project folder holding ``pipeline.yaml`` and its files."""

    root: Path
    pids: Path
    started: list[subprocess.Popen[str]] = field(default_factory=list)

    alive = staticmethod(alive)
    survivors = staticmethod(survivors)
    wait_until = staticmethod(wait_until)
    tree = staticmethod(tree)

    @property
    def pipeline(self) -> Path:
        return self.root / "pipeline.yaml"

    def write(self, name: str, text: str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    def run(self, **options: Any) -> RunResult:
        """``run_pipeline`` in this process (``options`` are its keyword arguments)."""
        return asyncio.run(run_pipeline(self.pipeline, **options))

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``phalanx ARGS...`` in the project folder and wait for it."""
        return subprocess.run(
            [str(PHALANX), *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=_cli_env(),
        )

    def start(self, *args: str) -> subprocess.Popen[str]:
        """Start ``phalanx ARGS...`` in the project folder, in its own session; the fixture
        kills it at the end of the test if it is still running."""
        process = subprocess.Popen(
            [str(PHALANX), *args],
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_cli_env(),
            start_new_session=True,
        )
        self.started.append(process)
        return process

    def kill_agents(self) -> None:
        """SIGKILL every recorded agent (and its process group) that still runs."""
        kill_recorded(self.pids)

    def recorded(self) -> dict[str, list[int]]:
        """Key -> pids (the agent's, then its child's) that agents wrote under :attr:`pids`."""
        return read_pids(self.pids)

    def notes(self) -> str:
        path = self.root / "wip" / "notes.md"
        return path.read_text(encoding="utf-8") if path.exists() else ""

    def entries(self, key: str) -> list[str]:
        """The journal entries in the notes whose heading names partition ``key``."""
        return [
            chunk
            for chunk in self.notes().split("\n## ")[1:]
            if f" · {key} · " in chunk.split("\n", 1)[0]
        ]

    def summary(self, stage: str) -> str:
        return (self.root / "wip" / "stages" / f"{stage}.md").read_text(encoding="utf-8")

    def dirs(self, under: str) -> list[str]:
        """The names of the folders directly under ``under`` (relative to the project)."""
        folder = self.root / under
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def staging_leftovers(self) -> list[str]:
        """Whatever is left inside ``.phalanx/staging/``."""
        return sorted(tree(self.root / ".phalanx" / "staging"))


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"COLUMNS": "200", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"})
    return env


def one_stage(
    runner: Mapping[str, object],
    keys: Iterable[str | Mapping[str, object]],
    *,
    expect: Iterable[str] = ("out.json", "notes.md"),
    **stage: object,
) -> dict[str, object]:
    """A pipeline with one map stage ``s`` over ``keys`` (ids, or whole rows) writing
    ``data/{PARTITION_KEY}/``, no retries unless ``stage`` says otherwise."""
    items = [dict(key) if isinstance(key, Mapping) else {"id": key} for key in keys]
    return {
        "name": "t",
        "stages": [
            {
                "name": "s",
                "partitions": {"items": items},
                "output": "data/{PARTITION_KEY}/",
                "expect": list(expect),
                "runner": runner,
                "retries": 0,
                **stage,
            }
        ],
    }


class ProjectFactory:
    """``make_project(pipeline_yaml, files)`` -> :class:`Project` in a fresh folder."""

    def __init__(self, base: Path, pids: Path) -> None:
        self.base = base
        self.pids = pids
        self.projects: list[Project] = []

    python = PYTHON
    agent = AGENT
    runner = staticmethod(agent_runner)
    dump = staticmethod(pipeline_text)
    one_stage = staticmethod(one_stage)

    def __call__(
        self,
        pipeline: str | Mapping[str, object] | None,
        files: Mapping[str, str] | None = None,
        *,
        name: str = "project",
    ) -> Project:
        """``pipeline`` is YAML text (dedented), a mapping written as JSON, or ``None`` for no
        pipeline file."""
        root = self.base / name
        root.mkdir(parents=True)
        project = Project(root, self.pids)
        for rel, text in (files or {}).items():
            project.write(rel, text)
        if isinstance(pipeline, str):
            project.write("pipeline.yaml", textwrap.dedent(pipeline))
        elif pipeline is not None:
            project.write("pipeline.yaml", pipeline_text(pipeline))
        self.projects.append(project)
        return project


@pytest.fixture
def pids(tmp_path: Path) -> Iterator[Path]:
    """A folder (outside any project) for agents' pid files; recorded processes are killed at
    the end of the test."""
    folder = tmp_path / "pids"
    folder.mkdir()
    try:
        yield folder
    finally:
        kill_recorded(folder)


@pytest.fixture
def make_project(tmp_path: Path, pids: Path) -> Iterator[ProjectFactory]:
    """Writes projects under ``tmp_path``; stops any ``phalanx`` they started and left running."""
    factory = ProjectFactory(tmp_path, pids)
    try:
        yield factory
    finally:
        for project in factory.projects:
            for process in project.started:
                if process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
        kill_recorded(pids)
