"""``phalanx import``: a pipeline file for a POMASA-shaped project, read from the project as is.

A POMASA project keeps its agents as Markdown blueprints in ``agents/NN.name.md`` (Chinese or
English section headings), its configuration data in ``references/``, and an orchestrator
blueprint (``agents/00.orchestrator.md``) that tells a chat agent, stage by stage, which
blueprint to launch for which partitions. This module reads those files and writes the
``pipeline.yaml`` that runs the same stages with phalanx:

- one stage per stage section of the orchestrator (``## 阶段一`` / ``## Stage 1`` /
  ``### 第二层`` / ``## Phase 2``) that names a blueprint, in order; without an orchestrator,
  one stage per blueprint, in file order;
- a map stage over the reference file the section (or the blueprint) names, with the list, the
  key field and each parameter's field worked out from the file's rows and the parameters'
  names (``ORGANIZATION_NAME`` <- ``name`` in ``organizations``, ``FUNCTION_ID`` <-
  ``function_id``);
- a group stage where the blueprint's parameters name a field the earlier stage's rows carry
  (a feature synthesiser over function items: ``group_by: FEATURE_ID``), a single stage where
  the section asks for the global view or the blueprint has no parameter of its own, a follow
  stage where the earlier stage binds every parameter;
- the output folder from the blueprint's output location, the expected files from its output
  format, and its completion criteria as ``checks:`` where a program can check them (see
  :func:`criteria_checks`); the rest are listed for a reviewer (``review:`` with ``--review``);
- the orchestrator's global parameters as pipeline parameters, and the faithful-instantiation
  wording (``prompt: reference``) for the runner.

What cannot be inferred is written as a value starting ``TODO:`` with the reason; loading the
file refuses it and lists each one (:data:`phalanx._pipeline.TODO_MARK`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from ._blueprint import _PARAM_ITEM, Blueprint, _Markdown, _normalize_title, load_blueprint
from ._errors import BlueprintError, UsageError
from ._partitions import validate_key
from ._pipeline import TODO_MARK
from ._templates import prompt_placeholders

__all__ = ["Criteria", "ImportResult", "criteria_checks", "import_project"]

RunnerChoice = Literal["claude-code", "anthropic", "openai", "command"]
RUNNER_CHOICES: tuple[str, ...] = get_args(RunnerChoice)

_BLUEPRINT_NAME = re.compile(r"(?P<number>\d+)[._-](?P<stem>.+)\.md\Z")
_BLUEPRINT_REF = re.compile(r"agents/[\w.\-]+\.md")
_REFERENCE_REF = re.compile(r"references/[\w.\-/]+\.(?:json|ya?ml|jsonl|ndjson|csv|tsv)")
_PROJECT_PATH = re.compile(r"(?<![\w/{])(?:[\w.\-]+/)+[\w.\-]+\.\w+")
_STAGE_TITLE = re.compile(
    r"(?:阶段|第)\s*[一二三四五六七八九十\d]+\s*(?:阶段|层|步)?|(?:stage|phase|layer|step)\s*\d+",
    re.IGNORECASE,
)
_SINGLE = re.compile(
    r"全局视角|只启动一个|单个实例|一个实例|串行|汇总全部"
    r"|global view|serial|single (?:instance|task)|one instance|only one|a single",
    re.IGNORECASE,
)
_GLOBAL_TITLES = frozenset(
    {"全局参数", "全局变量", "参数", "global parameters", "global params", "parameters"}
)


@dataclass
class ImportResult:
    """What :func:`import_project` wrote: the pipeline file, its stages (name, kind, where the
    partitions come from), and each ``TODO:`` it left, as ``(where, reason)``."""

    path: Path
    stages: list[tuple[str, str, str]]
    todos: list[tuple[str, str]]


# --- completion criteria ------------------------------------------------------------------------


@dataclass
class Criteria:
    """A blueprint's completion criteria, sorted: ``checks`` (``checks:`` entries),
    ``schemas`` (expected file -> schema path), ``enforced`` (items phalanx guarantees anyway:
    valid JSON, the file exists, writing only the own folder) and ``review`` (the rest)."""

    checks: list[dict[str, object]] = field(default_factory=list)
    schemas: dict[str, str] = field(default_factory=dict)
    enforced: list[str] = field(default_factory=list)
    review: list[str] = field(default_factory=list)


_TICKS = re.compile(r"`([^`]+)`")
_WORDS = re.compile(
    r"(?:至少|不少于|不低于|at least|no fewer than|minimum of|>=|≥)\s*(\d+)\s*"
    r"(?:个)?\s*(?:字|词|words?)",
    re.IGNORECASE,
)
_COUNT = re.compile(
    r"(?:至少|不少于|不低于|at least|no fewer than|minimum of|>=|≥)\s*(?:包含|有|含)?\s*(\d+)\s*"
    r"(?:条|个|项|份|entries|entry|items?|records?|elements?|rows?)",
    re.IGNORECASE,
)
_FIELD_NAME = re.compile(r"[A-Za-z_$@][\w$@-]*(?:\[\])?(?:\.[A-Za-z_$@][\w$@-]*(?:\[\])?)*")
_FIELD_WORD = re.compile(r"字段|属性|键|fields?\b|keys?\b|propert(?:y|ies)", re.IGNORECASE)
_EACH = re.compile(r"每条|每个|每一|each|every|all (?:items|entries|records)", re.IGNORECASE)
_CONTAINS = re.compile(r"包含|含有|contains?|includes?|mentions?", re.IGNORECASE)
_VALID_JSON = re.compile(r"合法的?\s*JSON|有效的?\s*JSON|valid JSON|parses as JSON", re.IGNORECASE)
_SCHEMA = re.compile(r"符合|遵循|满足|schema|conforms?|validates?", re.IGNORECASE)
_EXISTS = re.compile(r"存在|已生成|已创建|已写入|exists?|is written|is created", re.IGNORECASE)
_OWN_FOLDER = re.compile(
    r"只写入?自己的|仅写入?自己的|不读写其他|only (?:writes?|writing) (?:to|into|in) its own"
    r"|never writes? (?:outside|another)",
    re.IGNORECASE,
)


def criteria_checks(blueprint: Blueprint, project_dir: Path) -> Criteria:
    """Sort ``blueprint``'s completion criteria into mechanical checks and the rest.

    An item becomes checks only when its wording is unambiguous, with the file and the field in
    backticks: ```score.json` contains the fields `function_id` and `score```, ```evidence` has
    at least 2 entries``, ```analysis.md` has at least 40 words``, ```report.md` 包含 `## 缺失```,
    ```activities` 中每条记录都包含 `date` 和 `source` 字段``. Every check keeps the item as its
    ``criterion``. Anything else is left for a reviewer.
    """
    outputs = [out.name for out in blueprint.outputs]
    json_outputs = [name for name in outputs if name.endswith(".json")]
    result = Criteria()
    lists: dict[str, str] = {}  # a JSON field a check named -> its file
    for item in blueprint.completion_criteria:
        ticks = [tick.strip() for tick in _TICKS.findall(item)]
        files = [tick for tick in ticks if _output_named(tick, outputs)]
        file = _output_named(files[0], outputs) if files else None
        others = [tick for tick in ticks if tick not in files]
        names = [tick for tick in others if _FIELD_NAME.fullmatch(tick)]  # JSON field names
        checks: list[dict[str, object]] = []
        if _OWN_FOLDER.search(item):
            result.enforced.append(item)
            continue
        schema = next(
            (t for t in others if t.endswith(".json") and (project_dir / t).is_file()), None
        )
        by_schema = bool(schema and file and file.endswith(".json") and _SCHEMA.search(item))
        if by_schema and schema and file:
            result.schemas[file] = schema
            others.remove(schema)
        if words := _WORDS.search(item):
            if file and not file.endswith(".json"):
                checks.append({"file": file, "min_words": int(words.group(1))})
        elif count := _COUNT.search(item):
            name = names[0] if names else None
            where = file or (name and (lists.get(name) or _only(json_outputs)))
            if where and where.endswith(".json"):
                check: dict[str, object] = {"file": where, "min_items": int(count.group(1))}
                if name:
                    check["field"] = name
                    lists[name] = where
                checks.append(check)
        elif names and names == others and _FIELD_WORD.search(item):
            each = names[0] if _EACH.search(item) and len(names) > 1 else None
            where = file or (each and lists.get(each)) or _only(json_outputs)
            if where and where.endswith(".json"):
                for name in names:
                    if name != each:
                        path = f"{each}[].{name}" if each else name
                        checks.append({"file": where, "field": path})
                        lists.setdefault(name, where)
        elif (
            others
            and file
            and not file.endswith(".json")
            and _CONTAINS.search(item)
            and not prompt_placeholders(others[0])  # a literal, not a value per instance
        ):
            checks.append({"file": file, "contains": others[0]})
        if checks:
            result.checks += [{**check, "criterion": item} for check in checks]
        elif file and (_VALID_JSON.search(item) or _EXISTS.search(item) or by_schema):
            result.enforced.append(item)
        else:
            result.review.append(item)
    return result


def _output_named(tick: str, outputs: Sequence[str]) -> str | None:
    """The expected output ``tick`` names: its path, or its base name when that is unique."""
    if tick in outputs:
        return tick
    same = [name for name in outputs if name.rsplit("/", 1)[-1] == tick]
    return same[0] if len(same) == 1 else None


def _only(names: Sequence[str]) -> str | None:
    return names[0] if len(names) == 1 else None


# --- reading the project ------------------------------------------------------------------------


@dataclass
class _Rows:
    """A reference file's rows: the list that holds them (``list_name``) and their fields."""

    path: str
    list_name: str | None
    rows: list[dict[str, Any]]

    @property
    def fields(self) -> list[str]:
        return list(dict.fromkeys(name for row in self.rows for name in row))

    @property
    def entity(self) -> str:
        """``organizations`` -> ``organization``: what one row is, from the list's name."""
        name = (self.list_name or Path(self.path).stem).rsplit(".", 1)[-1].lower()
        if name.endswith("ies"):
            return name[:-3] + "y"
        return name[:-1] if name.endswith("s") and not name.endswith("ss") else name


@dataclass
class _Section:
    title: str
    text: str


@dataclass
class _Stage:
    name: str
    blueprint: Blueprint
    rel: str
    section: _Section | None
    kind: str = ""
    rows: _Rows | None = None
    key: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    group_by: str | None = None
    needs: list[str] = field(default_factory=list)
    todo: dict[str, str] = field(default_factory=dict)  # field -> reason


def _norm(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", text.lower())


def _blueprints(project: Path) -> tuple[Path | None, list[Path]]:
    """The orchestrator blueprint (or None) and the others, in file order."""
    folder = project / "agents"
    if not folder.is_dir():
        raise UsageError(
            f"{project}: no agents/ folder; a POMASA project keeps its blueprints in "
            "agents/NN.name.md (point phalanx import at the project's root folder)"
        )
    files = sorted(path for path in folder.glob("*.md") if path.is_file())
    orchestrators = [
        path
        for path in files
        if "orchestrat" in path.stem.lower()
        or "编排" in path.stem
        or (path.stem.startswith("00") and _names_blueprints(path))
    ]
    orchestrator = orchestrators[0] if orchestrators else None
    agents = [path for path in files if path != orchestrator]
    if not agents:
        raise UsageError(f"{folder}: no agent blueprints (agents/NN.name.md) to import")
    return orchestrator, agents


def _names_blueprints(path: Path) -> bool:
    """Whether the file mentions a blueprint under ``agents/``: a ``00.`` file that does is the
    orchestrator, one that does not is the first agent."""
    return _BLUEPRINT_REF.search(path.read_text(encoding="utf-8", errors="replace")) is not None


def _sections(doc: _Markdown) -> list[_Section]:
    """The orchestrator's stage sections: headings titled like a stage, at the highest level
    such a heading has, each with the text up to the next heading of that level."""
    matches = [
        (index, level, title)
        for index, (level, title) in doc.headings.items()
        if _STAGE_TITLE.search(title)
    ]
    if not matches:
        return []
    top = min(level for _, level, _ in matches)
    return [
        _Section(title, "\n".join(doc.lines[index + 1 : doc.region_end(index, top)]))
        for index, level, title in matches
        if level == top
    ]


def _global_params(doc: _Markdown) -> dict[str, str]:
    """The parameters listed under the orchestrator's global-parameters heading, with their
    descriptions."""
    found: dict[str, str] = {}
    for index, (_, title) in doc.headings.items():
        if _normalize_title(title) in _GLOBAL_TITLES:
            for line in doc.lines[index + 1 : doc.region_end(index)]:
                if match := _PARAM_ITEM.fullmatch(line):
                    found.setdefault(match["name"], match["description"].strip())
    return found


def _read_rows(project: Path, rel: str, entity_hint: Iterable[str]) -> _Rows | str:
    """The rows of reference file ``rel``, or why they cannot be used."""
    path = project / rel
    try:
        text = path.read_text(encoding="utf-8")
        data: object = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        return f"{rel} cannot be read as JSON/YAML ({exc})"
    if isinstance(data, list):
        rows = [row for row in data if isinstance(row, dict)]
        return _Rows(rel, None, rows) if rows else f"{rel} holds no objects"
    if not isinstance(data, dict):
        return f"{rel} holds neither a list nor an object"
    lists = {
        name: value
        for name, value in data.items()
        if isinstance(value, list) and value and all(isinstance(row, dict) for row in value)
    }
    if len(lists) > 1:
        hints = [_norm(hint) for hint in entity_hint]
        fitting = [name for name in lists if any(_norm(name).startswith(h) for h in hints)]
        if len(fitting) == 1:
            lists = {fitting[0]: lists[fitting[0]]}
    if len(lists) != 1:
        found = ", ".join(lists) or "none"
        return f"{rel}: cannot tell which list holds the partitions (lists of objects: {found})"
    ((name, rows),) = lists.items()
    return _Rows(rel, name, rows)


def _field_for(param: str, rows: _Rows) -> str | None:
    """The field of ``rows`` that gives ``param``: same name in any case (``FUNCTION_ID`` <-
    ``function_id``), or the name without the row's entity (``ORGANIZATION_NAME`` <- ``name``
    in ``organizations``)."""
    fields = rows.fields
    for name in fields:
        if _norm(name) == _norm(param):
            return str(name)
    entity = _norm(rows.entity)
    if _norm(param).startswith(entity):
        rest = _norm(param)[len(entity) :]
        for name in fields:
            if _norm(name) == rest:
                return name
    return None


# --- inference ----------------------------------------------------------------------------------


def _infer(stages: list[_Stage], project: Path, global_params: list[str]) -> list[str]:
    """Decide every stage's kind, partitions, parameters and needs; return the pipeline
    parameters (the orchestrator's global ones, then the others in order of first use)."""
    pipeline_params = list(global_params)
    roots: list[_Stage] = []  # map stages over a reference file, latest last
    for position, stage in enumerate(stages):
        previous = stages[position - 1] if position else None
        if previous is not None:
            stage.needs = [previous.name]
        text = stage.section.text if stage.section else ""
        title = stage.section.title if stage.section else stage.name
        own = [p for p in stage.blueprint.params if p not in pipeline_params]
        refs = _REFERENCE_REF.findall(text) or (
            [] if previous is not None else _first_references(stage, project)
        )
        rows = _read_rows(project, refs[0], _entities(own)) if refs else None
        one_per_row = previous is None or (rows is not None and _one_per_row(rows, own))
        if refs and rows is not None and one_per_row and not _SINGLE.search(text):
            _map_stage(stage, refs[0], rows, own, pipeline_params)
            if stage.rows is not None:
                roots.append(stage)
        elif previous is None:
            stage.kind = "map"
            stage.todo["partitions"] = (
                f"the orchestrator names no reference file for this stage; point partitions.from "
                f"at the file listing one row per {own[0] if own else 'partition'} "
                "(e.g. {from: references/items.json, list: items, key: id})"
            )
        elif _SINGLE.search(text + title) or not own:
            stage.kind = "single"
        else:
            _grouped_stage(stage, previous, roots, own, title + "\n" + text)
    return pipeline_params


def _entities(params: list[str]) -> list[str]:
    """``ORGANIZATION_ID`` -> ``ORGANIZATION``: what the parameters' rows may be called."""
    return [p.rsplit("_", 1)[0] for p in params if "_" in p]


def _one_per_row(rows: _Rows | str, own: list[str]) -> bool:
    """Whether a later stage that names a reference file runs once per row of it: its
    ``..._ID`` parameter is a field whose values do not repeat. A feature synthesiser whose
    section names the function list (each feature on many rows) groups instead."""
    if isinstance(rows, str):
        return True  # the map stage will say what is wrong with the file
    for param in own:
        name = _field_for(param, rows) if param.endswith("_ID") else None
        if name is not None:
            values = [str(row.get(name)) for row in rows.rows]
            return len(set(values)) == len(values)
    return True


def _first_references(stage: _Stage, project: Path) -> list[str]:
    """The reference files of the first stage when its section names none: those its
    blueprint names, else the only data file in ``references/``."""
    named = _REFERENCE_REF.findall(stage.blueprint.body)
    if named:
        return named
    folder = project / "references"
    files = (
        sorted(
            path.relative_to(project).as_posix()
            for path in folder.rglob("*")
            if path.is_file() and _REFERENCE_REF.fullmatch(path.relative_to(project).as_posix())
        )
        if folder.is_dir()
        else []
    )
    return files if len(files) == 1 else []


def _map_stage(
    stage: _Stage, ref: str, rows: _Rows | str, own: list[str], pipeline_params: list[str]
) -> None:
    """A map over the rows of reference file ``ref`` (or why they cannot be used)."""
    stage.kind = "map"
    if isinstance(rows, str):
        stage.todo["partitions"] = f"{rows}; say which rows are the partitions"
        return
    stage.rows = rows
    for param in own:
        name = _field_for(param, rows)
        if name is not None:
            stage.params[param] = "{" + name + "}"
        elif param not in pipeline_params:  # not a row field: a value for the whole run
            pipeline_params.append(param)
    ids = [p for p in stage.params if p.endswith("_ID")]
    key_field = stage.params[ids[0]][1:-1] if ids else ("id" if "id" in rows.fields else None)
    if key_field is None:
        stage.todo["partitions.key"] = (
            f"no field of {ref} names a row uniquely (fields: {', '.join(rows.fields)}); "
            "name the field whose values are the partition keys"
        )
        return
    values = [str(row.get(key_field, "")) for row in rows.rows]
    bad = next((f"{v!r}: {why}" for v in values if (why := validate_key(v))), None)
    if bad is None and len({v.casefold() for v in values}) != len(values):
        bad = "some values repeat (ignoring case)"
    if bad is not None:
        stage.todo["partitions.key"] = (
            f"field {key_field!r} of {ref} cannot name folders ({bad}); give a template over "
            "fields that is unique and folder-safe, e.g. '{id}'"
        )
        return
    stage.key = key_field


def _grouped_stage(
    stage: _Stage, previous: _Stage, roots: list[_Stage], own: list[str], text: str
) -> None:
    """A stage after ``previous`` whose parameters are not the run's: follow ``previous`` when
    it binds them all, else group its instances by the field the parameters name."""
    bound = set(previous.params)
    if previous.kind == "group" and previous.group_by:
        bound |= {previous.group_by}
    if set(own) <= bound:
        stage.kind = "follow"
        return
    root = roots[-1] if roots else None
    missing = [p for p in own if p not in bound]
    if root is not None and root.rows is not None:
        for param in missing:  # carried by the root's instances, so that groups share them
            name = _field_for(param, root.rows)
            if name is not None:
                root.params.setdefault(param, "{" + name + "}")
    carried = set(root.params) if root is not None else set()
    ids = [p for p in own if p.endswith("_ID") and p in carried and p not in bound]
    if len(ids) > 1:
        lowered = _norm(text)
        ids = [p for p in ids if _norm(p.removesuffix("_ID")) in lowered] or ids
    unknown = [p for p in own if p not in carried and p not in bound]
    if len(ids) == 1 and not unknown:
        stage.kind = "group"
        stage.group_by = ids[0]
        return
    stage.kind = "group"
    reason = (
        f"parameters {', '.join(unknown)} are not fields of any reference file"
        if unknown
        else f"cannot tell which of {', '.join(ids) or 'its parameters'} the groups are"
    )
    stage.todo["group_by"] = (
        f"{reason}; name the field of stage {previous.name!r} to group by (or turn the stage "
        "into a map over a reference file with partitions:)"
    )


# --- writing ------------------------------------------------------------------------------------


def _q(value: object) -> str:
    """A YAML scalar, quoted the JSON way (JSON is YAML), so any text survives."""
    return json.dumps(value, ensure_ascii=False)


def _flow(mapping: Mapping[str, object]) -> str:
    return "{" + ", ".join(f"{key}: {_q(value)}" for key, value in mapping.items()) + "}"


def _todo(reason: str) -> str:
    return _q(f"{TODO_MARK} {reason}")


def _runner_lines(runner: str, model: str | None, base_url: str | None) -> list[str]:
    lines = ["  runner:", f"    type: {runner}"]
    if runner == "command":
        lines.append(
            "    argv: ["
            + _todo(
                "the program that runs one instance: it gets the prompt on stdin and writes its "
                "files into its working folder, e.g. [claude, -p, --permission-mode, acceptEdits]"
            )
            + "]"
        )
    elif runner in ("anthropic", "openai") and model is None:
        lines.append(f"    model: {_todo('the model that runs the blueprints (--model)')}")
    if model is not None:
        lines.append(f"    model: {_q(model)}")
    if base_url is not None:
        lines.append(f"    base_url: {_q(base_url)}")
    return lines


def _stage_lines(stage: _Stage, project: Path, review: bool) -> list[str]:
    bp = stage.blueprint
    title = stage.section.title if stage.section else "no orchestrator section"
    lines = [
        f"  # {stage.rel}: {bp.name} (orchestrator: {title})",
        f"  - name: {stage.name}",
        f"    blueprint: {_q(stage.rel)}",
    ]
    if stage.needs:
        lines.append(f"    needs: [{', '.join(stage.needs)}]")
    if stage.kind == "map":
        if "partitions" in stage.todo:
            lines.append(f"    partitions: {_todo(stage.todo['partitions'])}")
        elif stage.rows is not None:
            source: dict[str, object] = {"from": stage.rows.path}
            if stage.rows.list_name:
                source["list"] = stage.rows.list_name
            key = stage.key or f"{TODO_MARK} {stage.todo.get('partitions.key', '')}"
            source["key"] = key
            count = len(stage.rows.rows)
            lines.append(f"    partitions: {_flow(source)}  # {count} rows")
    elif stage.kind == "group":
        by = stage.group_by or f"{TODO_MARK} {stage.todo.get('group_by', '')}"
        lines.append(f"    group_by: {_q(by)}  # one instance per value, over {stage.needs[0]}")
    elif stage.kind == "single":
        lines.append("    single: true  # one instance with every input of its needs")
    else:
        lines.append(f"    # follows {stage.needs[0]}: one instance per instance of it, same key")
    if stage.params:
        lines.append(f"    params: {_flow(stage.params)}")
    if bp.output_location:
        lines.append(f"    output: {_q(bp.output_location)}  # the blueprint's output location")
    else:
        lines.append(
            "    output: "
            + _todo(
                f"{stage.rel} has no output location (输出位置); give the folder one instance "
                "writes, with its key's placeholder, e.g. data/{ITEM_ID}/"
            )
        )
    criteria = criteria_checks(bp, project)
    if bp.outputs:
        expect = {
            out.name: (
                {"schema": criteria.schemas[out.name]} if out.name in criteria.schemas else {}
            )
            for out in bp.outputs
        }
        lines.append("    expect:  # the blueprint's output format")
        lines += [f"      {_q(name)}: {_flow(spec)}" for name, spec in expect.items()]
    reads = _reads(bp, project)
    if reads:
        lines.append(f"    reads: [{', '.join(_q(path) for path in reads)}]")
    if criteria.checks:
        lines.append("    checks:  # completion criteria a program can check")
        for check in criteria.checks:
            lines.append(f"      - {_flow(check)}")
    for item in criteria.enforced:
        lines.append(f"    # criterion enforced by phalanx itself: {item}")
    if criteria.review and review:
        lines.append("    review:  # completion criteria a reviewer agent judges before commit")
        lines.append("      criteria:")
        lines += [f"        - {_q(item)}" for item in criteria.review]
    elif criteria.review:
        lines.append(
            "    # criteria no program checks (phalanx import --review hands them to a "
            "reviewer agent):"
        )
        lines += [f"    #   - {item}" for item in criteria.review]
    return lines


def _reads(bp: Blueprint, project: Path) -> list[str]:
    """Project files the blueprint tells the agent to read (existing, outside data/)."""
    found = []
    for path in _PROJECT_PATH.findall(bp.body):
        if "{" not in path and (project / path).is_file() and not path.startswith("agents/"):
            found.append(path)
    return list(dict.fromkeys(found))


def import_project(
    project: Path,
    *,
    output: Path | None = None,
    runner: str = "claude-code",
    model: str | None = None,
    base_url: str | None = None,
    params: Mapping[str, str] | None = None,
    review: bool = False,
    force: bool = False,
) -> ImportResult:
    """Write a pipeline file for the POMASA project in ``project`` (``output``, default
    ``project/pipeline.yaml``) and say what was inferred and what was left ``TODO:``.

    Raises :class:`UsageError` when the folder is not such a project, when ``output`` exists
    and ``force`` is false, or for an unknown ``runner``.
    """
    if runner not in RUNNER_CHOICES:
        raise UsageError(f"--runner {runner!r}: choose one of {', '.join(RUNNER_CHOICES)}")
    project = project.resolve()
    if not project.is_dir():
        raise UsageError(f"{project}: not a folder; give the POMASA project's root folder")
    target = (output or project / "pipeline.yaml").resolve()
    if target.exists() and not force:
        raise UsageError(
            f"{target}: exists; phalanx import does not overwrite it (--force to replace it, "
            "or -o another file)"
        )
    if not target.parent == project:
        raise UsageError(
            f"{target}: the pipeline file must sit in the project folder {project}, since its "
            "paths are relative to it"
        )
    orchestrator_path, agent_paths = _blueprints(project)
    sections: list[_Section] = []
    global_params: dict[str, str] = {}
    description = ""
    if orchestrator_path is not None:
        text = orchestrator_path.read_text(encoding="utf-8-sig")
        doc = _Markdown(text.replace("\r\n", "\n"))
        sections = _sections(doc)
        global_params = _global_params(doc)
        description = (doc.title_and_summary()[0] or "").strip()
    stages = _plan_stages(project, agent_paths, sections)
    pipeline_params = _infer(stages, project, list(global_params))
    given = dict(params or {})
    unknown = sorted(set(given) - set(pipeline_params))
    if unknown:
        raise UsageError(
            f"--param {', '.join(unknown)}: not a parameter of this project's pipeline; its "
            f"parameters: {', '.join(pipeline_params) or 'none'}"
        )
    lines = [
        f"# Written by `phalanx import` from the POMASA project in {project.name}/.",
        f"# Values starting {TODO_MARK!r} could not be inferred: `phalanx validate` lists them.",
        f"name: {_q(project.name)}",
    ]
    if description:
        lines.append(f"description: {_q(description)}")
    todos: list[tuple[str, str]] = []
    if pipeline_params:
        lines.append("params:")
        for name in pipeline_params:
            if name in given:
                lines.append(f"  {name}: {_q(given[name])}")
            else:
                said = global_params.get(name) or f"a value of {name} for the whole run"
                reason = f"{said} (phalanx import --param {name}=...)"
                lines.append(f"  {name}: {_todo(reason)}")
                todos.append((f"params.{name}", reason))
    lines += [
        "defaults:",
        "  # Faithful instantiation: each instance is told to read its blueprint and run it with",
        "  # its parameters, as the orchestrator's Tasks were.",
        "  prompt: reference",
        *_runner_lines(runner, model, base_url),
        "  retries: 2",
        "stages:",
    ]
    for stage in stages:
        lines += _stage_lines(stage, project, review)
        todos += [(f"stages.{stage.name}.{name}", why) for name, why in stage.todo.items()]
    if runner == "command":
        todos.append(("defaults.runner.argv", "the program that runs one instance"))
    elif runner in ("anthropic", "openai") and model is None:
        todos.append(("defaults.runner.model", "the model that runs the blueprints"))
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = [(stage.name, stage.kind, _source(stage)) for stage in stages]
    return ImportResult(target, summary, todos)


def _source(stage: _Stage) -> str:
    if stage.kind == "map" and stage.rows is not None:
        return f"{len(stage.rows.rows)} rows of {stage.rows.path}"
    if stage.kind == "group":
        return f"groups of {stage.needs[0]} by {stage.group_by or '?'}"
    if stage.kind == "follow":
        return f"each instance of {stage.needs[0]}"
    if stage.kind == "single":
        return "one instance"
    return "?"


def _plan_stages(project: Path, agents: list[Path], sections: list[_Section]) -> list[_Stage]:
    """One stage per orchestrator section naming a blueprint; without sections (or none that
    names one), one per blueprint."""
    by_rel = {path.relative_to(project).as_posix(): path for path in agents}
    chosen: list[tuple[str, _Section | None]] = []
    for section in sections:
        refs = [
            ref for ref in _BLUEPRINT_REF.findall(section.text + section.title) if ref in by_rel
        ]
        if refs:
            chosen.append((refs[0], section))
    if not chosen:
        chosen = [(rel, None) for rel in by_rel]
    stages: list[_Stage] = []
    names: set[str] = set()
    for rel, part in chosen:
        try:
            blueprint = load_blueprint(by_rel[rel], display_path=rel)
        except BlueprintError as exc:
            raise UsageError(str(exc)) from exc
        match = _BLUEPRINT_NAME.match(Path(rel).name)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", match["stem"] if match else Path(rel).stem)
        base, n = name.strip("_.-") or "stage", 2
        name = base
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.add(name)
        stages.append(_Stage(name, blueprint, rel, part))
    return stages
