"""The two template languages phalanx reads.

*Prompt templates* (blueprint bodies) replace only ``{UPPER_SNAKE}`` placeholders and leave every
other brace alone, so a JSON example in a prompt survives rendering, nested objects included
(``{"a": {"b": 1}}``). To write a placeholder literally, double its braces: ``{{PERIOD}}``
renders as ``{PERIOD}``. Doubled braces around anything else are left as written, because they
escape nothing there and JSON is full of ``}}``.

*Config templates* (output paths, partition keys, parameter mappings, command argv elements)
treat every ``{name}`` as a reference: a typo is an error, never silently kept. Names may be
any identifier (partition fields are often lower case: ``{id}``); ``{{`` and ``}}`` are literal.

Both are strict: a missing value raises :class:`TemplateKeyError` naming what is missing, and the
caller turns it into a user-facing error that also names the file and the partition.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

__all__ = [
    "TemplateKeyError",
    "TemplateSyntaxError",
    "config_placeholders",
    "prompt_placeholders",
    "render_config",
    "render_prompt",
    "stringify",
]

_PROMPT_TOKEN = re.compile(r"\{\{([A-Z][A-Z0-9_]*)\}\}|\{([A-Z][A-Z0-9_]*)\}")
_CONFIG_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class TemplateKeyError(KeyError):
    """A template refers to a name that has no value. ``name`` is the missing name."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class TemplateSyntaxError(ValueError):
    """A config template has an unmatched brace or a placeholder that is not an identifier."""


def stringify(value: object) -> str:
    """How a parameter value appears in text: strings as they are, ``None`` as empty, booleans
    in lower case (as YAML and JSON spell them), everything else by ``str``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def prompt_placeholders(text: str) -> list[str]:
    """The ``{UPPER_SNAKE}`` names a prompt template uses, in order of first appearance."""
    seen: dict[str, None] = {}
    for match in _PROMPT_TOKEN.finditer(text):
        if match.group(2):
            seen.setdefault(match.group(2), None)
    return list(seen)


def render_prompt(text: str, values: Mapping[str, object]) -> str:
    """Replace each ``{UPPER_SNAKE}`` with its value; ``{{NAME}}`` becomes ``{NAME}``.

    Raises :class:`TemplateKeyError` for the first placeholder without a value.
    """

    def one(match: re.Match[str]) -> str:
        if match.group(1):
            return "{" + match.group(1) + "}"
        name = match.group(2)
        if name not in values:
            raise TemplateKeyError(name)
        return stringify(values[name])

    return _PROMPT_TOKEN.sub(one, text)


def config_placeholders(text: str) -> list[str]:
    """The names a config template refers to, in order of first appearance.

    Raises :class:`TemplateSyntaxError` for an unmatched brace or a non-identifier placeholder.
    """
    return list(dict.fromkeys(name for name in _compile(text)[1::2]))


def render_config(text: str, values: Mapping[str, object]) -> str:
    """Replace every ``{name}`` with its value.

    Raises :class:`TemplateSyntaxError` for malformed templates and :class:`TemplateKeyError`
    for the first name without a value.
    """
    parts = _compile(text)
    if len(parts) == 1:
        return parts[0]
    out = [parts[0]]
    for index in range(1, len(parts), 2):
        name = parts[index]
        try:
            value = values[name]
        except KeyError:
            raise TemplateKeyError(name) from None
        out.append(stringify(value))
        out.append(parts[index + 1])
    return "".join(out)


_ESCAPES = {"{{": "{", "}}": "}"}


@functools.lru_cache(maxsize=1024)
def _compile(text: str) -> tuple[str, ...]:
    """A config template as alternating literal text and names: ``(lit, name, lit, ...)``.

    Templates repeat for every instance of a stage; parsing each once keeps planning cheap.
    """
    parts: list[str] = []
    literal: list[str] = []
    position = 0
    for match in _CONFIG_TOKEN.finditer(text):
        literal.append(text[position : match.start()])
        position = match.end()
        piece = match.group(0)
        if piece in _ESCAPES:
            literal.append(_ESCAPES[piece])
            continue
        name = match.group(1)
        if name is None:
            raise TemplateSyntaxError(
                f"unmatched {piece!r} in {text!r}; write {piece * 2!r} for a literal brace"
            )
        if not _IDENTIFIER.match(name):
            raise TemplateSyntaxError(
                f"{{{name}}} in {text!r} is not a parameter name "
                "(letters, digits and underscores); write '{{' and '}}' for literal braces"
            )
        parts += ["".join(literal), name]
        literal = []
    literal.append(text[position:])
    parts.append("".join(literal))
    return tuple(parts)
