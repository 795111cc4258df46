"""Mechanical checks on an instance's output files: the checkable items of a blueprint's
completion criteria (``## 完成标准``), written in a stage's ``checks:`` and applied to every
attempt before it commits, after the expected files and their schemas.

A check names one file and says what must hold of it:

``field: activities[].source``
    JSON: the dotted path exists. ``[]`` steps into every element of a list, so the example
    asks every activity for a ``source``.
``min_items: 3``
    JSON: the value at ``field`` (the whole document without one) is a list or an object with
    at least that many entries; with ``[]`` in the path, each value found.
``contains: "## Missing"``
    Text: the file contains this string.
``min_words: 300``
    Text: at least this many words; each CJK character counts as one, as Chinese counts 字数.

The checks only read files; they run no program. Anything they cannot express is a reviewer's
job (``review:``), or a ``check:`` command's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from ._config import CheckSpec

__all__ = ["check_problems", "count_words"]

_WORD = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W\u3400-\u9fff]+(?:['’-]\w+)*")
_MISSING = object()


def count_words(text: str) -> int:
    """Words in ``text``: runs of letters and digits, and each CJK character on its own."""
    return len(_WORD.findall(text))


def check_problems(root: Path, name: str, checks: Sequence[CheckSpec]) -> list[str]:
    """What is wrong with file ``name`` (relative to ``root``) under ``checks``: one line per
    failed condition, quoting its check's criterion; empty when all hold. The file is read,
    and parsed as JSON, once; a top-level field found missing is said once, not again by
    each later check under it."""
    criteria = [check.criterion for check in checks if check.criterion]
    said = f" (criterion: {'; '.join(dict.fromkeys(criteria))})" if criteria else ""
    try:
        data = (root / name).read_bytes()
    except FileNotFoundError:
        return [f"{name}: missing{said}"]
    except OSError as exc:
        return [f"{name}: cannot be read ({exc.strerror}){said}"]
    document: object = _MISSING
    gone: set[str] = set()  # top-level fields found missing
    problems: list[str] = []
    for check in checks:
        because = f" (criterion: {check.criterion})" if check.criterion else ""
        found: list[str] = []
        if check.field is not None or check.min_items is not None:
            if document is _MISSING:
                try:
                    document = json.loads(data)
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    return [f"{name}: not valid JSON ({exc}){said}"]
            top = _steps(check.field)[0] if check.field is not None else None
            if top in gone:
                continue
            found += _json_problems(document, check)
            if top is not None and not (isinstance(document, Mapping) and top in document):
                gone.add(top)
        if check.contains is not None or check.min_words is not None:
            text = data.decode("utf-8", "replace")
            if check.contains is not None and check.contains not in text:
                found.append(f"does not contain {check.contains!r}")
            if check.min_words is not None and (words := count_words(text)) < check.min_words:
                found.append(f"has {words} words, fewer than {check.min_words}")
        problems += [f"{name}: {problem}{because}" for problem in found]
    return problems


def _json_problems(document: object, check: CheckSpec) -> list[str]:
    path = check.field
    found = [document] if path is None else list(_resolve(document, _steps(path)))
    problems: list[str] = []
    absent = sum(value is _MISSING for value in found)
    if absent:
        where = "" if absent == len(found) == 1 else f" in {absent} of {len(found)} places"
        problems.append(f"field {path!r} is missing{where}")
    if check.min_items is not None:
        what = "the document" if path is None else f"field {path!r}"
        for value in found:
            if value is _MISSING:
                continue
            if not isinstance(value, list | dict):
                problems.append(f"{what} is not a list or an object")
                break
            if len(value) < check.min_items:
                problems.append(f"{what} has {len(value)} entries, fewer than {check.min_items}")
                break
    return problems


def _steps(path: str) -> list[str]:
    """``a.b[].c`` -> ``["a", "b", "[]", "c"]``."""
    steps: list[str] = []
    for part in path.split("."):
        name, brackets = part.removesuffix("[]"), part.endswith("[]")
        if name:
            steps.append(name)
        if brackets:
            steps.append("[]")
    return steps


def _resolve(value: object, steps: Sequence[str]) -> Iterator[object]:
    if not steps:
        yield value
        return
    step, rest = steps[0], steps[1:]
    if step == "[]":
        if isinstance(value, list):  # an empty list: nothing to ask of its elements
            for item in value:
                yield from _resolve(item, rest)
        else:
            yield _MISSING
    elif isinstance(value, Mapping) and step in value:
        yield from _resolve(value[step], rest)
    else:
        yield _MISSING
