"""The examples run as their READMEs say, on copies, and write what they claim to write."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from phalanx import Plan, RunResult, load_blueprint, load_pipeline, plan_pipeline, run_pipeline
from phalanx._databus import MANIFEST

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FAIL = "PHALANX_QUICKSTART_FAIL"


def copy_example(name: str, root: Path) -> Path:
    """Copy ``examples/<name>`` to ``root/examples/<name>`` without earlier outputs; returns it."""
    target = root / "examples" / name
    ignore = shutil.ignore_patterns("data", "wip", ".phalanx", "__pycache__")
    shutil.copytree(EXAMPLES / name, target, ignore=ignore)
    return target


def run(project: Path, **options: Any) -> RunResult:
    return asyncio.run(run_pipeline(project / "pipeline.yaml", **options))


def plan_of(project: Path) -> Plan:
    return plan_pipeline(load_pipeline(project / "pipeline.yaml"))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes, except phalanx's manifests (they name the
    run that committed them)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST
    }


def cli(
    project_root: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the ``phalanx`` console script installed next to this interpreter."""
    script = Path(sys.executable).with_name("phalanx")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "phalanx"]
    clean = {k: v for k, v in os.environ.items() if k != FAIL}
    return subprocess.run(
        [*command, *args],
        cwd=project_root,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


# --- quickstart ----------------------------------------------------------------------------------


def test_quickstart_surveys_modules_then_packages_then_overall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every module gets facts matching its source, every package exactly its modules in plan
    order with totals that add up, and the overview ranks every package; nothing fails."""
    monkeypatch.delenv(FAIL, raising=False)
    project = copy_example("quickstart", tmp_path)
    plan = plan_of(project)
    result = run(project)

    assert result.ok, result.to_json()
    modules, packages = plan.stage("modules"), plan.stage("packages")
    assert len(modules.instances) >= 150
    assert [(s.name, s.total, s.committed) for s in result.stages] == [
        ("modules", len(modules.instances), len(modules.instances)),
        ("packages", len(packages.instances), len(packages.instances)),
        ("overall", 1, 1),
    ]
    assert result.notes is None, result.notes.read_text() if result.notes else ""
    assert not (project / "wip" / "notes.md").exists()
    assert sorted(p.name for p in (project / "wip" / "stages").iterdir()) == [
        "modules.md",
        "overall.md",
        "packages.md",
    ]

    data = project / "data"
    facts = {
        inst.key: read_json(data / "modules" / inst.key / "facts.json")
        for inst in modules.instances
    }
    for inst in modules.instances:
        assert facts[inst.key]["module"] == inst.key
        assert facts[inst.key]["package"] == inst.values["PACKAGE"]
        assert facts[inst.key]["path"] == inst.values["path"]
        source = Path(str(inst.values["file"])).read_bytes()
        assert facts[inst.key]["lines"] == len(source.splitlines())
    decoder = facts["json.decoder"]
    assert {"JSONDecoder", "JSONDecodeError"} <= set(decoder["classes"])
    assert decoder["path"] == "json/decoder.py"
    assert decoder["docstring"] == "Implementation of JSONDecoder"
    assert "re" in decoder["imports"]
    assert facts["textwrap"]["package"] == "toplevel"
    assert "dedent" in facts["textwrap"]["functions"]
    summary = (data / "modules" / "json.decoder" / "summary.md").read_text(encoding="utf-8")
    assert "You are documenting one module of Python's standard library: `json.decoder`." in summary

    for group in packages.instances:
        members = [ref.key for ref in group.inputs]
        package = read_json(data / "packages" / group.key / "package.json")
        assert package["modules"] == members == sorted(members)
        assert {facts[m]["package"] for m in members} == {group.key}
        assert package["lines"] == sum(facts[m]["lines"] for m in members)
        assert package["classes"] == sum(len(facts[m]["classes"]) for m in members)
        assert package["missing"] == []
    assert len({ref.key for group in packages.instances for ref in group.inputs}) == len(facts)

    report = read_json(data / "overall" / "report.json")
    assert report["totals"]["modules"] == len(facts)
    assert report["totals"]["packages"] == len(packages.instances)
    assert report["totals"]["lines"] == sum(f["lines"] for f in facts.values())
    ranked = [item["lines"] for item in report["packages"]]
    assert ranked == sorted(ranked, reverse=True)
    text = (data / "overall" / "report.md").read_text(encoding="utf-8")
    for group in packages.instances:
        assert f"`{group.key}`" in text


def test_quickstart_outputs_do_not_depend_on_finishing_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs with different concurrency (so different finishing orders) write identical
    bytes: no timestamps, every list sorted or in plan order."""
    monkeypatch.delenv(FAIL, raising=False)
    first = copy_example("quickstart", tmp_path / "a")
    second = copy_example("quickstart", tmp_path / "b")
    assert run(first).ok
    assert run(second, concurrency=2).ok
    written = tree(first / "data")
    assert len(written) == len(tree(second / "data")) > 300
    assert written == tree(second / "data")


def test_quickstart_runs_from_the_cli_as_the_readme_says(tmp_path: Path) -> None:
    """`phalanx run examples/quickstart/pipeline.yaml` from the repository root exits 0 and
    writes the data tree the README describes."""
    project = copy_example("quickstart", tmp_path)
    done = cli(tmp_path, "run", "examples/quickstart/pipeline.yaml")
    assert done.returncode == 0, done.stderr
    expected = len(plan_of(project).stage("modules").instances)
    data = project / "data"
    assert len(list(data.glob("modules/*/facts.json"))) == expected
    assert len(list(data.glob("modules/*/summary.md"))) == expected
    assert (data / "packages" / "json" / "package.json").is_file()
    assert (data / "overall" / "report.md").is_file()
    assert not (project / "wip" / "notes.md").exists()
    assert "modules" in done.stdout
    assert "missed threshold" not in done.stdout


def test_quickstart_failing_partition_is_isolated_recorded_and_blocks_dependants(
    tmp_path: Path,
) -> None:
    """One module failing on every attempt: the others commit, the notes hold its three
    attempts, the stage summary marks it, and with the default min_success of 1.0 the
    modules stage misses its threshold: the packages stage (streaming fan-in) starts no
    group after that, never the failed module's own, and the overall stage is skipped, so
    the CLI exits 1."""
    project = copy_example("quickstart", tmp_path)
    done = cli(tmp_path, "run", "examples/quickstart/pipeline.yaml", env={FAIL: "json.decoder"})
    assert done.returncode == 1, done.stderr
    assert "json.decoder" in done.stdout

    notes = (project / "wip" / "notes.md").read_text(encoding="utf-8")
    assert notes.count("· modules · json.decoder · attempt") == 3
    assert "· modules · json.decoder · attempt 3/3" in notes
    assert "failing on purpose" in notes
    assert "action: gave up" in notes
    stages = project / "wip" / "stages"
    assert "| `json.decoder` | failed | runner-error | 3 |" in (stages / "modules.md").read_text(
        encoding="utf-8"
    )
    packages = (stages / "packages.md").read_text(encoding="utf-8")
    assert "| `json` | skipped | upstream failed | 0 | upstream stage 'modules' missed" in packages
    overall = (stages / "overall.md").read_text(encoding="utf-8")
    assert "The stage did not run: upstream stage 'packages'" in overall

    data = project / "data"
    expected = len(plan_of(project).stage("modules").instances)
    assert len(list(data.glob("modules/*/facts.json"))) == expected - 1
    assert not (data / "modules" / "json.decoder").exists()
    assert (data / "modules" / "json.encoder" / "facts.json").is_file()
    assert not (data / "packages" / "json").exists()
    assert not (data / "overall").exists()


def test_quickstart_groups_run_with_committed_members_below_full_success(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With min_success lowered, a group whose member failed validation runs with the members
    that committed and names the missing one; a flaky member recovers on its retry."""
    monkeypatch.setenv(FAIL, "json.decoder:invalid,email.utils:flaky")
    project = copy_example("quickstart", tmp_path)
    pipeline = project / "pipeline.yaml"
    text = pipeline.read_text(encoding="utf-8")
    lowered = text.replace("  - name: modules\n", "  - name: modules\n    min_success: 0.9\n", 1)
    assert lowered != text
    pipeline.write_text(lowered, encoding="utf-8")

    groups = {group.key: group for group in plan_of(project).stage("packages").instances}
    json_members = [ref.key for ref in groups["json"].inputs]
    assert "json.decoder" in json_members
    result = run(project)
    modules = result.stage("modules")
    assert (modules.failed, modules.skipped, modules.committed) == (1, 0, modules.total - 1)
    failed = next(inst for inst in modules.instances if inst.status == "failed")
    assert (failed.key, failed.cause) == ("json.decoder", "output-invalid")
    assert result.ok  # every stage met its (lowered) threshold

    data = project / "data"
    package = read_json(data / "packages" / "json" / "package.json")
    assert package["missing"] == ["modules/json.decoder"]
    assert package["modules"] == [key for key in json_members if key != "json.decoder"]
    assert "email.utils" in read_json(data / "packages" / "email" / "package.json")["modules"]
    notes = (project / "wip" / "notes.md").read_text(encoding="utf-8")
    assert "· modules · email.utils · attempt 1/3" in notes
    assert "· modules · email.utils · attempt 2/3" not in notes
    assert "'lines' is a required property" in notes
    assert read_json(data / "overall" / "report.json")["missing"] == []


# --- pomasa-tracker ------------------------------------------------------------------------------


def test_pomasa_tracker_blueprint_parses_as_pomasa() -> None:
    """The Chinese POMASA blueprint yields its parameters, output location, expected files and
    completion checklist, which the pipeline relies on."""
    blueprint = load_blueprint(EXAMPLES / "pomasa-tracker" / "agents" / "01.research_agent.md")
    assert blueprint.shape == "pomasa"
    assert list(blueprint.params) == ["ORGANIZATION_ID", "ORGANIZATION_NAME", "PERIOD"]
    assert blueprint.params["ORGANIZATION_ID"].description == "当前处理的组织ID"
    assert blueprint.output_location == "data/{PERIOD}/raw/{ORGANIZATION_ID}/"
    assert [out.name for out in blueprint.outputs] == ["activities.json", "sources.md"]
    assert len(blueprint.completion_criteria) == 4


def test_pomasa_tracker_runs_one_command_per_organisation(tmp_path: Path) -> None:
    """Every organisation gets activities.json and sources.md in the blueprint's output
    location; hostile names arrive byte for byte and run nothing; the agent received the
    reference-mode wording; the summary counts every organisation."""
    project = copy_example("pomasa-tracker", tmp_path)
    organizations = read_json(project / "references" / "organizations.json")["organizations"]
    result = run(project)

    assert result.ok, result.to_json()
    assert [(s.name, s.total, s.committed) for s in result.stages] == [
        ("research", len(organizations), len(organizations)),
        ("monthly_summary", 1, 1),
    ]
    assert not (project / "wip" / "notes.md").exists()
    raw = project / "data" / "2025-09" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(org["id"] for org in organizations)
    total = 0
    for org in organizations:
        assert sorted(p.name for p in (raw / org["id"]).iterdir() if p.name != MANIFEST) == [
            "activities.json",
            "sources.md",
        ]
        record = read_json(raw / org["id"] / "activities.json")
        assert record["organization_name"] == org["name"]
        assert all(item["title"].startswith(f"{org['name']}: ") for item in record["activities"])
        total += len(record["activities"])
        sources = (raw / org["id"] / "sources.md").read_text(encoding="utf-8")
        quoted = json.dumps(org["name"], ensure_ascii=False)
        assert (
            "Prompt received (first line): Read `agents/01.research_agent.md` and execute "
            "strictly according to that blueprint; parameters: "
            f'ORGANIZATION_ID="{org["id"]}", ORGANIZATION_NAME={quoted}, PERIOD="2025-09".'
        ) in sources
        assert "(组织动态研究Agent)" in sources
    assert {"$(touch pwned) Holdings", "O'Brien; rm -rf ~", "Curly {PERIOD} Partners"} <= {
        org["name"] for org in organizations
    }
    assert not list(tmp_path.rglob("pwned"))

    report = (project / "data" / "2025-09" / "summary" / "report.md").read_text(encoding="utf-8")
    assert f"{len(organizations)} 个组织，共 {total} 条活动。" in report
    assert "缺失" not in report
    for org in organizations:
        assert f"| `{org['id']}` |" in report
