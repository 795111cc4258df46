"""``phalanx init``: a small starter project that runs as written, offline."""

from __future__ import annotations

from pathlib import Path

from ._errors import UsageError

__all__ = ["write_starter"]

_PIPELINE = """\
# A starter pipeline: one agent instance per item (map), then one report over all of them
# (single). Run it with `phalanx run pipeline.yaml`; see `phalanx plan pipeline.yaml` first.
name: starter
params:
  TOPIC: fruit
defaults:
  runner: {type: python, function: "agent:describe"}
  concurrency: 8
  retries: 2
  timeout: 60s
stages:
  - name: describe
    blueprint: agents/describe.md
    partitions: {from: items.json, key: id}
    params: {ITEM_ID: "{id}", ITEM_NAME: "{name}"}
    output: data/{TOPIC}/items/{ITEM_ID}/
    expect:
      facts.json: {schema: schemas/facts.schema.json}
      summary.md: {}
  - name: report
    needs: [describe]
    single: true
    runner: {type: python, function: "agent:report"}
    output: data/{TOPIC}/report/
    expect: [report.md]
"""

_BLUEPRINT = """\
---
name: describe
description: Describe one item and record a few facts about it.
params:
  ITEM_ID: The item's id.
  ITEM_NAME: The item's display name.
  TOPIC: What the items are.
outputs:
  facts.json: Facts about the item, as JSON.
  summary.md: A short summary in Markdown.
---
You are describing one {TOPIC}: **{ITEM_NAME}** (id `{ITEM_ID}`).

Write two files into your working directory:

1. `facts.json`, an object such as {"id": "...", "name": "...", "letters": 5}.
2. `summary.md`, a short paragraph about the item.
"""

_AGENT = '''\
"""The starter's agents. A real project would call an LLM here; these are offline stand-ins
that follow the blueprint (the rendered prompt is in ctx.prompt)."""

import json

from phalanx import InstanceContext


def describe(ctx: InstanceContext) -> None:
    name = str(ctx.params["ITEM_NAME"])
    facts = {"id": ctx.key, "name": name, "letters": sum(c.isalpha() for c in name)}
    (ctx.output_dir / "facts.json").write_text(json.dumps(facts, indent=2))
    (ctx.output_dir / "summary.md").write_text(
        f"# {name}\\n\\n{name} has {facts['letters']} letters.\\n"
    )


def report(ctx: InstanceContext) -> None:
    lines = ["# Report", ""]
    for ref in ctx.inputs:
        facts = json.loads((ref.path / "facts.json").read_text())
        lines.append(f"- {facts['name']}: {facts['letters']} letters")
    if ctx.missing:
        lines += ["", f"Missing: {', '.join(ctx.missing)}"]
    (ctx.output_dir / "report.md").write_text("\\n".join(lines) + "\\n")
'''

_ITEMS = """\
[
  {"id": "apple", "name": "Apple"},
  {"id": "banana", "name": "Banana"},
  {"id": "cherry", "name": "Cherry", "priority": 2},
  {"id": "damson", "name": "Damson plum"}
]
"""

_SCHEMA = """\
{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["id", "name", "letters"],
  "properties": {
    "id": {"type": "string"},
    "name": {"type": "string"},
    "letters": {"type": "integer", "minimum": 0}
  }
}
"""

_FILES = {
    "pipeline.yaml": _PIPELINE,
    "agents/describe.md": _BLUEPRINT,
    "agent.py": _AGENT,
    "items.json": _ITEMS,
    "schemas/facts.schema.json": _SCHEMA,
}


def write_starter(directory: Path) -> list[Path]:
    """Write the starter files into ``directory``; refuses to overwrite any existing file."""
    existing = [name for name in _FILES if (directory / name).exists()]
    if existing:
        raise UsageError(
            f"{directory}: would overwrite {', '.join(existing)}; run `phalanx init` in an "
            "empty folder (or remove those files)"
        )
    written = []
    for name, text in _FILES.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
