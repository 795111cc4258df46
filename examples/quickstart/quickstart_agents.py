"""The quickstart's agents: offline stand-ins for an LLM that follow the blueprints in
``agents/``, with ``ast`` doing the reading. ``ctx.prompt`` holds the rendered blueprint; each
summary quotes its first line to show the prompt arrived.

Make partitions misbehave with ``PHALANX_QUICKSTART_FAIL``, a comma-separated list of
``module[:mode]``: ``error`` (the default) raises on every attempt, ``flaky`` only on the first,
``invalid`` writes a ``facts.json`` its schema rejects.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from phalanx import InstanceContext

FAIL_VARIABLE = "PHALANX_QUICKSTART_FAIL"
_FUNCTIONS = ast.FunctionDef | ast.AsyncFunctionDef
_TOTALS = ("lines", "functions", "classes")

# phalanx runs each call of a plain (sync) function in a thread of its own. CPython 3.11's AST
# constructor keeps its recursion counter per interpreter, not per thread, so two threads parsing
# at once can fail with "SystemError: AST constructor recursion depth mismatch"
# (python/cpython#106905); parsing under one lock sidesteps it. Agents that call code which is
# not thread-safe need the same care, or an ``async def`` entry point.
_PARSE_LOCK = threading.Lock()


def describe_module(ctx: InstanceContext) -> None:
    """Blueprint ``describe_module``: parse one module and write facts.json and summary.md."""
    module = str(ctx.params["MODULE"])
    mode = _failure_mode(module)
    if mode == "error" or (mode == "flaky" and ctx.attempt == 1):
        raise RuntimeError(f"{module}: failing on purpose ({FAIL_VARIABLE}={mode})")
    source = Path(str(ctx.params["MODULE_FILE"])).read_bytes()
    with _PARSE_LOCK:
        tree = ast.parse(source, filename=str(ctx.params["MODULE_PATH"]))
    facts: dict[str, Any] = {
        "module": module,
        "package": str(ctx.params["PACKAGE"]),
        "path": str(ctx.params["MODULE_PATH"]),
        "lines": len(source.splitlines()),
        "functions": sorted({n.name for n in tree.body if isinstance(n, _FUNCTIONS)}),
        "classes": sorted({n.name for n in tree.body if isinstance(n, ast.ClassDef)}),
        "public": _public(tree),
        "docstring": next(iter((ast.get_docstring(tree) or "").strip().splitlines()), ""),
        "imports": _imports(tree, module, is_package=_is_package(ctx)),
    }
    if mode == "invalid":
        del facts["lines"]
    _write_json(ctx.output_dir / "facts.json", facts)
    quote = f"> {facts['docstring']}\n\n" if facts["docstring"] else ""
    imports = ", ".join(f"`{name}`" for name in facts["imports"]) or "nothing"
    (ctx.output_dir / "summary.md").write_text(
        f"# `{module}`\n\n{quote}"
        f"Part of `{facts['package']}` (`{facts['path']}`): {facts.get('lines', '?')} lines, "
        f"{len(facts['classes'])} classes, {len(facts['functions'])} functions, "
        f"{len(facts['public'])} public names. Imports {imports}.\n"
        f"{_signature(ctx)}",
        encoding="utf-8",
    )


def summarize_package(ctx: InstanceContext) -> None:
    """Blueprint ``summarize_package``: totals over the facts of the package's modules."""
    package = str(ctx.params["PACKAGE"])
    members = [_read_json(ref.path / "facts.json") for ref in ctx.inputs]
    top_n = int(str(ctx.params["TOP_N"]))
    own = {str(facts["module"]).split(".")[0] for facts in members}
    largest = sorted(members, key=lambda facts: (-int(facts["lines"]), facts["module"]))[:top_n]
    summary: dict[str, Any] = {
        "package": package,
        "modules": [facts["module"] for facts in members],
        "lines": sum(int(facts["lines"]) for facts in members),
        "functions": sum(len(facts["functions"]) for facts in members),
        "classes": sum(len(facts["classes"]) for facts in members),
        "public": sum(len(facts["public"]) for facts in members),
        "largest": [{"module": facts["module"], "lines": facts["lines"]} for facts in largest],
        "imports": sorted(
            {name.split(".")[0] for facts in members for name in facts["imports"]} - own
        ),
        "missing": sorted(ctx.missing),
    }
    _write_json(ctx.output_dir / "package.json", summary)
    lines = [
        f"# Package `{package}`",
        "",
        f"{len(members)} modules, {summary['lines']} lines, {summary['classes']} classes, "
        f"{summary['functions']} functions, {summary['public']} public names.",
        "",
        "Largest modules: "
        + ", ".join(f"`{item['module']}` ({item['lines']} lines)" for item in summary["largest"])
        + ".",
        "",
        "Imports from outside: " + (", ".join(summary["imports"]) or "nothing") + ".",
    ]
    if ctx.missing:
        lines += ["", f"Missing (not committed upstream): {', '.join(sorted(ctx.missing))}."]
    (ctx.output_dir / "summary.md").write_text(
        "\n".join(lines) + "\n" + _signature(ctx), encoding="utf-8"
    )


def stdlib_overview(ctx: InstanceContext) -> None:
    """Blueprint ``stdlib_overview``: rank the packages and total everything."""
    packages = [_read_json(ref.path / "package.json") for ref in ctx.inputs]
    ranked = sorted(packages, key=lambda item: (-int(item["lines"]), item["package"]))
    importers = Counter(name for item in packages for name in item["imports"])
    top_n = int(str(ctx.params["TOP_N"]))
    report: dict[str, Any] = {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "totals": {
            "packages": len(packages),
            "modules": sum(len(item["modules"]) for item in packages),
            **{name: sum(item[name] for item in packages) for name in _TOTALS},
        },
        "packages": [
            {
                "package": item["package"],
                "modules": len(item["modules"]),
                "lines": item["lines"],
                "largest_module": item["largest"][0]["module"] if item["largest"] else None,
            }
            for item in ranked
        ],
        "most_imported": [
            {"module": name, "packages": count}
            for name, count in sorted(importers.items(), key=lambda kv: (-kv[1], kv[0]))[:top_n]
        ],
        "missing": sorted(ctx.missing),
    }
    _write_json(ctx.output_dir / "report.json", report)
    totals = report["totals"]
    lines = [
        f"# Python {report['python']} standard library: an overview",
        "",
        f"{totals['packages']} packages, {totals['modules']} modules, {totals['lines']} lines, "
        f"{totals['classes']} classes, {totals['functions']} top-level functions.",
        "",
        "| rank | package | modules | lines | largest module |",
        "| ---: | --- | ---: | ---: | --- |",
        *(
            f"| {rank} | `{item['package']}` | {item['modules']} | {item['lines']} "
            f"| `{item['largest_module']}` |"
            for rank, item in enumerate(report["packages"], 1)
        ),
        "",
        "Imported by the most packages: "
        + ", ".join(f"`{m['module']}` ({m['packages']})" for m in report["most_imported"])
        + ".",
    ]
    if ctx.missing:
        lines += ["", f"Missing package summaries: {', '.join(report['missing'])}."]
    (ctx.output_dir / "report.md").write_text(
        "\n".join(lines) + "\n" + _signature(ctx), encoding="utf-8"
    )


# --- helpers -------------------------------------------------------------------------------------


def _is_package(ctx: InstanceContext) -> bool:
    """Whether the module is a package's ``__init__`` (relative imports resolve from itself)."""
    return str(ctx.params["MODULE_PATH"]).endswith("/__init__.py")


def _failure_mode(module: str) -> str | None:
    for item in os.environ.get(FAIL_VARIABLE, "").split(","):
        name, _, mode = item.strip().partition(":")
        if name == module:
            return mode or "error"
    return None


def _public(tree: ast.Module) -> list[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            elements = node.value.elts if isinstance(node.value, ast.List | ast.Tuple) else []
            spelled = [
                e.value
                for e in elements
                if isinstance(e, ast.Constant) and isinstance(e.value, str)
            ]
            if elements and len(spelled) == len(elements):  # a literal list: take it as written
                return sorted(set(spelled))
        if isinstance(node, _FUNCTIONS | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return sorted(name for name in names if not name.startswith("_"))


def _imports(tree: ast.Module, module: str, *, is_package: bool) -> list[str]:
    found: set[str] = set()
    here = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            found.add(".".join([*base, *([node.module] if node.module else [])]))
    return sorted(name for name in found if name)


def _signature(ctx: InstanceContext) -> str:
    blueprint = ctx.blueprint.name if ctx.blueprint else "(none)"
    first = ctx.prompt.strip().splitlines()[0] if ctx.prompt.strip() else ""
    return f"\n---\nWritten by the offline stand-in for `{blueprint}`; its prompt began: {first}\n"


def _read_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
