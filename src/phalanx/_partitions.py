"""Partition sources, and what makes a partition key safe.

A source is exactly one of: a data file (``from:`` JSON, YAML, JSONL, CSV or TSV), a directory
glob (one partition per matching file), an inline list (``items:``) or a Python callable
(``call:``). Each row becomes a :class:`Partition`. Its key names the partition's output
directory, so it must be a safe path segment and unique in its source; its fields are kept exactly
as the source gave them (only keys are restricted, values never reach a shell or a path unchecked).

Every problem is a :class:`~phalanx.PartitionError` (or :class:`~phalanx.PartitionKeyError` for
keys) whose message names the file as the user wrote it, or the place the source was declared, then
the row ("item 3", "member 'org_1'", "line 7", "file 'src/a.py'"), and says the fix.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import csv
import importlib
import inspect
import io
import json
import math
import re
import sys
import unicodedata
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal, NamedTuple, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from phalanx._errors import PartitionError, PartitionKeyError
from phalanx._imports import forget_foreign
from phalanx._templates import (
    TemplateKeyError,
    TemplateSyntaxError,
    config_placeholders,
    render_config,
    stringify,
)

__all__ = [
    "MAX_KEY_LENGTH",
    "Partition",
    "PartitionSource",
    "check_unique",
    "load_partitions",
    "validate_key",
]

MAX_KEY_LENGTH = 128
"""The longest key, in characters. Keys are also refused above 255 bytes of UTF-8 (the usual limit
of one file name)."""

_MAX_KEY_BYTES = 255
_FORMATS: dict[str, Literal["json", "yaml", "jsonl", "csv", "tsv"]] = {
    ".json": "json",
    ".yaml": "yaml",
    ".yml": "yaml",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
}
_SCALARS = (str, int, float, bool)
_KEY_FIX = "keys name output directories: fix the value, or set `key:` to a field or a template"


class PartitionSource(BaseModel):
    """Where a stage's partitions come from: exactly one of ``from``, ``glob``, ``items``, ``call``.

    ``from``
        A data file, relative to the project directory; its format comes from the extension
        (``.json``, ``.yaml``/``.yml``, ``.jsonl``/``.ndjson``, ``.csv``, ``.tsv``) unless
        ``format`` says otherwise. JSON and YAML hold a list of rows, an object wrapping one
        (``list: organizations``, or a dotted path ``list: data.items``), or an object keyed by
        partition (each member a row with the extra field ``key``: the member's name). JSONL
        holds one object per line; CSV and TSV a header row, and every value is a string.
    ``glob``
        A pattern relative to the project directory (``src/**/*.py``; ``**`` recurses): one
        partition per matching file, sorted by path, with the fields ``path`` (relative, with
        ``/``), ``name``, ``stem`` and ``slug`` (the path without its suffix, ``/`` written as
        ``-``: ``src/pkg/mod.py`` -> ``src-pkg-mod``, for trees where stems repeat).
    ``items``
        An inline list of objects, or of scalars (each becomes the fields ``{"value": v}``).
    ``call``
        A callable ``module:function`` (or ``module:obj.attr``) taking no arguments and returning
        an iterable of mappings or scalars. The project directory is on ``sys.path`` while it is
        imported and called. An ``async def`` function (or an async generator) is run with
        ``asyncio.run``, which needs a thread without a running event loop: from async code,
        call :func:`load_partitions` through ``asyncio.to_thread``.

    ``key`` is a field name (``id``) or a config template over fields (``{country}-{id}``). By
    default it is the member name (keyed objects), the value (scalars), the stem (glob) or the
    field ``id`` (objects). ``priority`` names a numeric field (default: ``priority`` where a row
    has it). ``where`` keeps only rows whose fields equal the given values; a string field also
    matches a number or boolean spelled the same way, so ``{year: 2024}`` works on CSV.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    from_: str | None = Field(None, alias="from")
    format: Literal["json", "yaml", "jsonl", "csv", "tsv"] | None = None
    list: str | None = None
    glob: str | None = None
    items: builtins.list[Any] | None = None
    call: str | None = None
    key: str | None = None
    priority: str | None = None
    where: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        kinds = {"from": self.from_, "glob": self.glob, "items": self.items, "call": self.call}
        given = [name for name, value in kinds.items() if value is not None]
        if len(given) != 1:
            found = f" (found {', '.join(given)})" if given else ""
            raise ValueError(f"set exactly one of `from`, `glob`, `items`, `call`{found}")
        for name in ("from", "glob", "call"):
            if kinds[name] is not None and not str(kinds[name]).strip():
                raise ValueError(f"`{name}` is empty")
        if self.from_ is None:
            for name, value in (("format", self.format), ("list", self.list)):
                if value is not None:
                    raise ValueError(f"`{name}` applies only to a `from:` file")
        if self.key is not None:
            if not self.key.strip():
                raise ValueError("`key` is empty: write a field name or a template such as `{id}`")
            if "{" in self.key or "}" in self.key:
                try:
                    config_placeholders(self.key)
                except TemplateSyntaxError as exc:
                    raise ValueError(f"`key`: {exc}") from exc
        return self


@dataclass(frozen=True)
class Partition:
    """One independent unit of input.

    ``fields`` are the row's values as the source gave them; ``index`` is the row's position in its
    source (0-based, counted before ``where`` filtering), for stable ordering; ``row`` names the
    row in messages ("item 3", "line 7", "member 'org_1'", "file 'src/a.py'").
    """

    key: str
    fields: Mapping[str, Any]
    priority: float = 0.0
    index: int = 0
    row: str = field(default="", compare=False)


class _Row(NamedTuple):
    label: str
    fields: dict[str, Any]
    default_key: str | None  # None: an object row, keyed by a field


def load_partitions(
    source: PartitionSource, *, project_dir: Path, origin: str = "partitions"
) -> list[Partition]:
    """Rows in source order (a glob's files sorted by path).

    ``origin`` names where the source was declared (e.g. ``"pipeline.yaml: stage 'research':
    partitions"``) and starts every error message that is not about a specific file.

    Raises :class:`PartitionError` when the source cannot be read or a row is malformed, and
    :class:`PartitionKeyError` when a key is missing, unsafe or not unique.
    """
    if source.from_ is not None:
        prefix = source.from_
        rows = _file_rows(source, project_dir, origin)
    elif source.glob is not None:
        prefix = f"{origin}.glob"
        rows = _glob_rows(source.glob, project_dir, prefix)
    elif source.items is not None:
        prefix = f"{origin}.items"
        rows = [_row(item, f"item {n}", prefix) for n, item in enumerate(source.items, 1)]
    else:  # the validator guarantees exactly one kind
        prefix = f"{origin}.call"
        rows = _call_rows(source.call or "", project_dir, prefix)

    indexed = list(enumerate(rows))
    if source.where:
        _check_fields_exist("where", source.where, rows, prefix)
        indexed = [(i, row) for i, row in indexed if _matches(row.fields, source.where)]
    kept = [row for _, row in indexed]
    key_of = _key_function(source.key, kept, prefix)
    priority_field = source.priority or "priority"
    if source.priority:
        _check_fields_exist("priority", [source.priority], kept, prefix)
    partitions = [
        Partition(
            key=key_of(row),
            fields=row.fields,
            priority=_priority(row.fields.get(priority_field), f"{prefix}: {row.label}"),
            index=index,
            row=row.label,
        )
        for index, row in indexed
    ]
    try:
        check_unique(partitions, where=prefix)
    except PartitionKeyError as exc:
        if source.glob is None or source.key is not None:
            raise
        raise PartitionKeyError(f"{exc}: `key: '{{slug}}'` (the path) does") from exc
    return partitions


def validate_key(key: str) -> str | None:
    """Return None when ``key`` is a safe path segment, else the reason in words.

    Safe: not empty; no ``/`` or ``\\``; no ``..`` anywhere; no control character (NUL, newline,
    tab, ...) or lone surrogate; no leading ``.``; no leading or trailing whitespace; at most
    :data:`MAX_KEY_LENGTH` characters and 255 bytes of UTF-8.
    """
    if not key:
        return "it is empty"
    if "/" in key or "\\" in key:
        return "it contains a path separator ('/' or '\\')"
    if ".." in key:
        return "it contains '..'"
    for char in key:
        if unicodedata.category(char) == "Cc":
            return f"it contains the control character {char!r}"
        if unicodedata.category(char) == "Cs":
            return f"it contains {char!r}, a lone surrogate that is not valid text"
    if key.startswith("."):
        return "it starts with '.' (a hidden name)"
    if key != key.strip():
        return "it starts or ends with whitespace"
    if len(key) > MAX_KEY_LENGTH:
        return f"it is {len(key)} characters long (at most {MAX_KEY_LENGTH})"
    if len(key.encode("utf-8")) > _MAX_KEY_BYTES:
        return f"it is {len(key.encode('utf-8'))} bytes of UTF-8 (at most {_MAX_KEY_BYTES})"
    return None


def check_unique(partitions: Sequence[Partition], *, where: str) -> None:
    """Raise :class:`PartitionKeyError` naming both rows of the first duplicate key.

    Keys that differ only in letter case or Unicode normalization count as duplicates: on macOS
    and Windows they name the same directory.
    """
    seen: dict[str, Partition] = {}
    for partition in partitions:
        first = seen.setdefault(_fold(partition.key), partition)
        if first is partition:
            continue
        what = (
            f"duplicate partition key {_show(first.key)}"
            if first.key == partition.key
            else f"partition keys {_show(first.key)} and {_show(partition.key)} differ only in "
            "letter case or Unicode form, so they name the same directory on macOS and Windows"
        )
        raise PartitionKeyError(
            f"{where}: {what} ({_row_name(first)} and {_row_name(partition)}); keys must be "
            "unique because each names an output directory: set `key:` to a field or a "
            "template that tells them apart"
        )


# --- keys and priorities ---------------------------------------------------------------------


def _key_function(key: str | None, rows: Sequence[_Row], prefix: str) -> Callable[[_Row], str]:
    if key is None:
        missing = next((r for r in rows if r.default_key is None and "id" not in r.fields), None)
        if missing is not None:
            raise PartitionKeyError(
                f"{prefix}: no key: set `key:` to a field name or a template such as `{{name}}` "
                f"({missing.label} has no field `id`; its fields: {_field_list(missing.fields)})"
            )

    def key_of(row: _Row) -> str:
        where = f"{prefix}: {row.label}"
        spec = key or "id"
        if key is None and row.default_key is not None:
            raw = row.default_key
        elif "{" in spec or "}" in spec:
            for name in config_placeholders(spec):
                if name in row.fields:
                    _check_key_value(
                        row.fields[name], f"{where}: field {name!r} in the key {spec!r}"
                    )
            try:
                raw = render_config(spec, row.fields)
            except TemplateKeyError as exc:
                raise PartitionKeyError(
                    f"{where}: the key template {spec!r} refers to {{{exc.name}}}, which this row "
                    f"does not have; its fields: {_field_list(row.fields)}"
                ) from exc
        else:
            if spec not in row.fields:
                raise PartitionKeyError(
                    f"{where}: no field {spec!r} for the key; its fields: "
                    f"{_field_list(row.fields)}; set `key:` to one of them or to a template"
                )
            raw = _check_key_value(row.fields[spec], f"{where}: key field {spec!r}")
        reason = validate_key(raw)
        if reason is not None:
            raise PartitionKeyError(
                f"{where}: key {_show(raw)} is not a safe directory name: {reason}; {_KEY_FIX}"
            )
        return raw

    return key_of


def _check_key_value(value: object, where: str) -> str:
    if value is None or not isinstance(value, _SCALARS):
        raise PartitionKeyError(
            f"{where} is {_describe(value)}; a key must be a string or a number: {_KEY_FIX}"
        )
    return stringify(value)


def _priority(value: object, where: str) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        return 0.0
    number = math.nan
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        with contextlib.suppress(ValueError, OverflowError):
            number = float(value)
    if not math.isfinite(number):
        raise PartitionError(
            f"{where}: priority {_show(value)} is not a finite number; write a number such as "
            "10, or leave it empty for 0"
        )
    return number


def _check_fields_exist(
    setting: str, names: Iterable[str], rows: Sequence[_Row], prefix: str
) -> None:
    """A `where:` or `priority:` field that no row has is a typo, not an empty or flat stage."""
    for name in names:
        if rows and not any(name in row.fields for row in rows):
            raise PartitionError(
                f"{prefix}: `{setting}:` names the field {name!r}, which no row has; fields of "
                f"{rows[0].label}: {_field_list(rows[0].fields)}"
            )


def _matches(fields: Mapping[str, Any], where: Mapping[str, Any]) -> bool:
    return all(name in fields and _equal(fields[name], want) for name, want in where.items())


def _equal(value: object, want: object) -> bool:
    if isinstance(value, str) and not isinstance(want, str | dict | builtins.list):
        return value == stringify(want)  # CSV cells are strings: "2024" matches 2024
    return bool(value == want) and isinstance(value, bool) == isinstance(want, bool)


# --- files ---------------------------------------------------------------------------------------


def _file_rows(source: PartitionSource, project_dir: Path, origin: str) -> list[_Row]:
    name = str(source.from_)
    path = project_dir / name
    fmt = source.format or _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise PartitionError(
            f"{name}: cannot tell the format from the extension {path.suffix or '(none)'!r}; "
            "set `format:` to one of json, yaml, jsonl, csv, tsv"
        )
    if source.list is not None and fmt not in ("json", "yaml"):
        raise PartitionError(f"{name}: `list:` applies to JSON and YAML files, not {fmt}")
    try:
        data = path.read_bytes()
        text = data.decode("utf-8-sig")
    except FileNotFoundError as exc:
        raise PartitionError(
            f"{name}: partition file not found ({origin}.from); check the path, which is "
            f"relative to the project directory {project_dir}"
        ) from exc
    except IsADirectoryError as exc:
        raise PartitionError(
            f"{name}: is a directory, not a partition file; for one partition per file use "
            "`glob:` (such as 'dir/*.md')"
        ) from exc
    except OSError as exc:
        raise PartitionError(f"{name}: cannot read the partition file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PartitionError(
            f"{name}: line {line}: not UTF-8 text (byte {exc.start}); save the file as UTF-8"
        ) from exc

    if fmt == "json":
        return _document_rows(_load_json(text, name), source.list, name)
    if fmt == "yaml":
        return _document_rows(_load_yaml(text, name), source.list, name)
    if fmt == "jsonl":
        return [
            _row(
                _load_json(line, f"{name}: line {n}", one_line=True),
                f"line {n}",
                name,
                scalars=False,
            )
            for n, line in enumerate(text.split("\n"), 1)
            if line.strip()
        ]
    return _csv_rows(text, name, fmt)


def _document_rows(data: object, list_path: str | None, name: str) -> list[_Row]:
    """Rows of a parsed JSON or YAML document: a list, a wrapped list, or an object keyed by id."""
    if list_path is not None:
        data = _walk(data, list_path, name)
    if isinstance(data, builtins.list):
        return [_row(item, f"item {n}", name) for n, item in enumerate(data, 1)]
    if not isinstance(data, dict):
        raise PartitionError(
            f"{name}: the top level is {_describe(data)}; expected a list of partitions, an "
            "object wrapping one (with `list:`), or an object keyed by partition"
        )
    candidates = [str(k) for k, v in data.items() if isinstance(v, builtins.list)]
    if candidates:
        raise PartitionError(
            f"{name}: the top level is an object holding the list field(s) "
            f"{', '.join(map(repr, candidates))}: set `list: {candidates[0]}` to read the "
            "partitions from it"
        )
    rows = []
    for member, value in data.items():
        member_key = stringify(member)
        label = f"member {member_key!r}"
        if isinstance(value, Mapping):
            rows.append(_Row(label, {"key": member_key, **_fields(value)}, member_key))
        else:
            rows.append(_Row(label, {"key": member_key, "value": value}, member_key))
    return rows


def _walk(data: object, list_path: str, name: str) -> builtins.list[Any]:
    parts = list_path.split(".")
    for depth, part in enumerate(parts):
        here = ".".join(parts[:depth]) or "the top level"
        if not isinstance(data, dict):
            raise PartitionError(
                f"{name}: `list: {list_path}`: {here} is {_describe(data)}, not an object"
            )
        if part not in data:
            raise PartitionError(
                f"{name}: `list: {list_path}`: no field {part!r} in {here}; its fields: "
                f"{_field_list(data)}"
            )
        data = data[part]
    if not isinstance(data, builtins.list):
        raise PartitionError(
            f"{name}: `list: {list_path}` names {_describe(data)}, not a list of partitions"
        )
    return data


def _row(item: object, label: str, prefix: str, *, scalars: bool = True) -> _Row:
    if isinstance(item, Mapping):
        return _Row(label, _fields(item), None)
    if scalars and isinstance(item, _SCALARS):
        return _Row(label, {"value": item}, stringify(item))
    expected = "an object or a scalar (string, number, boolean)" if scalars else "an object"
    raise PartitionError(f"{prefix}: {label} is {_describe(item)}; expected {expected}")


def _fields(mapping: Mapping[Any, Any]) -> dict[str, Any]:
    return {k if isinstance(k, str) else stringify(k): v for k, v in mapping.items()}


class _DuplicateName(ValueError):
    pass


def _unique_names(pairs: builtins.list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for name, value in pairs:
        if name in obj:
            raise _DuplicateName(name)
        obj[name] = value
    return obj


def _load_json(text: str, where: str, *, one_line: bool = False) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_unique_names)
    except json.JSONDecodeError as exc:
        at = f"column {exc.colno}" if one_line else f"line {exc.lineno}, column {exc.colno}"
        raise PartitionError(f"{where}: malformed JSON at {at}: {exc.msg}") from exc
    except _DuplicateName as exc:
        raise PartitionError(
            f"{where}: the name {exc.args[0]!r} appears twice in one object, and the second "
            "would silently replace the first: remove or rename one"
        ) from exc


class _YamlLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys in a mapping instead of keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            with contextlib.suppress(TypeError):  # unhashable: SafeLoader reports it
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        problem=f"duplicate key {key!r} (first at line {seen[key] + 1}); "
                        "the second would silently replace the first: remove or rename one",
                        problem_mark=key_node.start_mark,
                    )
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str, name: str) -> Any:
    loader = _YamlLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PartitionError(f"{name}: malformed YAML{at}: {problem}") from exc
    finally:
        loader.dispose()
    if data is None:
        raise PartitionError(f"{name}: the file is empty; write a list of partitions ([] for none)")
    return data


def _csv_rows(text: str, name: str, fmt: str) -> list[_Row]:
    delimiter = "\t" if fmt == "tsv" else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows = []
    try:
        header = next(reader, [])
        if not header:
            raise PartitionError(
                f"{name}: line 1: expected a header row naming the columns; the file has none"
            )
        for column, title in enumerate(header, 1):
            if not title.strip() or header.index(title) != column - 1:
                problem = "is empty" if not title.strip() else f"repeats {title!r}"
                raise PartitionError(
                    f"{name}: line 1: header column {column} {problem}; give every column a "
                    "unique name"
                )
        start = reader.line_num + 1
        for record in reader:
            if record:  # a blank line reads as []
                if len(record) != len(header):
                    raise PartitionError(
                        f"{name}: line {start}: {len(record)} columns, but the header has "
                        f"{len(header)}; quote values that contain {delimiter!r}"
                    )
                rows.append(_Row(f"line {start}", dict(zip(header, record, strict=True)), None))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise PartitionError(
            f"{name}: line {reader.line_num}: malformed {fmt.upper()}: {exc}"
        ) from exc
    return rows


# --- globs and callables -------------------------------------------------------------------------


def _glob_rows(pattern: str, project_dir: Path, prefix: str) -> list[_Row]:
    escapes = (
        PurePosixPath(pattern).is_absolute()
        or PureWindowsPath(pattern).drive
        or PureWindowsPath(pattern).root
        or ".." in re.split(r"[\\/]", pattern)
    )
    if escapes:
        raise PartitionError(
            f"{prefix}: {pattern!r} must stay inside the project directory: write a pattern "
            "relative to it, without '..' (such as 'src/**/*.py')"
        )
    try:
        found = sorted(
            path.relative_to(project_dir).as_posix()
            for path in project_dir.glob(pattern)
            if path.is_file()
        )
    except (ValueError, NotImplementedError) as exc:
        raise PartitionError(f"{prefix}: invalid pattern {pattern!r}: {exc}") from exc
    rows = []
    for relative in found:
        path = PurePosixPath(relative)
        slug = "-".join(path.with_suffix("").parts)
        fields = {"path": relative, "name": path.name, "stem": path.stem, "slug": slug}
        rows.append(_Row(f"file {relative!r}", fields, path.stem))
    return rows


def _call_rows(spec: str, project_dir: Path, prefix: str) -> list[_Row]:
    module_name, _, attribute = spec.partition(":")
    if not module_name.strip() or not attribute.strip():
        raise PartitionError(
            f"{prefix}: {spec!r} is not a callable reference; write 'module:function'"
        )
    entry = str(project_dir)
    forget_foreign(module_name, project_dir)
    sys.path.insert(0, entry)
    try:
        function = _import(module_name, attribute, spec, prefix)
        try:
            result = _settle(function(), spec, prefix)
            if isinstance(result, Mapping | str | bytes) or not isinstance(result, Iterable):
                raise PartitionError(
                    f"{prefix}: {spec!r} returned {_describe(result)}; return a list (or any "
                    "iterable) of mappings or scalars"
                )
            items = builtins.list(result)
        except PartitionError:
            raise
        except Exception as exc:
            raise PartitionError(f"{prefix}: {spec!r} raised {type(exc).__name__}: {exc}") from exc
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)
    return [_row(item, f"item {n}", prefix) for n, item in enumerate(items, 1)]


def _import(module_name: str, attribute: str, spec: str, prefix: str) -> Callable[[], object]:
    importlib.invalidate_caches()
    try:
        target: object = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(f"{exc.name}.")):
            raise PartitionError(
                f"{prefix}: cannot import {spec!r}: no module {module_name!r} in the project "
                "directory or the installed packages"
            ) from exc
        raise PartitionError(f"{prefix}: importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise PartitionError(
            f"{prefix}: importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise PartitionError(
                f"{prefix}: {spec!r}: module {module_name!r} has no attribute {attribute!r}"
            ) from exc
    if not callable(target):
        raise PartitionError(f"{prefix}: {spec!r} is {_describe(target)}, not a callable")
    return target


def _settle(result: object, spec: str, prefix: str) -> object:
    """Run an async callable's coroutine, or collect its async generator, to completion."""
    if not inspect.isawaitable(result) and not isinstance(result, AsyncIterable):
        return result
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        if inspect.isawaitable(result):
            return asyncio.run(_await(result))
        return asyncio.run(_collect(result))
    if inspect.iscoroutine(result):
        result.close()  # never awaited on purpose: no "never awaited" warning
    raise PartitionError(
        f"{prefix}: {spec!r} is async, and an event loop is already running in this thread; "
        "load the partitions in a worker thread (asyncio.to_thread)"
    )


async def _await(awaitable: Awaitable[object]) -> object:
    return await awaitable


async def _collect(iterable: AsyncIterable[object]) -> builtins.list[object]:
    return [item async for item in iterable]


# --- wording -------------------------------------------------------------------------------------


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, builtins.list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def _field_list(fields: Mapping[Any, Any]) -> str:
    return ", ".join(map(str, fields)) or "(none)"


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:50]}...' ({len(str(value))} characters)"


def _fold(key: str) -> str:
    return unicodedata.normalize("NFC", key).casefold()


def _row_name(partition: Partition) -> str:
    return partition.row or f"row {partition.index + 1}"
