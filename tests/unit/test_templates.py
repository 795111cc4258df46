"""The two template languages: prompt templates and strict config templates."""

from __future__ import annotations

import pytest

from phalanx._templates import (
    TemplateKeyError,
    TemplateSyntaxError,
    config_placeholders,
    prompt_placeholders,
    render_config,
    render_prompt,
)


def test_prompt_replaces_only_upper_snake_and_keeps_other_braces() -> None:
    """JSON examples (nested ones too) and lower-case braces survive; a doubled placeholder
    renders as the literal placeholder."""
    text = 'Org {ORG_ID}: {"id": 1, "x": {"y": {name}}} {{ORG_ID}} {ORG_ID} {{lit}}'
    expected = 'Org a b: {"id": 1, "x": {"y": {name}}} {ORG_ID} a b {{lit}}'
    assert render_prompt(text, {"ORG_ID": "a b"}) == expected
    assert prompt_placeholders(text) == ["ORG_ID"]


def test_prompt_missing_value_names_it() -> None:
    """A placeholder without a value raises with its name."""
    with pytest.raises(TemplateKeyError) as info:
        render_prompt("{A} {B}", {"A": 1})
    assert info.value.name == "B"


def test_config_is_strict_about_every_name() -> None:
    """In config templates every ``{name}`` must have a value, whatever its case."""
    assert render_config("data/{id}/{PERIOD}", {"id": 3, "PERIOD": "2025-09"}) == "data/3/2025-09"
    assert render_config("{{literal}}", {}) == "{literal}"
    assert render_config("{flag}", {"flag": True}) == "true"
    assert render_config("{none}", {"none": None}) == ""
    with pytest.raises(TemplateKeyError):
        render_config("data/{idd}", {"id": 1})


@pytest.mark.parametrize("text", ["data/{id", "data/id}", "{a-b}", "{}", "{a b}"])
def test_config_syntax_errors(text: str) -> None:
    """Unmatched braces and non-identifier placeholders are refused, values or not."""
    with pytest.raises(TemplateSyntaxError):
        config_placeholders(text)
    with pytest.raises(TemplateSyntaxError):
        render_config(text, {"id": 1, "a": 1})


def test_values_are_not_re_rendered() -> None:
    """A value containing braces is inserted as it is, never rendered again."""
    assert render_config("{a}", {"a": "{b}", "b": "no"}) == "{b}"
    assert render_prompt("{A}", {"A": "{B}", "B": "no"}) == "{B}"
