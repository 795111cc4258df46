"""Incremental re-runs: an instance runs again only when what decides its output changed (its
row, its blueprint, its upstream outputs) or its committed output was damaged; everything else
is ``cached``. ``--force``, ``--force-stage`` and ``--rerun-failed`` do what they say."""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any

from phalanx._ledger import open_ledger

if TYPE_CHECKING:
    from tests.conftest import Project, ProjectFactory

ROWS = [{"id": f"i{n}", "group": f"g{n % 3}", "value": n} for n in range(9)]

AGENTS = """\
import json


def _log(ctx):
    with open(ctx.project_dir / "executions.log", "a", encoding="utf-8") as log:
        log.write(f"{ctx.stage} {ctx.key}\\n")


def item(ctx):
    _log(ctx)
    if ctx.key in (ctx.project_dir / "fail.txt").read_text().split(","):
        raise RuntimeError(f"{ctx.key} fails on purpose")
    first = ctx.prompt.splitlines()[0]
    data = {"key": ctx.key, "value": int(ctx.params["VALUE"]), "prompt": first}
    (ctx.output_dir / "item.json").write_text(json.dumps(data))


def group(ctx):
    _log(ctx)
    values = [
        json.loads((ref.path / "item.json").read_text())["value"] for ref in ctx.inputs
    ]
    (ctx.output_dir / "group.json").write_text(json.dumps({"sum": sum(values)}))


def overall(ctx):
    _log(ctx)
    sums = [json.loads((ref.path / "group.json").read_text())["sum"] for ref in ctx.inputs]
    (ctx.output_dir / "overall.json").write_text(json.dumps({"total": sum(sums)}))
"""

BLUEPRINT = """\
---
name: item
description: Describe one item.
---
Describe item {ITEM_ID} (value {VALUE}).
"""

PIPELINE: dict[str, Any] = {
    "name": "incremental",
    "defaults": {"retries": 0},
    "stages": [
        {
            "name": "items",
            "blueprint": "item.md",
            "partitions": {"from": "rows.json", "key": "id"},
            "params": {"ITEM_ID": "{id}", "VALUE": "{value}", "GROUP": "{group}"},
            "runner": {"type": "python", "function": "agents:item"},
            "output": "data/items/{ITEM_ID}/",
            "expect": ["item.json"],
        },
        {
            "name": "groups",
            "needs": ["items"],
            "group_by": "GROUP",
            "runner": {"type": "python", "function": "agents:group"},
            "output": "data/groups/{GROUP}/",
            "expect": ["group.json"],
        },
        {
            "name": "overall",
            "needs": ["groups"],
            "single": True,
            "runner": {"type": "python", "function": "agents:overall"},
            "output": "data/overall/",
            "expect": ["overall.json"],
        },
    ],
}


def _project(make_project: ProjectFactory) -> Project:
    return make_project(
        PIPELINE,
        {"agents.py": AGENTS, "item.md": BLUEPRINT, "rows.json": json.dumps(ROWS)},
    )


def _run(project: Project, *args: str, fail: str = "") -> tuple[dict[str, Any], Counter[str]]:
    """``phalanx run --json ARGS`` with the items in ``fail`` (comma-separated) failing;
    returns its summary and what executed (``stage key`` lines)."""
    log = project.root / "executions.log"
    log.unlink(missing_ok=True)
    project.write("fail.txt", fail)
    done = project.cli("run", "pipeline.yaml", "--quiet", "--json", *args)
    assert done.returncode in (0, 1), done.stderr
    executed = Counter(log.read_text().splitlines()) if log.exists() else Counter()
    return json.loads(done.stdout), executed


def _counts(summary: dict[str, Any]) -> dict[str, tuple[int, int, int, int]]:
    return {
        stage["name"]: (stage["committed"], stage["cached"], stage["failed"], stage["skipped"])
        for stage in summary["stages"]
    }


def test_second_run_with_nothing_changed_runs_nothing(make_project: ProjectFactory) -> None:
    """Run twice with nothing changed: the first commits 9 + 3 + 1 instances, the second runs
    none of them and reports every one as cached (``committed`` counts only this run's)."""
    project = _project(make_project)
    first, ran = _run(project)
    assert _counts(first) == {
        "items": (9, 0, 0, 0),
        "groups": (3, 0, 0, 0),
        "overall": (1, 0, 0, 0),
    }
    assert sum(ran.values()) == 13

    second, ran = _run(project)

    assert ran == Counter()
    assert _counts(second) == {
        "items": (0, 9, 0, 0),
        "groups": (0, 3, 0, 0),
        "overall": (0, 1, 0, 0),
    }
    assert second["ok"] is True


def test_changing_one_row_reruns_that_instance_and_its_downstream_only(
    make_project: ProjectFactory,
) -> None:
    """Editing one partition's row re-runs exactly that instance, the group it belongs to and
    the single stage; the other 8 items and 2 groups are cached."""
    project = _project(make_project)
    _run(project)
    rows = [dict(row) for row in ROWS]
    rows[4]["value"] = 40  # i4, in group g1
    project.write("rows.json", json.dumps(rows))

    summary, ran = _run(project)

    assert ran == Counter({"items i4": 1, "groups g1": 1, "overall overall": 1})
    assert _counts(summary) == {
        "items": (1, 8, 0, 0),
        "groups": (1, 2, 0, 0),
        "overall": (1, 0, 0, 0),
    }
    total = json.loads((project.root / "data/overall/overall.json").read_text())["total"]
    assert total == sum(int(str(row["value"])) for row in rows)


def test_changing_the_blueprint_reruns_all_of_its_instances(make_project: ProjectFactory) -> None:
    """Editing the items' blueprint re-runs all 9 items (their prompt changed); their outputs
    changed, so the 3 groups run again; the groups wrote what they wrote before (sums of the
    same values), so the single stage reading them stays cached."""
    project = _project(make_project)
    _run(project)
    project.write("item.md", BLUEPRINT.replace("Describe item", "Summarise item"))

    summary, ran = _run(project)

    assert Counter(line.split()[0] for line in ran.elements()) == {"items": 9, "groups": 3}
    assert _counts(summary) == {
        "items": (9, 0, 0, 0),
        "groups": (3, 0, 0, 0),
        "overall": (0, 1, 0, 0),
    }
    item = json.loads((project.root / "data/items/i0/item.json").read_text())
    assert item["prompt"].startswith("Summarise item")


def test_force_and_force_stage(make_project: ProjectFactory) -> None:
    """``--force`` runs everything again; ``--force-stage groups`` runs the groups again and,
    their outputs being unchanged, leaves the single stage cached."""
    project = _project(make_project)
    _run(project)

    summary, ran = _run(project, "--force")
    assert sum(ran.values()) == 13
    assert _counts(summary)["items"] == (9, 0, 0, 0)

    summary, ran = _run(project, "--force-stage", "groups")
    assert ran == Counter({"groups g0": 1, "groups g1": 1, "groups g2": 1})
    assert _counts(summary) == {
        "items": (0, 9, 0, 0),
        "groups": (3, 0, 0, 0),
        "overall": (0, 1, 0, 0),
    }

    bad = project.cli("run", "pipeline.yaml", "--force-stage", "nope")
    assert bad.returncode == 2
    assert "--force-stage 'nope': no such stage" in bad.stderr


def test_failed_instances_are_retried_only_when_asked(make_project: ProjectFactory) -> None:
    """An instance that failed is not retried by the next run while nothing about it changed
    (it is reported failed again, with the run it failed in and the flag that retries it);
    ``--rerun-failed`` retries it, and then it commits."""
    project = _project(make_project)
    first, ran = _run(project, fail="i2")
    assert _counts(first)["items"] == (8, 0, 1, 0)

    second, ran = _run(project)
    assert "items i2" not in ran
    assert _counts(second)["items"] == (0, 8, 1, 0)
    (failure,) = second["stages"][0]["failures"]
    assert failure["key"] == "i2"
    assert f"failed in run {first['run_id']}" in failure["message"]
    assert "--rerun-failed" in failure["message"]

    third, ran = _run(project, "--rerun-failed")
    assert ran["items i2"] == 1
    assert _counts(third)["items"] == (1, 8, 0, 0)
    assert third["ok"] is True


def test_damaged_output_is_detected_and_run_again(make_project: ProjectFactory) -> None:
    """A committed file edited after the commit, or removed, is detected from the manifest:
    that instance runs again and the notes say why; an untouched neighbour stays cached."""
    project = _project(make_project)
    _run(project)
    (project.root / "data/items/i1/item.json").write_text('{"key": "i1", "value": 99}')
    (project.root / "data/items/i7/item.json").unlink()

    summary, ran = _run(project)

    assert {"items i1", "items i7"} <= set(ran)
    assert _counts(summary)["items"] == (2, 7, 0, 0)
    notes = project.notes()
    assert "item.json was changed after the commit" in notes
    assert "item.json was removed after the commit" in notes
    assert json.loads((project.root / "data/items/i1/item.json").read_text())["value"] == 1


def test_ledger_records_cached_and_committed_instances(make_project: ProjectFactory) -> None:
    """The ledger holds both runs: the first with 13 committed instances, the second with 13
    cached ones, and ``phalanx runs`` lists them newest first."""
    project = _project(make_project)
    first, _ = _run(project)
    second, _ = _run(project)

    ledger = open_ledger(project.root / ".phalanx")
    try:
        counts_first = ledger.counts(first["run_id"])
        counts_second = ledger.counts(second["run_id"])
        runs = [row.id for row in ledger.runs()]
    finally:
        ledger.close()
    assert counts_first["items"] == {"committed": 9}
    assert counts_second["items"] == {"cached": 9}
    assert runs == [second["run_id"], first["run_id"]]
    listing = project.cli("runs")
    assert listing.returncode == 0
    assert listing.stdout.index(second["run_id"]) < listing.stdout.index(first["run_id"])
