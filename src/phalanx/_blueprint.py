"""Blueprints: prompt-defined agents, loaded from Markdown files.

A blueprint's body is a prompt template with ``{UPPER_SNAKE}`` placeholders (the prompt language
of :mod:`phalanx._templates`: JSON examples and ``{lower}`` braces survive, ``{{NAME}}`` is the
literal text ``{NAME}``). Four shapes load; :attr:`Blueprint.shape` says which one was found:

``front-matter``
    ``---``-fenced YAML with ``name``, ``description``, ``model``, ``runner``, ``tools``,
    ``params`` and ``outputs``. Other keys are not errors: the whole front matter is kept in
    :attr:`Blueprint.metadata`.
``claude-code``
    A Claude Code agent file, loaded unchanged. The rule: the front matter declares none of
    ``params``, ``outputs``, ``runner``, and either the file lives under a ``.claude/agents``
    directory or ``tools`` is one string (``Read, Grep, Glob``), which is how Claude Code spells
    it. Like Claude Code, a one-line field whose value holds ``": "`` (descriptions quoting
    ``user: ...`` examples) is read as plain text although strict YAML rejects it.
``pomasa``
    No front matter, and at least one POMASA section (Chinese or English): input parameters,
    output location, output format (a file tree), completion standards.
``plain``
    No front matter and none of those sections.

Whatever the shape, POMASA sections in the body fill in what the front matter does not declare.
Parameters with no declaration are the placeholders of the body, all required.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Literal

import yaml

from phalanx._errors import BlueprintError
from phalanx._templates import prompt_placeholders, render_prompt, stringify

__all__ = [
    "Blueprint",
    "BlueprintShape",
    "ExpectedOutput",
    "ParamSpec",
    "load_blueprint",
    "parse_blueprint",
]

BlueprintShape = Literal["front-matter", "claude-code", "pomasa", "plain"]


@dataclass(frozen=True)
class ParamSpec:
    """A parameter a blueprint declares; ``default`` is ``None`` when the parameter is required."""

    name: str
    description: str = ""
    default: str | None = None

    @property
    def required(self) -> bool:
        """True when a partition (or the stage) must supply a value."""
        return self.default is None


@dataclass(frozen=True)
class ExpectedOutput:
    """A file an instance must write: ``name`` is relative to its output directory."""

    name: str
    description: str = ""
    schema: str | None = None


@dataclass(frozen=True)
class Blueprint:
    """A loaded blueprint. Build one with :func:`load_blueprint` or :func:`parse_blueprint`."""

    path: Path
    display_path: str
    shape: BlueprintShape
    name: str
    description: str
    body: str
    model: str | None
    runner: str | None
    tools: tuple[str, ...]
    params: Mapping[str, ParamSpec] = field(hash=False)
    outputs: tuple[ExpectedOutput, ...]
    output_location: str | None
    completion_criteria: tuple[str, ...]
    metadata: Mapping[str, object] = field(hash=False)

    def placeholders(self) -> list[str]:
        """The ``{UPPER_SNAKE}`` names the body uses, in order of first appearance."""
        return prompt_placeholders(self.body)

    def render(self, values: Mapping[str, object], *, partition: str) -> str:
        """Inline mode: the body with every placeholder replaced.

        Declared defaults fill the gaps in ``values``. Raises :class:`BlueprintError` naming the
        blueprint, the partition and every parameter that has no value.
        """
        return render_prompt(self.body, self._resolve(values, partition))

    def reference_prompt(self, values: Mapping[str, object], *, partition: str) -> str:
        """Reference mode (POMASA's faithful instantiation): tell the agent to read the blueprint
        itself and run it with these parameters, JSON-quoted so any value reads unambiguously.

        Lists every placeholder of the body, then the declared parameters the body does not
        use. Raises :class:`BlueprintError` like :meth:`render`.
        """
        resolved = self._resolve(values, partition)
        assignments = ", ".join(
            f"{name}={json.dumps(stringify(resolved[name]), ensure_ascii=False)}"
            for name in self._parameter_names()
        )
        return (
            f"Read `{self.display_path}` and execute strictly according to that blueprint; "
            f"parameters: {assignments or 'none'}.\n"
            "Write every output file into the current working directory instead of the "
            "blueprint's output location, keeping the file names and subfolders it specifies; "
            "phalanx moves them into place after validation."
        )

    def _parameter_names(self) -> list[str]:
        names = dict.fromkeys(self.placeholders())
        names.update(dict.fromkeys(self.params))
        return list(names)

    def _resolve(self, values: Mapping[str, object], partition: str) -> dict[str, object]:
        resolved: dict[str, object] = {
            spec.name: spec.default for spec in self.params.values() if spec.default is not None
        }
        resolved.update(values)
        missing = [name for name in self._parameter_names() if name not in resolved]
        if missing:
            one = len(missing) == 1
            raise BlueprintError(
                f"{self.display_path}: no value for parameter{'' if one else 's'} "
                f"{', '.join(missing)} in partition {partition!r}; add {'it' if one else 'them'} "
                f"to the stage's params: or give {'it a default' if one else 'them defaults'} "
                "in the blueprint"
            )
        return resolved


def load_blueprint(path: Path, *, display_path: str | None = None) -> Blueprint:
    """Read and parse the blueprint at ``path``; messages name it ``display_path``.

    Raises :class:`BlueprintError` when the file is missing, unreadable, not UTF-8, or
    malformed (see :func:`parse_blueprint`).
    """
    shown = display_path if display_path is not None else path.as_posix()
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise BlueprintError(
            f"{shown}: blueprint not found; check the stage's blueprint: path"
        ) from exc
    except IsADirectoryError as exc:
        raise BlueprintError(
            f"{shown}: is a directory, not a blueprint; point the stage's blueprint: at a .md file"
        ) from exc
    except OSError as exc:
        raise BlueprintError(
            f"{shown}: cannot read the blueprint ({exc.strerror}); check its permissions"
        ) from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise BlueprintError(
            f"{shown}: line {line}: not UTF-8 text (byte {data[exc.start]:#04x}); "
            "save the blueprint as UTF-8"
        ) from exc
    return parse_blueprint(text, path=path, display_path=shown)


def parse_blueprint(text: str, *, path: Path, display_path: str | None = None) -> Blueprint:
    """Parse blueprint ``text`` as if read from ``path`` (the path decides nothing but the
    ``claude-code`` shape and the fallback name).

    Raises :class:`BlueprintError` for malformed or non-mapping front matter, an unterminated
    front matter block, a field of the wrong type, a parameter name that is not UPPER_SNAKE, an
    output path that leaves the output directory, and a blueprint with no body.
    """
    shown = display_path if display_path is not None else path.as_posix()
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    front_matter, body = _split_front_matter(text, shown)
    fields = {} if front_matter is None else _load_front_matter(front_matter, shown)
    body = body.lstrip("\n")
    if not body.strip():
        where = "below the front matter" if front_matter is not None else "in the file"
        raise BlueprintError(f"{shown}: blueprint has no body; write the agent's prompt {where}")

    doc = _Markdown(body)
    title, summary = doc.title_and_summary()
    section_params = _section_params(doc)
    location = _output_location(doc)
    tree_root, tree_outputs = _tree_outputs(doc)
    criteria = _completion_criteria(doc)

    params = _declared_params(fields.get("params"), shown) or section_params
    if not params:
        params = {name: ParamSpec(name) for name in prompt_placeholders(body)}
    outputs = _declared_outputs(fields.get("outputs"), shown) or tree_outputs

    shape: BlueprintShape
    if front_matter is not None:
        claude_like = _under_claude_agents(path) or isinstance(fields.get("tools"), str)
        plain_fields = not fields.keys() & {"params", "outputs", "runner"}
        shape = "claude-code" if claude_like and plain_fields else "front-matter"
    elif section_params is not None or location or tree_outputs or criteria is not None:
        shape = "pomasa"
    else:
        shape = "plain"

    return Blueprint(
        path=path,
        display_path=shown,
        shape=shape,
        name=_optional_str(fields, "name", shown) or title or path.stem,
        description=_optional_str(fields, "description", shown) or summary,
        body=body,
        model=_optional_str(fields, "model", shown),
        runner=_optional_str(fields, "runner", shown),
        tools=_tools(fields.get("tools"), shown),
        params=MappingProxyType(params),
        outputs=tuple(outputs),
        output_location=location or tree_root,
        completion_criteria=criteria or (),
        metadata=MappingProxyType(fields),
    )


# --- front matter -------------------------------------------------------------------------------

_PARAM_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
_SIMPLE_FIELD = re.compile(r"(?P<key>[A-Za-z_][\w-]*):(?:[ \t]+(?P<value>.*))?")
_YAML_INDICATORS = tuple("[]{}\"'|>&*!%@`#,?-")
_UNPARSED = object()


def _split_front_matter(text: str, shown: str) -> tuple[str | None, str]:
    lines = text.split("\n")
    if lines[0].rstrip() != "---":
        return None, text
    for index in range(1, len(lines)):
        if lines[index].rstrip() in ("---", "..."):
            return "\n".join(lines[1:index]), "\n".join(lines[index + 1 :])
    raise BlueprintError(
        f"{shown}: line 1: front matter is never closed; end it with a line holding only ---"
    )


def _load_front_matter(source: str, shown: str) -> dict[str, object]:
    try:
        loaded: object = yaml.safe_load(source)
    except yaml.YAMLError as exc:
        lenient = _lenient_fields(source)
        if lenient is None:
            raise BlueprintError(_yaml_problem(exc, shown)) from exc
        loaded = lenient
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise BlueprintError(
            f"{shown}: front matter must be a mapping of fields (name:, description:, ...), "
            f"got {_kind(loaded)}; write one 'field: value' per line between the --- lines"
        )
    for key in loaded:
        if not isinstance(key, str):
            raise BlueprintError(
                f"{shown}: front matter field name {key!r} is not text; "
                "field names are words such as name, description, params"
            )
    return loaded


def _yaml_problem(exc: yaml.YAMLError, shown: str) -> str:
    where, problem = "", str(exc)
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        if mark is not None:
            where = f"line {mark.line + 2}: "  # the YAML starts on the line after the first ---
        problem = exc.problem or exc.context or problem
    return (
        f"{shown}: {where}malformed YAML front matter ({problem}); fix the YAML between the "
        "--- lines (quote a value that contains ': ' or starts with a special character)"
    )


def _lenient_fields(source: str) -> dict[str, object] | None:
    """Read front matter the way Claude Code tolerates it: every line ``key: value`` at column 0,
    where a value strict YAML rejects or reads as a mapping is kept as plain text. None unless
    the whole block has that form and no odd value starts with a YAML indicator."""
    fields: dict[str, object] = {}
    for line in source.split("\n"):
        if not line.strip() or line.startswith("#"):
            continue
        match = _SIMPLE_FIELD.fullmatch(line.rstrip())
        if match is None:
            return None
        value = (match["value"] or "").strip()
        try:
            parsed: object = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = _UNPARSED
        if parsed is _UNPARSED or isinstance(parsed, dict):
            if value.startswith(_YAML_INDICATORS):
                return None
            parsed = value
        fields[match["key"]] = parsed
    return fields


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return f"a boolean ({stringify(value)})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _field_error(shown: str, name: str, expected: str, value: object) -> BlueprintError:
    return BlueprintError(
        f"{shown}: front matter field '{name}' must be {expected}, got {_kind(value)}; "
        "fix or remove it"
    )


def _optional_str(
    fields: Mapping[str, object], key: str, shown: str, prefix: str = ""
) -> str | None:
    value = fields.get(key)
    if value is None or isinstance(value, str):
        return value
    raise _field_error(shown, prefix + key, "a string", value)


def _tools(value: object, shown: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        items = value
    else:
        raise _field_error(
            shown, "tools", "a list of tool names or one comma-separated string", value
        )
    return tuple(item.strip() for item in items if item.strip())


def _entries(value: object, name: str, shown: str) -> list[tuple[object, object]]:
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, list):
        return [(item, None) for item in value]
    raise _field_error(shown, name, "a mapping or a list of names", value)


def _spec_fields(
    spec: object, where: str, keys: tuple[str, ...], shown: str
) -> Mapping[str, object]:
    """A param's or output's spec as a mapping: ``None`` and a bare string (the description)
    are short forms; unknown keys are errors, because they are phalanx's own."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        return {"description": spec}
    if not isinstance(spec, dict):
        raise _field_error(shown, where, f"a description or a mapping of {', '.join(keys)}", spec)
    unknown = sorted(str(key) for key in spec if key not in keys)
    if unknown:
        raise BlueprintError(
            f"{shown}: front matter field '{where}' has unknown key(s) {', '.join(unknown)}; "
            f"it takes {', '.join(keys)}"
        )
    return spec


def _declared_params(value: object, shown: str) -> dict[str, ParamSpec]:
    if value is None:
        return {}
    params: dict[str, ParamSpec] = {}
    for name, spec in _entries(value, "params", shown):
        if not isinstance(name, str) or not _PARAM_NAME.fullmatch(name):
            raise BlueprintError(
                f"{shown}: parameter name {name!r} in front matter field 'params' is not "
                "UPPER_SNAKE; rename it (e.g. ORGANIZATION_ID) here and in the body's placeholders"
            )
        where = f"params.{name}"
        spec_fields = _spec_fields(spec, where, ("description", "default"), shown)
        default = spec_fields.get("default")
        if default is not None and not isinstance(default, str | int | float | bool):
            raise _field_error(shown, f"{where}.default", "a string, number or boolean", default)
        params[name] = ParamSpec(
            name,
            _optional_str(spec_fields, "description", shown, f"{where}.") or "",
            None if default is None else stringify(default),
        )
    return params


def _declared_outputs(value: object, shown: str) -> list[ExpectedOutput]:
    if value is None:
        return []
    outputs: list[ExpectedOutput] = []
    for name, spec in _entries(value, "outputs", shown):
        relative = isinstance(name, str) and name.strip() and not name.startswith("/")
        if not relative or ".." in PurePosixPath(str(name)).parts:
            raise BlueprintError(
                f"{shown}: expected output {name!r} in front matter field 'outputs' must be a "
                "path inside the output directory (relative, no '..'); fix the file name"
            )
        where = f"outputs.{name}"
        spec_fields = _spec_fields(spec, where, ("description", "schema"), shown)
        outputs.append(
            ExpectedOutput(
                str(name),
                _optional_str(spec_fields, "description", shown, f"{where}.") or "",
                _optional_str(spec_fields, "schema", shown, f"{where}."),
            )
        )
    return outputs


def _under_claude_agents(path: Path) -> bool:
    parts = path.parts
    return any(parts[i : i + 2] == (".claude", "agents") for i in range(len(parts) - 1))


# --- Markdown sections (POMASA) -----------------------------------------------------------------

_HEADING = re.compile(r" {0,3}(?P<hashes>#{1,6})[ \t]*(?P<title>.*?)[ \t#]*")
_FENCE = re.compile(r" {0,3}(?:`{3,}|~{3,})")
_ENUMERATOR = re.compile(r"^(?:\d+(?:\.\d+)*[.)、]?|[一二三四五六七八九十]+[、.．])\s*")
_BOLD_LABEL = re.compile(r"\s*(?:[-*+]\s+)?\*\*(?P<label>[^*]+?)\*\*\s*[:：]?\s*(?P<rest>.*)")
_BACKTICKED = re.compile(r"`([^`]+)`")
_PATH_LIKE = re.compile(r"[/.{]")
_LIST_ITEM = re.compile(r"\s*(?:[-*+]|\d+[.)、])\s+(?:\[[ xX]\]\s+)?(?P<text>.+?)\s*")
_PARAM_ITEM = re.compile(
    r"\s*(?:[-*+]|\d+[.)、])\s+(?:\*\*)?`?\{?(?P<name>[A-Z][A-Z0-9_]*)\}?`?(?:\*\*)?"
    r"(?=[\s:：（(]|$)\s*(?:[:：]|[-–—](?=\s))?\s*(?P<description>.*?)\s*"
)
_TREE_BRANCH = re.compile(r"(?:├──|└──|\|--|`--|\+--)[─-]*\s*(?P<entry>.*)")
_TREE_COMMENT = re.compile(r"\s+(?:#|//|<-|←)\s*")

_PARAMS_TITLES = frozenset({"输入参数", "参数", "input parameters", "parameters"})
_LOCATION_TITLES = frozenset({"输出位置", "输出目录", "output location", "output directory"})
_FORMAT_TITLES = frozenset({"输出格式", "输出结构", "output format", "output structure"})
_CRITERIA_TITLES = frozenset(
    {"完成标准", "验收标准", "completion standards", "completion criteria", "acceptance criteria"}
)


def _normalize_title(title: str) -> str:
    """Headings and labels match whatever their whitespace, case, numbering or trailing colon."""
    title = title.strip().strip("*").strip().rstrip(":：").strip()
    return " ".join(_ENUMERATOR.sub("", title, count=1).split()).casefold()


class _Markdown:
    """The lines of a body, which of them are code (inside or fencing a code block), and its
    headings outside code: line index -> (level, title)."""

    def __init__(self, text: str) -> None:
        self.lines = text.split("\n")
        self.code: list[bool] = []
        self.headings: dict[int, tuple[int, str]] = {}
        fence: str | None = None
        for index, line in enumerate(self.lines):
            opener = _FENCE.match(line)
            if fence is None and opener:
                fence = opener.group().strip()[:3]
            elif fence is not None and line.strip().startswith(fence):
                fence = None
            elif fence is None and (heading := _HEADING.fullmatch(line)) and heading["title"]:
                self.headings[index] = (len(heading["hashes"]), heading["title"])
            self.code.append(fence is not None or opener is not None)

    def region_end(self, start: int, level: int = 6) -> int:
        """Index of the first heading after ``start`` of ``level`` or higher (or the end)."""
        return next(
            (i for i, (lvl, _) in self.headings.items() if i > start and lvl <= level),
            len(self.lines),
        )

    def markers(self, titles: frozenset[str]) -> Iterator[tuple[int, int, str]]:
        """Headings and bold labels (``**Output Location**: rest``) titled one of ``titles``, in
        order: (line index, end of what they govern, text after a label on its line)."""
        for index, line in enumerate(self.lines):
            if self.code[index]:
                continue
            if index in self.headings:
                level, title = self.headings[index]
                if _normalize_title(title) in titles:
                    yield index, self.region_end(index, level), ""
            elif (label := _BOLD_LABEL.fullmatch(line)) and _normalize_title(
                label["label"]
            ) in titles:
                yield index, self.region_end(index), label["rest"]

    def section(self, titles: frozenset[str]) -> range | None:
        """The lines under the first heading titled one of ``titles``."""
        for index, (level, title) in self.headings.items():
            if _normalize_title(title) in titles:
                return range(index + 1, self.region_end(index, level))
        return None

    def code_blocks(self, lines: range) -> Iterator[list[str]]:
        block: list[str] | None = None
        for index in lines:
            if not self.code[index]:
                continue
            if _FENCE.match(self.lines[index]):
                if block is not None:
                    yield block
                block = None if block is not None else []
            elif block is not None:
                block.append(self.lines[index])

    def title_and_summary(self) -> tuple[str | None, str]:
        """The first ``# Heading`` and the paragraph right under it (empty when a heading or a
        code block comes first)."""
        for index, (level, title) in self.headings.items():
            if level != 1:
                continue
            paragraph: list[str] = []
            for i in range(index + 1, len(self.lines)):
                text = self.lines[i].strip()
                if self.code[i] or i in self.headings or (paragraph and not text):
                    break
                if text:
                    paragraph.append(text)
            return title, " ".join(paragraph)
        return None, ""


def _section_params(doc: _Markdown) -> dict[str, ParamSpec] | None:
    lines = doc.section(_PARAMS_TITLES)
    if lines is None:
        return None
    params: dict[str, ParamSpec] = {}
    for index in lines:
        match = None if doc.code[index] else _PARAM_ITEM.fullmatch(doc.lines[index])
        if match:
            params.setdefault(match["name"], ParamSpec(match["name"], match["description"]))
    return params


def _completion_criteria(doc: _Markdown) -> tuple[str, ...] | None:
    lines = doc.section(_CRITERIA_TITLES)
    if lines is None:
        return None
    items = (None if doc.code[i] else _LIST_ITEM.fullmatch(doc.lines[i]) for i in lines)
    return tuple(item["text"] for item in items if item)


def _output_location(doc: _Markdown) -> str | None:
    """The path after an output-location label, or on the first non-empty line it governs:
    in backticks, or a bare word; None when that line holds prose."""
    for start, end, rest in doc.markers(_LOCATION_TITLES):
        candidates = [rest, *(doc.lines[i] for i in range(start + 1, end))]
        text = next((c.strip() for c in candidates if c.strip() and not _FENCE.match(c)), "")
        if quoted := _BACKTICKED.search(text):
            return quoted.group(1).strip()
        word = re.sub(r"^[-*+]\s+", "", text)
        if _PATH_LIKE.search(word) and not word.split()[1:]:
            return word
    return None


def _tree_outputs(doc: _Markdown) -> tuple[str | None, list[ExpectedOutput]]:
    """The files of the first file tree in a code block under an output-format label or heading,
    and the tree's root line."""
    for start, end, _ in doc.markers(_FORMAT_TITLES):
        for block in doc.code_blocks(range(start + 1, end)):
            if tree := _parse_tree(block):
                return tree
    return None, []


def _parse_tree(block: list[str]) -> tuple[str | None, list[ExpectedOutput]] | None:
    root: str | None = None
    entries: list[tuple[int, str, str]] = []  # (column of the branch, name, comment)
    for line in block:
        branch = _TREE_BRANCH.search(line)
        if branch is None:
            if root is None and not entries and line.strip():
                root = _split_comment(line)[0]
            continue
        name, comment = _split_comment(branch["entry"])
        if name.strip(".…"):
            entries.append((branch.start(), name, comment))
    if not entries:
        return None
    files: list[ExpectedOutput] = []
    parents: list[tuple[int, str]] = []
    for position, (column, name, comment) in enumerate(entries):
        while parents and parents[-1][0] >= column:
            parents.pop()
        has_children = position + 1 < len(entries) and entries[position + 1][0] > column
        if name.endswith("/") or has_children:
            parents.append((column, name.rstrip("/")))
        else:
            path = "/".join([*(parent for _, parent in parents), name])
            if all(output.name != path for output in files):
                files.append(ExpectedOutput(path, comment))
    return (root if root and root.endswith("/") else None), files


def _split_comment(text: str) -> tuple[str, str]:
    name, *comment = _TREE_COMMENT.split(text.strip(), maxsplit=1)
    return name.strip(), "".join(comment).strip()
