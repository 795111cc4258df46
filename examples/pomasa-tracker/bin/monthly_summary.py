#!/usr/bin/env python3
"""An example agent program for the ``monthly_summary`` stage (a single instance).

phalanx lists the committed ``research`` outputs in ``PHALANX_INPUTS`` (a JSON list of
``{"stage", "key", "path"}``, in plan order). Organisations of ``references/organizations.json``
that are not among them failed upstream and are reported as missing. Writes ``report.md``
into the working directory (the staging folder).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def main() -> int:
    sys.stdin.read()  # the rendered blueprint; this stand-in knows what it says
    params = json.loads(os.environ["PHALANX_PARAMS"])
    inputs = json.loads(os.environ["PHALANX_INPUTS"])
    project = Path(os.environ["PHALANX_PROJECT_DIR"])
    organizations = json.loads(
        (project / "references" / "organizations.json").read_text(encoding="utf-8")
    )["organizations"]
    found: dict[str, dict[str, Any]] = {
        ref["key"]: json.loads(Path(ref["path"], "activities.json").read_text(encoding="utf-8"))
        for ref in inputs
    }
    rows = sorted(
        (org for org in organizations if org["id"] in found),
        key=lambda org: (-org["priority"], -len(found[org["id"]]["activities"]), org["id"]),
    )
    total = sum(len(record["activities"]) for record in found.values())
    lines = [
        f"# {params['PERIOD']} 月度汇总",
        "",
        f"{len(found)} 个组织，共 {total} 条活动。",
        "",
        "| 组织 | ID | 优先级 | 活动数 |",
        "| --- | --- | ---: | ---: |",
        *(
            f"| {_cell(org['name'])} | `{org['id']}` | {org['priority']} "
            f"| {len(found[org['id']]['activities'])} |"
            for org in rows
        ),
    ]
    missing = [org["id"] for org in organizations if org["id"] not in found]
    if missing:
        lines += ["", "## 缺失", "", *(f"- `{key}`（阶段一未提交）" for key in missing)]
    Path("report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


if __name__ == "__main__":
    sys.exit(main())
