"""The LLM agents' file tools: writes only into staging, reads only staging and mounts, every
escape refused as a tool error the model can read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from phalanx.runners.tools import FileTools


@pytest.fixture
def tools(tmp_path: Path) -> FileTools:
    staging = tmp_path / "staging"
    staging.mkdir()
    upstream = tmp_path / "data" / "raw" / "org_1"
    upstream.mkdir(parents=True)
    (upstream / "activities.json").write_text('[{"title": "x"}]')
    references = tmp_path / "references"
    references.mkdir()
    (references / "organizations.json").write_text('{"organizations": []}')
    (tmp_path / "secret.txt").write_text("do not read")
    return FileTools(
        staging,
        {"inputs/research/org_1": upstream, "references": references},
        max_write_bytes=1000,
        max_read_bytes=50,
    )


def test_write_read_and_list(tools: FileTools) -> None:
    """A written file lands in staging and reads back; listing shows it and the mounts."""
    result = tools.call("write_file", {"path": "notes/a.md", "content": "# A\n"})
    assert not result.is_error, result.text
    assert (tools.write_root / "notes/a.md").read_text() == "# A\n"
    assert tools.call("read_file", {"path": "./notes/a.md"}).text == "# A\n"
    listing = tools.call("list_files", {}).text.splitlines()
    assert listing == [
        "notes/a.md",
        "inputs/research/org_1/ (read-only)",
        "references/ (read-only)",
    ]
    assert tools.written == ["notes/a.md"]


def test_mounts_are_readable_and_read_only(tools: FileTools) -> None:
    """Upstream outputs and references read through their virtual paths; writing there is
    refused and leaves them untouched."""
    text = tools.call("read_file", {"path": "inputs/research/org_1/activities.json"}).text
    assert json.loads(text) == [{"title": "x"}]
    assert tools.call("list_files", {"path": "references"}).text == "references/organizations.json"
    refused = tools.call(
        "write_file", {"path": "inputs/research/org_1/activities.json", "content": "[]"}
    )
    assert refused.is_error
    assert "read-only" in refused.text
    upstream = tools.mounts["inputs/research/org_1"]
    assert (upstream / "activities.json").read_text() == '[{"title": "x"}]'


@pytest.mark.parametrize(
    ("tool", "path", "says"),
    [
        ("write_file", "/etc/passwd", "absolute"),
        ("write_file", "../escape.txt", "leads outside"),
        ("write_file", "a/../../escape.txt", "leads outside"),
        ("write_file", "C:\\evil.txt", "absolute"),
        ("write_file", "bad\x00name", "control character"),
        ("write_file", "", "empty"),
        ("read_file", "../secret.txt", "leads outside"),
        ("read_file", "inputs/research/org_1/../../../secret.txt", "does not exist"),
        ("read_file", "inputs/research/org_1/../../../../secret.txt", "leads outside"),
        ("read_file", "/work/secret.txt", "absolute"),
        ("read_file", "missing.md", "does not exist"),
        ("list_files", "../", "leads outside"),
    ],
)
def test_escapes_are_refused(tools: FileTools, tool: str, path: str, says: str) -> None:
    """Absolute paths, climbing out, control characters and missing files are tool errors; a
    path that climbs out of a mount but stays in the virtual tree names a file of staging."""
    result = tools.call(tool, {"path": path, "content": "x"})
    assert result.is_error
    assert says in result.text
    assert not (tools.write_root.parent / "escape.txt").exists()


def test_symlinks_are_refused_both_ways(tools: FileTools, tmp_path: Path) -> None:
    """A symlink placed in staging (to a folder or a file outside) is never followed for a
    write or a read."""
    os.symlink(tmp_path, tools.write_root / "out")
    os.symlink(tmp_path / "secret.txt", tools.write_root / "secret.txt")
    write = tools.call("write_file", {"path": "out/escape.txt", "content": "x"})
    assert write.is_error
    assert "symlink" in write.text
    assert not (tmp_path / "escape.txt").exists()
    over = tools.call("write_file", {"path": "secret.txt", "content": "overwritten"})
    assert over.is_error
    assert (tmp_path / "secret.txt").read_text() == "do not read"
    read = tools.call("read_file", {"path": "secret.txt"})
    assert read.is_error
    assert "do not read" not in read.text


def test_size_limits(tools: FileTools) -> None:
    """Writes over the limit are refused; long reads are cut and say so."""
    big = tools.call("write_file", {"path": "big.txt", "content": "x" * 1001})
    assert big.is_error
    assert "over the limit" in big.text
    assert not (tools.write_root / "big.txt").exists()
    tools.call("write_file", {"path": "long.txt", "content": "y" * 80})
    text = tools.call("read_file", {"path": "long.txt"}).text
    assert text.startswith("y" * 50 + "\n[cut:")


def test_bad_calls_are_errors_not_exceptions(tools: FileTools) -> None:
    """Unknown tools, non-object arguments and wrong types come back as errors."""
    assert tools.call("delete_file", {"path": "a"}).is_error
    assert tools.call("write_file", ["a", "b"]).is_error
    assert tools.call("write_file", {"path": "a.txt", "content": 3}).is_error


def test_definitions_for_both_apis(tools: FileTools) -> None:
    """The same three tools in Anthropic's and OpenAI's shapes."""
    anthropic = tools.definitions("anthropic")
    openai = tools.definitions("openai")
    assert [t["name"] for t in anthropic] == ["write_file", "read_file", "list_files"]
    assert [t["function"]["name"] for t in openai] == ["write_file", "read_file", "list_files"]
    assert anthropic[0]["input_schema"]["required"] == ["path", "content"]
