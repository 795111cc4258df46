"""Headless Chromium for the report's tests: the page as the browser built it, and a picture.

The browser is Debian's ``chromium`` (``.ci/run`` installs it), or the one PHALANX_CHROMIUM
names. Without one the browser tests are skipped, except in CI (``CI`` set), where they fail.
Every start gets a new empty profile and the switches that keep Chromium off the network
(no background networking, component updates, sync or QUIC): the page under test is a local
file that must need nothing else.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

SWITCHES = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


@dataclass
class Browser:
    """Runs the headless browser on a local page."""

    binary: str
    profiles: Path
    _count: int = 0

    def _run(self, page: Path, *args: str, timeout: float) -> tuple[str, float]:
        self._count += 1
        profile = self.profiles / f"profile-{self._count}"
        argv = [
            self.binary,
            *SWITCHES,
            f"--user-data-dir={profile}",
            *args,
            page.resolve().as_uri(),
        ]
        started = time.monotonic()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        took = time.monotonic() - started
        assert done.returncode == 0, f"chromium exited {done.returncode}: {done.stderr[-2000:]}"
        return done.stdout, took

    def dom(self, page: Path, *, budget_ms: int = 30_000, timeout: float = 180) -> Dom:
        """The page's DOM once its scripts have run (up to ``budget_ms`` of virtual time),
        and how long the browser took from start to exit."""
        text, took = self._run(
            page, f"--virtual-time-budget={budget_ms}", "--dump-dom", timeout=timeout
        )
        return Dom.parse(text, seconds=took)

    def screenshot(
        self, page: Path, out: Path, *, size: tuple[int, int] = (1400, 2400), timeout: float = 180
    ) -> Path:
        self._run(
            page,
            "--virtual-time-budget=30000",
            f"--window-size={size[0]},{size[1]}",
            f"--screenshot={out}",
            timeout=timeout,
        )
        assert out.is_file(), "chromium wrote no screenshot"
        return out


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    children: list[Element] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def walk(self) -> Iterator[Element]:
        yield self
        for child in self.children:
            yield from child.walk()

    def find_all(self, tag: str | None = None, **attrs: str) -> list[Element]:
        """Descendants (and self) with this tag and these attribute values; ``class_`` matches
        one class among several."""
        wanted_class = attrs.pop("class_", None)
        found = []
        for element in self.walk():
            if tag is not None and element.tag != tag:
                continue
            if wanted_class is not None and wanted_class not in element.classes:
                continue
            if all(
                element.attrs.get(name.replace("_", "-")) == value for name, value in attrs.items()
            ):
                found.append(element)
        return found

    def one(self, tag: str | None = None, **attrs: str) -> Element:
        found = self.find_all(tag, **attrs)
        assert len(found) == 1, f"expected one <{tag}> with {attrs}, found {len(found)}"
        return found[0]

    def all_text(self) -> str:
        return "".join(part for element in self.walk() for part in element.text).strip()


_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
         "track", "wbr"}  # fmt: skip


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {name: value or "" for name, value in attrs})
        self.stack[-1].children.append(element)
        if tag not in _VOID:
            self.stack.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Element(tag, {name: value or "" for name, value in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].text.append(data)


@dataclass
class Dom:
    root: Element
    seconds: float

    @classmethod
    def parse(cls, text: str, *, seconds: float) -> Dom:
        builder = _Builder()
        builder.feed(text)
        builder.close()
        return cls(builder.root, seconds)

    @property
    def html(self) -> Element:
        return self.root.one("html")


@pytest.fixture(scope="session")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Browser:
    """The headless browser; a missing one fails in CI and skips elsewhere."""
    given = os.environ.get("PHALANX_CHROMIUM")
    binary = given or shutil.which("chromium") or shutil.which("chromium-browser")
    if not binary or not Path(binary).is_file():
        reason = (
            f"PHALANX_CHROMIUM={given} is not a file"
            if given
            else "no chromium on the PATH: apt-get install chromium (.ci/run does), or set "
            "PHALANX_CHROMIUM"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return Browser(binary, tmp_path_factory.mktemp("chromium"))


def synthetic_records(
    instances: int,
    *,
    run: str = "20261124T000000Z-synthetic",
    concurrency: int = 100,
    seed: int = 7,
    keys: list[str] | None = None,
) -> list[dict[str, object]]:
    """The version-1 event records of a made-up run: one map stage of ``instances`` instances
    on ``concurrency`` slots (about 3% retried once, 1% failing for good, 0.5% with a
    speculative backup that wins), then a one-instance stage. Deterministic for a seed."""
    rng = random.Random(seed)  # noqa: S311 - made-up durations, not secrets
    names = keys or [f"item-{i:05d}" for i in range(instances)]
    t0 = 1_790_000_000.0
    out: list[dict[str, object]] = []

    def add(kind: str, t: float, **fields: object) -> None:
        out.append({"v": 1, "t": round(t, 6), "run": run, "type": kind, **fields})

    add("run_started", t0, pipeline="synthetic", stages=["items", "summary"],
        totals=[len(names), 1])  # fmt: skip
    add("stage_started", t0, stage="items", total=len(names), concurrency=concurrency,
        runner="openai", model="gpt-test")  # fmt: skip
    free = [t0] * concurrency
    counts = {"committed": 0, "failed": 0}
    usage = {"requests": 1, "input_tokens": 900, "output_tokens": 300, "cache_read_tokens": 0,
             "cache_write_tokens": 0, "cost_usd": 0.0015, "unpriced": 0}  # fmt: skip
    for key in names:
        roll = rng.random()
        plan = (
            "retry"
            if roll < 0.03
            else "fail"
            if roll < 0.04
            else "backup"
            if roll < 0.045
            else "ok"
        )
        slot = min(range(concurrency), key=free.__getitem__)
        start = free[slot]
        took = rng.uniform(0.5, 3.0)
        first = start
        attempts = 1
        if plan in ("retry", "fail"):
            add("attempt_started", start, stage="items", key=key, attempt=1)
            add("attempt_ended", start + took, stage="items", key=key, attempt=1,
                outcome="failed", duration_s=took, cause="rate-limited",
                message="429 from the provider", retry_in=0.5, usage=usage)  # fmt: skip
            start, attempts = start + took + 0.5, 2
            took = rng.uniform(0.5, 3.0)
        if plan == "backup":
            add("attempt_started", start, stage="items", key=key, attempt=1)
            add("attempt_started", start + took, stage="items", key=key, attempt=2)
            add("attempt_ended", start + 2 * took, stage="items", key=key, attempt=2,
                outcome="committed", duration_s=took, cause=None, message="", retry_in=None,
                usage=usage)  # fmt: skip
            add("attempt_ended", start + 2 * took, stage="items", key=key, attempt=1,
                outcome="failed", duration_s=2 * took, cause="superseded",
                message="a backup committed first", retry_in=None, usage=usage)  # fmt: skip
            end, attempts, status, cause = start + 2 * took, 2, "committed", None
        else:
            add("attempt_started", start, stage="items", key=key, attempt=attempts)
            end = start + took
            failed = plan == "fail"
            add("attempt_ended", end, stage="items", key=key, attempt=attempts,
                outcome="failed" if failed else "committed", duration_s=took,
                cause="output-invalid" if failed else None,
                message="out.json: 'title' is a required property" if failed else "",
                retry_in=None, usage=usage)  # fmt: skip
            status, cause = ("failed", "output-invalid") if failed else ("committed", None)
        free[slot] = end
        counts[status] += 1
        add("instance_ended", end, stage="items", key=key, status=status, cause=cause,
            reason=None, message="", attempts=attempts, duration_s=end - first,
            usage=usage)  # fmt: skip
    barrier = max(free)
    add("stage_ended", barrier, stage="items", total=len(names), committed=counts["committed"],
        cached=0, failed=counts["failed"], skipped=0, met_threshold=True, skipped_reason=None,
        wall_s=barrier - t0)  # fmt: skip
    add("stage_started", barrier, stage="summary", total=1, concurrency=1, runner="python",
        model="")  # fmt: skip
    add("attempt_started", barrier, stage="summary", key="all", attempt=1)
    add("attempt_ended", barrier + 1, stage="summary", key="all", attempt=1, outcome="committed",
        duration_s=1.0, cause=None, message="", retry_in=None, usage=None)  # fmt: skip
    add("instance_ended", barrier + 1, stage="summary", key="all", status="committed",
        cause=None, reason=None, message="", attempts=1, duration_s=1.0, usage=None)  # fmt: skip
    add("stage_ended", barrier + 1, stage="summary", total=1, committed=1, cached=0, failed=0,
        skipped=0, met_threshold=True, skipped_reason=None, wall_s=1.0)  # fmt: skip
    add("run_ended", barrier + 1, ok=True, cancelled=False)
    out.sort(key=lambda record: float(record["t"]))  # type: ignore[arg-type]
    return out


def write_events(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


@pytest.fixture
def synthetic() -> Callable[..., list[dict[str, object]]]:
    """:func:`synthetic_records`, for the tests (the test folders are not packages)."""
    return synthetic_records


@pytest.fixture
def events_file(tmp_path: Path) -> Callable[[list[dict[str, object]]], Path]:
    """Writes records as an event file (JSON Lines) in the test's folder."""

    def write(records: list[dict[str, object]]) -> Path:
        return write_events(tmp_path / "events.jsonl", records)

    return write
