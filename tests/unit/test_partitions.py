"""Partition sources (file, glob, items, call), keys, priorities, filtering and their errors."""

from __future__ import annotations

import asyncio
import csv
import json
import pickle
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from phalanx._errors import PartitionError, PartitionKeyError, UsageError
from phalanx._partitions import (
    MAX_KEY_LENGTH,
    Partition,
    PartitionSource,
    check_unique,
    load_partitions,
    validate_key,
)

HOSTILE = "a; rm -rf / $(touch pwned) `id` \"dq\" 'sq' \\ back\nline two\r\n  spaced  \t{x} %s"


def load(project: Path, settings: dict[str, Any], origin: str = "partitions") -> list[Partition]:
    return load_partitions(
        PartitionSource.model_validate(settings), project_dir=project, origin=origin
    )


def write(project: Path, name: str, text: str) -> None:
    path = project / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))


def failure(
    project: Path, settings: dict[str, Any], error: type[Exception] = PartitionError
) -> str:
    with pytest.raises(error) as info:
        load(project, settings)
    return str(info.value)


def keys(partitions: list[Partition]) -> list[str]:
    return [p.key for p in partitions]


# --- the source model --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [{}, {"from": "a.json", "glob": "*.md"}, {"items": [1], "call": "m:f"}],
)
def test_source_needs_exactly_one_kind(settings: dict[str, Any]) -> None:
    """A source with none, or more than one, of from/glob/items/call is refused."""
    with pytest.raises(pydantic.ValidationError, match="exactly one of"):
        PartitionSource.model_validate(settings)


def test_source_reads_from_by_alias_or_name() -> None:
    """`from` (as written in YAML) and `from_` (the Python name) both set the file."""
    assert PartitionSource.model_validate({"from": "a.json"}).from_ == "a.json"
    assert PartitionSource.model_validate({"from_": "b.json"}).from_ == "b.json"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"from": "a.json", "colour": "red"}, "Extra inputs"),
        ({"glob": "*.md", "format": "json"}, "`format` applies only"),
        ({"items": [1], "list": "x"}, "`list` applies only"),
        ({"from": "  "}, "`from` is empty"),
        ({"items": [1], "key": "{id"}, "unmatched"),
        ({"items": [1], "key": ""}, "`key` is empty"),
    ],
)
def test_source_rejects_bad_settings(settings: dict[str, Any], message: str) -> None:
    """Unknown fields, settings that do not fit the kind, and malformed key templates are refused
    when the source is validated, before anything is read."""
    with pytest.raises(pydantic.ValidationError, match=message):
        PartitionSource.model_validate(settings)


def test_source_is_frozen() -> None:
    """A validated source cannot be changed afterwards."""
    source = PartitionSource.model_validate({"items": [1]})
    with pytest.raises(pydantic.ValidationError):
        source.key = "x"


# --- JSON ----------------------------------------------------------------------------------------


def test_json_list_of_objects_keys_by_id_in_source_order(tmp_path: Path) -> None:
    """A JSON list of objects is keyed by `id` by default, numbers become strings, and rows keep
    their order and 0-based index."""
    rows = [{"id": 30, "name": "c"}, {"id": "a1", "name": "a"}, {"id": 2, "name": "b"}]
    write(tmp_path, "orgs.json", json.dumps(rows))
    partitions = load(tmp_path, {"from": "orgs.json"})
    assert keys(partitions) == ["30", "a1", "2"]
    assert [p.index for p in partitions] == [0, 1, 2]
    assert partitions[0].fields == {"id": 30, "name": "c"}
    assert [p.row for p in partitions] == ["item 1", "item 2", "item 3"]


def test_json_wrapped_list_with_list_setting(tmp_path: Path) -> None:
    """`list:` picks the list out of a wrapping object, also by a dotted path."""
    write(tmp_path, "a.json", json.dumps({"organizations": [{"id": "x"}], "count": 1}))
    write(tmp_path, "b.json", json.dumps({"data": {"items": [{"id": "y"}, {"id": "z"}]}}))
    assert keys(load(tmp_path, {"from": "a.json", "list": "organizations"})) == ["x"]
    assert keys(load(tmp_path, {"from": "b.json", "list": "data.items"})) == ["y", "z"]


def test_json_wrapped_list_without_list_setting_names_the_fix(tmp_path: Path) -> None:
    """An object holding lists, read without `list:`, is an error that names the candidates."""
    write(tmp_path, "a.json", json.dumps({"meta": {}, "organizations": [], "extra": [1]}))
    message = failure(tmp_path, {"from": "a.json"})
    assert message.startswith("a.json: ")
    assert "set `list: organizations`" in message
    assert "'extra'" in message


@pytest.mark.parametrize(
    ("list_path", "message"),
    [
        ("orgs", "a.json: `list: orgs`: no field 'orgs' in the top level; its fields: data"),
        ("data.rows", "a.json: `list: data.rows`: no field 'rows' in data; its fields: items"),
        ("data", "a.json: `list: data` names an object, not a list"),
        ("data.items.x", "a.json: `list: data.items.x`: data.items is a string, not an object"),
    ],
)
def test_json_list_setting_errors(tmp_path: Path, list_path: str, message: str) -> None:
    """`list:` naming a missing field, or something that is not a list, is an error naming it."""
    write(tmp_path, "a.json", json.dumps({"data": {"items": "nope"}}))
    assert message in failure(tmp_path, {"from": "a.json", "list": list_path})


def test_json_object_keyed_by_member_name(tmp_path: Path) -> None:
    """Each member of an object keyed by id is a partition keyed by its name, with the name in the
    field `key`; scalar members become the field `value`."""
    data = {"org_1": {"name": "One", "priority": 2}, "org_2": "plain"}
    write(tmp_path, "orgs.json", json.dumps(data))
    partitions = load(tmp_path, {"from": "orgs.json"})
    assert keys(partitions) == ["org_1", "org_2"]
    assert partitions[0].fields == {"key": "org_1", "name": "One", "priority": 2}
    assert partitions[1].fields == {"key": "org_2", "value": "plain"}
    assert partitions[0].priority == 2.0
    assert partitions[1].row == "member 'org_2'"


def test_json_malformed_names_line_and_column(tmp_path: Path) -> None:
    """Malformed JSON is reported with the file, line and column."""
    write(tmp_path, "refs/orgs.json", '[\n  {"id": 1},\n  {"id": 2,}\n]')
    message = failure(tmp_path, {"from": "refs/orgs.json"})
    assert message.startswith("refs/orgs.json: malformed JSON at line 3, column 12:")


def test_json_duplicate_names_are_refused(tmp_path: Path) -> None:
    """A name repeated in one JSON object would silently drop a row, so it is an error."""
    write(tmp_path, "orgs.json", '{"org_1": {"n": 1}, "org_1": {"n": 2}}')
    message = failure(tmp_path, {"from": "orgs.json"})
    assert "'org_1' appears twice" in message


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ('"just text"', "orgs.json: the top level is a string; expected a list"),
        ('[{"id": 1}, null]', "orgs.json: item 2 is null; expected an object or a scalar"),
        ('[{"id": 1}, [1, 2]]', "orgs.json: item 2 is a list; expected an object or a scalar"),
    ],
)
def test_json_rows_of_the_wrong_shape(tmp_path: Path, document: str, message: str) -> None:
    """A top level that is not a list or object, and rows that are null or lists, are errors
    naming the row."""
    write(tmp_path, "orgs.json", document)
    assert message in failure(tmp_path, {"from": "orgs.json"})


def test_file_not_found_names_the_file_and_the_setting(tmp_path: Path) -> None:
    """A missing file is named as the user wrote it, with where it was declared."""
    message = failure(tmp_path, {"from": "references/orgs.json"})  # default origin: "partitions"
    assert message.startswith("references/orgs.json: partition file not found (partitions.from)")
    with pytest.raises(PartitionError, match=r"\(pipeline.yaml: stage 'r': partitions.from\)"):
        load(tmp_path, {"from": "x.json"}, origin="pipeline.yaml: stage 'r': partitions")


def test_file_that_is_a_directory_suggests_glob(tmp_path: Path) -> None:
    """Pointing `from:` at a directory is an error that suggests `glob:`."""
    (tmp_path / "docs.json").mkdir()
    assert "use `glob:`" in failure(tmp_path, {"from": "docs.json"})


def test_unknown_extension_needs_format(tmp_path: Path) -> None:
    """A file whose extension is not known is refused unless `format:` names the format."""
    write(tmp_path, "orgs.txt", '[{"id": "a"}]')
    assert "set `format:`" in failure(tmp_path, {"from": "orgs.txt"})
    assert keys(load(tmp_path, {"from": "orgs.txt", "format": "json"})) == ["a"]


def test_format_overrides_the_extension(tmp_path: Path) -> None:
    """`format:` wins over the extension: a `.json` file read as JSONL."""
    write(tmp_path, "orgs.json", '{"id": "a"}\n{"id": "b"}\n')
    assert keys(load(tmp_path, {"from": "orgs.json", "format": "jsonl"})) == ["a", "b"]


def test_list_setting_only_for_json_and_yaml(tmp_path: Path) -> None:
    """`list:` on a CSV file is an error rather than silently ignored."""
    write(tmp_path, "a.csv", "id\n1\n")
    assert "`list:` applies to JSON and YAML" in failure(tmp_path, {"from": "a.csv", "list": "x"})


def test_file_must_be_utf8_but_may_start_with_a_bom(tmp_path: Path) -> None:
    """A byte-order mark is skipped; bytes that are not UTF-8 are an error naming the offset."""
    (tmp_path / "bom.csv").write_bytes("\ufeffid,name\n1,Zürich\n".encode())
    assert load(tmp_path, {"from": "bom.csv"})[0].fields == {"id": "1", "name": "Zürich"}
    (tmp_path / "latin.csv").write_bytes("id,name\n1,Z\xfcrich\n".encode("latin-1"))
    assert "latin.csv: line 2: not UTF-8 text (byte 11)" in failure(tmp_path, {"from": "latin.csv"})


# --- YAML ----------------------------------------------------------------------------------------


def test_yaml_same_shapes_as_json(tmp_path: Path) -> None:
    """YAML lists, wrapped lists and keyed objects read like their JSON forms (`.yml` too)."""
    write(tmp_path, "a.yaml", "- id: a\n  name: A\n- id: b\n")
    write(tmp_path, "b.yml", "orgs:\n  - {id: c}\n")
    write(tmp_path, "c.yaml", "org_1: {name: One}\norg_2: {name: Two}\n")
    assert keys(load(tmp_path, {"from": "a.yaml"})) == ["a", "b"]
    assert keys(load(tmp_path, {"from": "b.yml", "list": "orgs"})) == ["c"]
    keyed = load(tmp_path, {"from": "c.yaml"})
    assert [(p.key, p.fields["name"]) for p in keyed] == [("org_1", "One"), ("org_2", "Two")]


def test_yaml_malformed_names_the_line(tmp_path: Path) -> None:
    """Malformed YAML is reported with the file and the line of the problem."""
    write(tmp_path, "a.yaml", "- id: a\n- id: [b\n- id: c\n")
    assert failure(tmp_path, {"from": "a.yaml"}).startswith("a.yaml: malformed YAML at line ")


def test_yaml_duplicate_keys_are_refused_with_both_lines(tmp_path: Path) -> None:
    """A key repeated in one YAML mapping is an error naming both lines."""
    write(tmp_path, "a.yaml", "org_1: {n: 1}\norg_2: {n: 2}\norg_1: {n: 3}\n")
    message = failure(tmp_path, {"from": "a.yaml"})
    assert message.startswith("a.yaml: malformed YAML at line 3, column 1: duplicate key 'org_1'")
    assert "first at line 1" in message


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    """A YAML merge key (`<<`) overridden by an explicit key is not a duplicate."""
    write(
        tmp_path, "a.yaml", "base: &b {tier: 1, region: eu}\nrows:\n  - {<<: *b, id: x, tier: 2}\n"
    )
    fields = load(tmp_path, {"from": "a.yaml", "list": "rows"})[0].fields
    assert fields == {"tier": 2, "region": "eu", "id": "x"}


def test_yaml_empty_file_is_an_error(tmp_path: Path) -> None:
    """An empty YAML file is an error that says how to write zero partitions."""
    write(tmp_path, "a.yaml", "# nothing yet\n")
    assert "([] for none)" in failure(tmp_path, {"from": "a.yaml"})
    write(tmp_path, "b.yaml", "[]\n")
    assert load(tmp_path, {"from": "b.yaml"}) == []


# --- JSONL ---------------------------------------------------------------------------------------


def test_jsonl_rows_are_labelled_by_physical_line(tmp_path: Path) -> None:
    """JSONL reads one object per line, skips blank lines, and names rows by their line."""
    write(tmp_path, "a.jsonl", '{"id": "a"}\n\n   \n{"id": "b", "n": 2}\r\n')
    write(tmp_path, "b.ndjson", '{"id": "c"}')
    partitions = load(tmp_path, {"from": "a.jsonl"})
    assert keys(partitions) == ["a", "b"]
    assert [p.row for p in partitions] == ["line 1", "line 4"]
    assert [p.index for p in partitions] == [0, 1]
    assert keys(load(tmp_path, {"from": "b.ndjson"})) == ["c"]


def test_jsonl_malformed_line(tmp_path: Path) -> None:
    """A malformed JSONL line is named with its line and column."""
    write(tmp_path, "a.jsonl", '{"id": "a"}\n\n{"id": "b"\n')
    assert failure(tmp_path, {"from": "a.jsonl"}).startswith(
        "a.jsonl: line 3: malformed JSON at column 11:"
    )


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    """JSONL rows must be objects; a scalar or list line is an error naming the line."""
    write(tmp_path, "a.jsonl", '{"id": "a"}\n"b"\n')
    assert "a.jsonl: line 2 is a string; expected an object" in failure(
        tmp_path, {"from": "a.jsonl"}
    )


# --- CSV and TSV ---------------------------------------------------------------------------------


def test_csv_rows_are_strings_with_numeric_priority(tmp_path: Path) -> None:
    """CSV values stay strings; `priority` becomes a number; rows are named by the line they start
    on, counting multi-line quoted values and blank lines."""
    write(tmp_path, "a.csv", 'id,note,priority\n1,"two\nlines",5\n\n2,plain,\n3,x,-1.5\n')
    partitions = load(tmp_path, {"from": "a.csv"})
    assert keys(partitions) == ["1", "2", "3"]
    assert partitions[0].fields == {"id": "1", "note": "two\nlines", "priority": "5"}
    assert [p.priority for p in partitions] == [5.0, 0.0, -1.5]
    assert [p.row for p in partitions] == ["line 2", "line 5", "line 6"]


def test_tsv_rows(tmp_path: Path) -> None:
    """TSV splits on tabs, so commas stay inside values."""
    write(tmp_path, "a.tsv", "id\tname\na\tSmith, J.\n")
    assert load(tmp_path, {"from": "a.tsv"})[0].fields == {"id": "a", "name": "Smith, J."}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("id,name,tier\n1,a,x\n2,b\n", "a.csv: line 3: 2 columns, but the header has 3"),
        ("id,name\n1,a,extra\n", "a.csv: line 2: 3 columns, but the header has 2"),
        ('id,name\n1,"a"b\n', "a.csv: line 2: malformed CSV:"),
        ("", "a.csv: line 1: expected a header row"),
        ("id,name,id\n1,2,3\n", "a.csv: line 1: header column 3 repeats 'id'"),
        ("id,,name\n1,2,3\n", "a.csv: line 1: header column 2 is empty"),
    ],
)
def test_csv_errors(tmp_path: Path, text: str, message: str) -> None:
    """Wrong column counts, bad quoting and bad headers are errors naming the line."""
    write(tmp_path, "a.csv", text)
    assert message in failure(tmp_path, {"from": "a.csv"})


# --- globs ---------------------------------------------------------------------------------------


def test_glob_one_partition_per_file_sorted(tmp_path: Path) -> None:
    """A recursive glob yields one partition per matching file (not directories), sorted by path,
    with path/name/stem/slug fields and the stem as key."""
    for name in ("src/b.py", "src/a.py", "src/pkg/c.py", "src/pkg/readme.md"):
        write(tmp_path, name, "")
    (tmp_path / "src" / "dir.py").mkdir()
    partitions = load(tmp_path, {"glob": "src/**/*.py"})
    assert [p.fields["path"] for p in partitions] == ["src/a.py", "src/b.py", "src/pkg/c.py"]
    assert keys(partitions) == ["a", "b", "c"]
    assert partitions[2].fields == {
        "path": "src/pkg/c.py",
        "name": "c.py",
        "stem": "c",
        "slug": "src-pkg-c",
    }
    assert partitions[2].row == "file 'src/pkg/c.py'"


def test_glob_matching_nothing_is_empty(tmp_path: Path) -> None:
    """A glob that matches no file gives zero partitions, not an error."""
    assert load(tmp_path, {"glob": "docs/*.md"}) == []


@pytest.mark.parametrize("pattern", ["/etc/*", "../*.py", "src/../../x/*", "C:\\data\\*", "..\\*"])
def test_glob_must_stay_inside_the_project(tmp_path: Path, pattern: str) -> None:
    """An absolute glob, or one with a `..` segment, is refused."""
    message = failure(tmp_path, {"glob": pattern})
    assert message.startswith("partitions.glob: ")
    assert "must stay inside the project directory" in message


def test_glob_repeated_stems_suggest_slug(tmp_path: Path) -> None:
    """Files with the same stem in two directories are duplicate keys; the error names both and
    `key: '{slug}'` resolves it."""
    write(tmp_path, "a/__init__.py", "")
    write(tmp_path, "b/__init__.py", "")
    message = failure(tmp_path, {"glob": "**/*.py"}, PartitionKeyError)
    assert "duplicate partition key '__init__' (file 'a/__init__.py' and file 'b/__init__.py')" in (
        message
    )
    assert "{slug}" in message
    assert keys(load(tmp_path, {"glob": "**/*.py", "key": "{slug}"})) == [
        "a-__init__",
        "b-__init__",
    ]


# --- inline items --------------------------------------------------------------------------------


def test_items_scalars_are_keyed_by_value(tmp_path: Path) -> None:
    """Inline scalars become the field `value`, keyed by their text."""
    partitions = load(tmp_path, {"items": ["de", 7, 2.5, True]})
    assert keys(partitions) == ["de", "7", "2.5", "true"]
    assert partitions[1].fields == {"value": 7}


def test_items_objects_with_key_template(tmp_path: Path) -> None:
    """A key template combines fields; `{{`/`}}` stay literal braces."""
    items = [{"country": "de", "id": 1}, {"country": "fr", "id": 1}]
    assert keys(load(tmp_path, {"items": items, "key": "{country}-{id}"})) == ["de-1", "fr-1"]
    assert keys(load(tmp_path, {"items": items[:1], "key": "{{{country}}}"})) == ["{de}"]


def test_items_errors_start_with_the_origin(tmp_path: Path) -> None:
    """Errors about an inline list start with where it was declared."""
    with pytest.raises(PartitionError) as info:
        load(
            tmp_path, {"items": [{"id": "a"}, None]}, origin="pipeline.yaml: stage 'r': partitions"
        )
    assert str(info.value).startswith("pipeline.yaml: stage 'r': partitions.items: item 2 is null")


# --- callables -----------------------------------------------------------------------------------

ModuleWriter = Callable[[str], str]


@pytest.fixture
def module(tmp_path: Path) -> Iterator[ModuleWriter]:
    """Write a uniquely named module into the project dir; forget it (and any sys.path change)
    afterwards."""
    names: list[str] = []
    saved_path = list(sys.path)

    def write_module(source: str) -> str:
        name = f"phalanx_source_{uuid.uuid4().hex[:12]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return name

    yield write_module
    for name in names:
        sys.modules.pop(name, None)
    sys.path[:] = saved_path


def test_call_sync_function(tmp_path: Path, module: ModuleWriter) -> None:
    """A sync callable in the project dir is imported and called; its rows are partitions, and
    sys.path is as it was afterwards."""
    name = module(
        """
        def orgs():
            yield {"id": "a", "priority": 3}
            yield {"id": "b"}
        """
    )
    before = list(sys.path)
    partitions = load(tmp_path, {"call": f"{name}:orgs"})
    assert sys.path == before
    assert [(p.key, p.priority, p.row) for p in partitions] == [
        ("a", 3.0, "item 1"),
        ("b", 0.0, "item 2"),
    ]


def test_call_attribute_path_and_scalars(tmp_path: Path, module: ModuleWriter) -> None:
    """`module:obj.attr` reaches a method; scalars are keyed by value."""
    name = module(
        """
        class Source:
            @staticmethod
            def regions():
                return ("eu", "us")
        """
    )
    assert keys(load(tmp_path, {"call": f"{name}:Source.regions"})) == ["eu", "us"]


def test_call_async_function_and_async_generator(tmp_path: Path, module: ModuleWriter) -> None:
    """An async function is awaited and an async generator collected."""
    name = module(
        """
        async def rows():
            return [{"id": "a"}]

        async def stream():
            for key in ("b", "c"):
                yield {"id": key}
        """
    )
    assert keys(load(tmp_path, {"call": f"{name}:rows"})) == ["a"]
    assert keys(load(tmp_path, {"call": f"{name}:stream"})) == ["b", "c"]


def test_call_async_inside_running_loop_is_an_error(tmp_path: Path, module: ModuleWriter) -> None:
    """With an event loop running in the thread, an async callable is refused (and its coroutine
    closed, so no warning), pointing at asyncio.to_thread."""
    name = module("async def rows():\n    return [1]\n")

    async def main() -> str:
        with pytest.raises(PartitionError) as info:
            load(tmp_path, {"call": f"{name}:rows"})
        via_thread = await asyncio.to_thread(load, tmp_path, {"call": f"{name}:rows"})
        assert keys(via_thread) == ["1"]
        return str(info.value)

    assert "asyncio.to_thread" in asyncio.run(main())


@pytest.mark.parametrize(
    ("source", "attribute", "message"),
    [
        (None, "f", "cannot import 'phalanx_no_such_module_x:f': no module"),
        ("import phalanx_no_such_dep_y\n", "f", "failed: No module named 'phalanx_no_such_dep_y'"),
        ("raise RuntimeError('bad config')\n", "f", "raised RuntimeError: bad config"),
        ("x = 1\n", "f", "has no attribute 'f'"),
        ("x = 1\n", "x", "is a number, not a callable"),
        ("def f():\n    raise ValueError('db down')\n", "f", "raised ValueError: db down"),
        ("def f():\n    return 42\n", "f", "returned a number; return a list"),
        ("def f():\n    return {'a': 1}\n", "f", "returned an object; return a list"),
        ("def f():\n    return 'ab'\n", "f", "returned a string; return a list"),
        ("def f():\n    return [{'id': 'a'}, None]\n", "f", "item 2 is null; expected an object"),
        ("def f():\n    return [[1]]\n", "f", "item 1 is a list; expected an object"),
        ("def f():\n    yield 1\n    raise KeyError('k')\n", "f", "raised KeyError: 'k'"),
    ],
)
def test_call_errors(
    tmp_path: Path, module: ModuleWriter, source: str | None, attribute: str, message: str
) -> None:
    """A callable that cannot be imported, found or called, or that returns unusable data, is an
    error with the cause's text; sys.path is restored even then."""
    name = "phalanx_no_such_module_x" if source is None else module(source)
    before = list(sys.path)
    with pytest.raises(PartitionError) as info:
        load(tmp_path, {"call": f"{name}:{attribute}"})
    assert sys.path == before
    assert str(info.value).startswith("partitions.call: ")
    assert message in str(info.value)


def test_call_reference_needs_a_colon(tmp_path: Path) -> None:
    """A call without `module:function` form is refused with the expected form."""
    assert "write 'module:function'" in failure(tmp_path, {"call": "just_a_module"})


# --- keys ----------------------------------------------------------------------------------------

BAD_KEYS = [
    "",
    "a/b",
    "a\\b",
    "..",
    "a..b",
    "nul\x00",
    "new\nline",
    "tab\there",
    "del\x7f",
    "\udc80",
    ".hidden",
    " lead",
    "trail ",
    "\u3000ideographic",
    "x" * (MAX_KEY_LENGTH + 1),
    "é" * 128,  # 128 characters, 256 bytes
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_validate_key_refuses_unsafe_segments(key: str) -> None:
    """Keys that are not safe path segments get a reason."""
    assert validate_key(key)


@pytest.mark.parametrize(
    "key", ["a", "3", "org_1", "a.b", "de-1", "with space", "Zürich", "東京", "x" * MAX_KEY_LENGTH]
)
def test_validate_key_accepts_safe_segments(key: str) -> None:
    """Ordinary names, inner dots and spaces, and non-ASCII letters are safe."""
    assert validate_key(key) is None


@pytest.mark.parametrize("key", BAD_KEYS)
def test_unsafe_key_in_data_names_the_row(tmp_path: Path, key: str) -> None:
    """An unsafe key read from a file is a PartitionKeyError naming the file, the row and why."""
    write(tmp_path, "a.json", json.dumps([{"id": "fine"}, {"id": key}]))
    message = failure(tmp_path, {"from": "a.json"}, PartitionKeyError)
    assert message.startswith("a.json: item 2: key ")
    assert f"not a safe directory name: {validate_key(key)}" in message


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "key field 'id' is null"),
        ([1], "key field 'id' is a list"),
        ({"a": 1}, "key field 'id' is an object"),
    ],
)
def test_key_that_is_not_a_scalar(tmp_path: Path, value: object, message: str) -> None:
    """A null, list or object key is an error naming the row."""
    write(tmp_path, "a.json", json.dumps([{"id": "a"}, {"id": value}]))
    assert f"a.json: item 2: {message}" in failure(tmp_path, {"from": "a.json"}, PartitionKeyError)


def test_missing_key_field_names_the_row(tmp_path: Path) -> None:
    """A row without the `key:` field is an error listing that row's fields."""
    write(tmp_path, "a.jsonl", '{"name": "a"}\n{"title": "b"}\n')
    message = failure(tmp_path, {"from": "a.jsonl", "key": "name"}, PartitionKeyError)
    assert "a.jsonl: line 2: no field 'name' for the key; its fields: title" in message


def test_no_key_without_id_says_how_to_set_one(tmp_path: Path) -> None:
    """Object rows without `id` and without `key:` are an error listing the row's fields."""
    write(tmp_path, "a.json", json.dumps([{"name": "a", "country": "de"}]))
    message = failure(tmp_path, {"from": "a.json"}, PartitionKeyError)
    assert "a.json: no key: set `key:` to a field name or a template such as `{name}`" in message
    assert "its fields: name, country" in message


def test_key_template_missing_field_names_field_and_row(tmp_path: Path) -> None:
    """A key template referring to a field a row lacks names the field and the row."""
    items = [{"country": "de", "id": 1}, {"id": 2}]
    with pytest.raises(PartitionKeyError) as info:
        load(tmp_path, {"items": items, "key": "{country}-{id}"})
    assert "partitions.items: item 2: the key template '{country}-{id}' refers to {country}" in str(
        info.value
    )


def test_key_template_refuses_non_scalar_fields(tmp_path: Path) -> None:
    """A key template over a list field is an error rather than a key like "['a']"."""
    message = failure(tmp_path, {"items": [{"tags": ["a"]}], "key": "{tags}"}, PartitionKeyError)
    assert "item 1: field 'tags' in the key '{tags}' is a list" in message


def test_duplicate_keys_name_both_rows(tmp_path: Path) -> None:
    """Two rows with one key are an error naming both."""
    write(tmp_path, "a.csv", "id,n\nx,1\ny,2\nx,3\n")
    message = failure(tmp_path, {"from": "a.csv"}, PartitionKeyError)
    assert "a.csv: duplicate partition key 'x' (line 2 and line 4)" in message


def test_keys_differing_only_in_case_are_duplicates(tmp_path: Path) -> None:
    """Keys equal up to case or Unicode normalization would share a directory on macOS/Windows."""
    with pytest.raises(PartitionKeyError, match="differ only in letter case"):
        load(tmp_path, {"items": ["Org", "org"]})
    with pytest.raises(PartitionKeyError, match="differ only in letter case"):
        load(tmp_path, {"items": ["caf\u00e9", "cafe\u0301"]})


def test_check_unique_without_row_labels() -> None:
    """check_unique names rows by 1-based position when partitions carry no row label."""
    partitions = [Partition("a", {}), Partition("b", {}, index=1), Partition("a", {}, index=2)]
    with pytest.raises(PartitionKeyError, match=r"^stage 'x': duplicate .* \(row 1 and row 3\)"):
        check_unique(partitions, where="stage 'x'")
    check_unique(partitions[:2], where="stage 'x'")


# --- priorities ----------------------------------------------------------------------------------


def test_priority_from_default_and_named_field(tmp_path: Path) -> None:
    """`priority` is read by default; `priority:` names another field; missing means 0."""
    items = [{"id": "a", "priority": 2, "rank": "7"}, {"id": "b", "rank": 1.5}, {"id": "c"}]
    assert [p.priority for p in load(tmp_path, {"items": items})] == [2.0, 0.0, 0.0]
    named = load(tmp_path, {"items": items, "priority": "rank"})
    assert [p.priority for p in named] == [7.0, 1.5, 0.0]


@pytest.mark.parametrize("value", ["high", True, "nan", "inf", [1]])
def test_priority_must_be_a_finite_number(tmp_path: Path, value: object) -> None:
    """A priority that is not a finite number is an error naming the row."""
    items = [{"id": "a"}, {"id": "b", "priority": value}]
    message = failure(tmp_path, {"items": items})
    assert message.startswith("partitions.items: item 2: priority ")
    assert "is not a finite number" in message


def test_csv_non_numeric_priority_names_the_line(tmp_path: Path) -> None:
    """A CSV priority that does not parse as a number names its line."""
    write(tmp_path, "a.csv", "id,priority\na,1\nb,urgent\n")
    assert "a.csv: line 3: priority 'urgent'" in failure(tmp_path, {"from": "a.csv"})


def test_named_priority_field_absent_everywhere_is_an_error(tmp_path: Path) -> None:
    """`priority:` naming a field no row has is a typo, not silently zero."""
    message = failure(tmp_path, {"items": [{"id": "a", "rank": 1}], "priority": "rnak"})
    assert "`priority:` names the field 'rnak', which no row has" in message


# --- where ---------------------------------------------------------------------------------------


def test_where_keeps_matching_rows_with_source_index(tmp_path: Path) -> None:
    """`where` keeps rows whose fields equal the values; indexes stay source positions."""
    items = [
        {"id": "a", "active": True, "tier": 1},
        {"id": "b", "active": False, "tier": 1},
        {"id": "c", "active": True, "tier": 2},
        {"id": "d", "active": 1, "tier": 1},
    ]
    kept = load(tmp_path, {"items": items, "where": {"active": True, "tier": 1}})
    assert [(p.key, p.index) for p in kept] == [("a", 0)]


def test_where_matches_csv_strings_to_numbers(tmp_path: Path) -> None:
    """CSV cells are strings, so `where: {year: 2024}` matches "2024"."""
    write(tmp_path, "a.csv", "id,year\na,2023\nb,2024\n")
    assert keys(load(tmp_path, {"from": "a.csv", "where": {"year": 2024}})) == ["b"]


def test_where_skips_rows_before_their_keys_are_checked(tmp_path: Path) -> None:
    """A row filtered out by `where` may lack a valid key."""
    items = [{"id": "../etc", "keep": False}, {"id": "ok", "keep": True}]
    assert keys(load(tmp_path, {"items": items, "where": {"keep": True}})) == ["ok"]


def test_where_field_absent_everywhere_is_an_error(tmp_path: Path) -> None:
    """`where` naming a field no row has is a typo, not an empty stage."""
    message = failure(tmp_path, {"items": [{"id": "a", "tier": 1}], "where": {"teir": 1}})
    assert "`where:` names the field 'teir', which no row has; fields of item 1: id, tier" in (
        message
    )


# --- values are literal data ---------------------------------------------------------------------


def test_hostile_values_survive_every_format_byte_for_byte(tmp_path: Path) -> None:
    """Values with shell metacharacters, quotes, newlines (LF and CRLF), tabs and braces are kept
    exactly, in every file format and inline."""
    row = {"id": "a", "note": HOSTILE}
    write(tmp_path, "a.json", json.dumps([row]))
    write(tmp_path, "a.jsonl", json.dumps(row, ensure_ascii=False) + "\n")
    write(tmp_path, "a.yaml", yaml.safe_dump([row]))
    with (tmp_path / "a.csv").open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["id", "note"], ["a", HOSTILE]])
    with (tmp_path / "a.tsv").open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, delimiter="\t").writerows([["id", "note"], ["a", HOSTILE]])
    for name in ("a.json", "a.jsonl", "a.yaml", "a.csv", "a.tsv"):
        (partition,) = load(tmp_path, {"from": name})
        assert partition.fields["note"] == HOSTILE, name
    (inline,) = load(tmp_path, {"items": [row]})
    assert inline.fields["note"] == HOSTILE


def test_errors_are_usage_errors_and_partitions_pickle(tmp_path: Path) -> None:
    """Partition errors are usage errors (exit 2, never retried); partitions pickle, as they
    cross process boundaries."""
    assert issubclass(PartitionKeyError, PartitionError)
    assert issubclass(PartitionError, UsageError)
    (partition,) = load(tmp_path, {"items": [{"id": "a", "note": HOSTILE}]})
    assert pickle.loads(pickle.dumps(partition)) == partition  # noqa: S301 (our own bytes)
