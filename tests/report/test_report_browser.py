"""The report in a real browser (headless Chromium): the page it builds holds one timeline bar
per attempt, the ledger's numbers, the failures with working links to their logs; a picture of
it is not blank; a 10,000-instance report opens within a bounded time; hostile keys stay text."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from phalanx import write_report

if TYPE_CHECKING:
    from tests.conftest import ProjectFactory
    from tests.report.conftest import Browser, Element

KEYS = [f"k{i:02d}" for i in range(12)]
COMMITTED_RGB = (0x2E, 0x7D, 0x32)
FAILED_RGB = (0xC6, 0x28, 0x28)


def _field(section: Element, name: str) -> str:
    return section.one(data_field=name).all_text()


def _ledger(root: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(root / ".phalanx" / "ledger.db") as conn:
        return conn.execute(sql).fetchall()


def test_a_real_runs_report_matches_its_ledger(
    make_project: ProjectFactory, chromium: Browser
) -> None:
    runner = make_project.runner("write", "k03=exit3", "k07=badjson", "k09=exit3")
    project = make_project(make_project.one_stage(runner, KEYS, retries=1, concurrency=3))
    ran = project.cli("run", "pipeline.yaml", "--quiet")
    assert ran.returncode == 1, ran.stderr  # some instances failed
    made = project.cli("report", "-o", "reports/run.html")
    assert made.returncode == 0, made.stderr
    page = project.root / "reports" / "run.html"

    html = chromium.dom(page).html
    assert html.attrs.get("data-ready") == "1", html.attrs

    attempts = _ledger(project.root, "SELECT key, attempt, outcome FROM attempts")
    statuses = dict(_ledger(project.root, "SELECT status, count(*) FROM instances GROUP BY 1"))
    assert len(attempts) == 12 + 3  # the three failing keys ran twice

    # The timeline: one bar per attempt, the barrier marked.
    timeline = html.one("div", data_timeline="s")
    assert len(timeline.find_all("g", class_="point")) == len(attempts)
    assert "barrier" in timeline.all_text()
    legend = timeline.all_text()
    assert "committed (9)" in legend
    assert "retried (3)" in legend
    assert "failed (3)" in legend

    # The overview and the stage table say what the ledger says.
    overview = html.one("section", id="overview")
    assert _field(overview, "instances") == "12"
    assert _field(overview, "committed") == str(statuses["committed"]) == "9"
    assert _field(overview, "failed") == str(statuses["failed"]) == "3"
    assert _field(overview, "attempts") == str(len(attempts))
    row = html.one("section", id="stages").one("tr", data_stage="s")
    assert (_field(row, "committed"), _field(row, "failed"), _field(row, "attempts")) == (
        "9",
        "3",
        "15",
    )

    # Failures by cause, each attempt listed, its log files linked and there.
    failed_attempts = {(key, n) for key, n, outcome in attempts if outcome == "failed"}
    listed = html.one("section", id="failures").find_all("li", class_="failure")
    assert {(item.attrs["data-key"], int(item.attrs["data-attempt"])) for item in listed} == (
        failed_attempts
    )
    causes = {
        group.attrs["data-cause"]: int(_field(group, "attempts"))
        for group in html.one("section", id="failures").find_all("details", class_="cause")
    }
    assert causes == dict(
        _ledger(
            project.root, "SELECT cause, count(*) FROM attempts WHERE outcome = 'failed' GROUP BY 1"
        )
    )
    assert sum(causes.values()) == 6
    assert "output-invalid" in causes
    for item in listed:
        links = item.find_all("a")
        assert links, f"no log links for {item.attrs['data-key']}"
        for link in links:
            assert (page.parent / link.attrs["href"]).resolve().is_file(), link.attrs["href"]

    # The instance table: every instance (fewer than a page) with its status.
    rows = html.one("div", class_="instances").one("tbody").find_all("tr")
    assert len(rows) == 12
    assert sum("failed" in row.all_text() for row in rows) == 3


def test_a_screenshot_of_the_report_is_not_blank(
    make_project: ProjectFactory, chromium: Browser, tmp_path: Path
) -> None:
    runner = make_project.runner("write", "k02=exit3")
    project = make_project(make_project.one_stage(runner, KEYS, concurrency=4))
    project.cli("run", "pipeline.yaml", "--quiet")
    page = write_report(tmp_path / "r.html", project=project.root)
    picture = chromium.screenshot(page, tmp_path / "shot.png")
    with Image.open(picture) as image:
        rgb = image.convert("RGB")
        width, height = rgb.size
        raw = rgb.tobytes()
    pixels = list(zip(raw[0::3], raw[1::3], raw[2::3], strict=True))
    assert (width, height) == (1400, 2400)
    inked = sum(1 for r, g, b in pixels if min(r, g, b) < 235)
    assert inked / len(pixels) > 0.03, "the page is (nearly) blank"

    def near(colour: tuple[int, int, int]) -> int:
        return sum(
            1
            for pixel in pixels
            if all(abs(a - b) < 12 for a, b in zip(pixel, colour, strict=True))
        )

    assert near(COMMITTED_RGB) > 500, "no committed bars drawn"
    assert near(FAILED_RGB) > 50, "no failed bar (or failed count) drawn"


def test_a_10000_instance_report_opens_within_bounds(
    chromium: Browser,
    synthetic: Callable[..., list[dict[str, object]]],
    events_file: Callable[[list[dict[str, object]]], Path],
    tmp_path: Path,
) -> None:
    """Built from an event file of 10,000 instances (with retries, failures and backups):
    the browser finishes it within a generous bound, the timeline is a handful of paths, not
    one element per attempt, and the instance table holds one page."""
    events = events_file(synthetic(10_000))
    page = write_report(tmp_path / "big.html", events=events)
    dom = chromium.dom(page, budget_ms=60_000, timeout=300)
    html = dom.html
    assert html.attrs.get("data-ready") == "1", html.attrs
    assert dom.seconds < 120, f"the browser took {dom.seconds:.1f} s"
    assert int(html.attrs["data-render-ms"]) < 60_000
    overview = html.one("section", id="overview")
    assert _field(overview, "instances") == "10,001"
    timeline = html.one("div", data_timeline="items")
    assert timeline.attrs["data-mode"] == "compact"
    assert int(timeline.attrs["data-attempts"]) > 10_000
    assert len(list(timeline.walk())) < 2_000
    assert timeline.find_all("g", class_="point") == []
    rows = html.find_all("div", class_="instances")[0].one("tbody").find_all("tr")
    assert len(rows) == 50
    assert len(list(html.walk())) < 20_000


def test_hostile_keys_are_shown_as_text(
    chromium: Browser,
    synthetic: Callable[..., list[dict[str, object]]],
    events_file: Callable[[list[dict[str, object]]], Path],
    tmp_path: Path,
) -> None:
    hostile = ['</script><script>document.title="owned"</script>', "<img src=x onerror=1>"]
    page = write_report(tmp_path / "h.html", events=events_file(synthetic(2, keys=hostile)))
    html = chromium.dom(page).html
    assert html.attrs.get("data-ready") == "1"
    assert "owned" not in html.one("title").all_text()
    assert html.find_all("img") == []
    table = html.find_all("div", class_="instances")[0].all_text()
    assert hostile[0] in table
    assert hostile[1] in table


def test_retries_and_backups_are_marked_on_the_bars(
    chromium: Browser,
    synthetic: Callable[..., list[dict[str, object]]],
    events_file: Callable[[list[dict[str, object]]], Path],
    tmp_path: Path,
) -> None:
    """Below the compact size every attempt is its own bar: retried attempts in their own
    colour, speculative backups hatched, the superseded loser grey."""
    records = synthetic(600, concurrency=20)
    ends = [r for r in records if r["type"] == "attempt_ended" and r["stage"] == "items"]
    superseded = sum(1 for r in ends if r["cause"] == "superseded")
    retried = sum(1 for r in ends if r["cause"] == "rate-limited")
    assert superseded > 0  # the seed gives both
    assert retried > 0
    page = write_report(tmp_path / "b.html", events=events_file(records))
    html = chromium.dom(page).html
    timeline = html.one("div", data_timeline="items")
    assert timeline.attrs["data-mode"] == "bars"
    assert len(timeline.find_all("g", class_="point")) == len(ends)
    legend = timeline.all_text()
    assert f"superseded ({superseded})" in legend
    assert f"retried ({retried})" in legend
    # Plotly draws a hatched bar with an SVG pattern: one per backup, none for the others.
    assert len(timeline.find_all("pattern")) == superseded
