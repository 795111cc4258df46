"""How ``phalanx import`` sorts a blueprint's completion criteria: into ``checks:`` a program
applies, schemas, items phalanx guarantees anyway, and the rest for a reviewer."""

from __future__ import annotations

from pathlib import Path

from phalanx._blueprint import parse_blueprint
from phalanx._pomasa import criteria_checks

HEAD = """\
# Agent

## 输出位置

`data/{ID}/`

**输出格式**：

```
data/{ID}/
├── result.json
├── notes.md
└── sub/table.csv
```

## 完成标准

"""


def _sorted(
    tmp_path: Path, *items: str
) -> tuple[list[dict[str, object]], dict[str, str], list[str], list[str]]:
    text = HEAD + "\n".join(f"- [ ] {item}" for item in items) + "\n"
    blueprint = parse_blueprint(text, path=tmp_path / "agents" / "01.a.md")
    found = criteria_checks(blueprint, tmp_path)
    checks = [{k: v for k, v in check.items() if k != "criterion"} for check in found.checks]
    return checks, found.schemas, found.enforced, found.review


def test_unambiguous_items_become_checks(tmp_path: Path) -> None:
    """Field presence (one or several, per element with 每条/each), counts, word counts and
    required text become checks, each quoting its item; a JSON field named alone is looked
    up in the only JSON output."""
    checks, _, _, review = _sorted(
        tmp_path,
        "`result.json` 包含 `items` 和 `total` 字段",
        "`items` 至少包含3条记录",
        "`items` 中每条记录都有 `url` 字段",
        "`notes.md` 不少于200字",
        "`notes.md` contains `## Sources`",
        "`rank` field is present",
        "`notes.md` has at least 10 words",
    )
    assert checks == [
        {"file": "result.json", "field": "items"},
        {"file": "result.json", "field": "total"},
        {"file": "result.json", "min_items": 3, "field": "items"},
        {"file": "result.json", "field": "items[].url"},
        {"file": "notes.md", "min_words": 200},
        {"file": "notes.md", "contains": "## Sources"},
        {"file": "result.json", "field": "rank"},
        {"file": "notes.md", "min_words": 10},
    ]
    assert review == []


def test_schemas_and_guarantees_and_judgement(tmp_path: Path) -> None:
    """A schema file that exists becomes the expected file's schema; valid JSON, a file that
    exists and writing only the own folder are phalanx's own guarantees; judgement calls, items
    whose file or field is not named in backticks, text that differs per instance and field
    paths a check cannot follow go to the reviewer."""
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "result.schema.json").write_text("{}", encoding="utf-8")
    checks, schemas, enforced, review = _sorted(
        tmp_path,
        "`result.json` 符合 `schemas/result.schema.json`",
        "`result.json` 是合法的JSON",
        "`sub/table.csv` exists",
        "只写入自己的输出目录",
        "结论有充分依据",
        "The notes are written for a general reader",
        "至少3条记录",
        "`notes.md` contains `{ITEM_NAME}`",
        "`result.json` 包含 `items[0]` 字段",
    )
    assert checks == []
    assert schemas == {"result.json": "schemas/result.schema.json"}
    assert enforced == [
        "`result.json` 符合 `schemas/result.schema.json`",
        "`result.json` 是合法的JSON",
        "`sub/table.csv` exists",
        "只写入自己的输出目录",
    ]
    assert review == [
        "结论有充分依据",
        "The notes are written for a general reader",
        "至少3条记录",
        "`notes.md` contains `{ITEM_NAME}`",
        "`result.json` 包含 `items[0]` 字段",
    ]
