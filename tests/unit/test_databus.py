"""The data bus: scanning a staging folder, reading what it holds, committing it in place."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from phalanx._config import ExpectSpec
from phalanx._databus import DataBus, OutputRules, Scan, read_file, scan
from phalanx._manifest import read_manifest, verify_output, write_manifest


def _bus(tmp_path: Path) -> DataBus:
    bus = DataBus(tmp_path, tmp_path / ".phalanx", "r1")
    bus.open()
    return bus


def _staged(bus: DataBus, key: str, files: dict[str, str]) -> Path:
    staging = bus.staging_dir("s", key, 1)
    for name, text in files.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_text(text, encoding="utf-8")
    return staging


def test_scan_finds_sizes_and_times_and_validation_keeps_the_hashes_it_read(
    tmp_path: Path,
) -> None:
    """``scan`` maps every file to its size and keeps its modification time; validating the
    scan keeps the SHA-256 of the JSON files it parsed (and only of those), which are the
    hashes of their bytes on disk."""
    bus = _bus(tmp_path)
    staging = _staged(
        bus, "a", {"out.json": '{"a": 1}', "notes.md": "# a\n", "sub/more.json": "[1, 2]"}
    )
    files = scan(staging)
    assert isinstance(files, Scan)
    assert files == {"out.json": 8, "notes.md": 4, "sub/more.json": 6}
    for name in files:
        assert files.mtimes[name] == os.stat(staging / name).st_mtime_ns

    OutputRules({"out.json": ExpectSpec(), "notes.md": ExpectSpec()}, {}, None, 60).validate(
        staging, {}, files
    )

    assert sorted(files.hashes) == ["out.json", "sub/more.json"]
    for name, sha in files.hashes.items():
        assert sha == hashlib.sha256((staging / name).read_bytes()).hexdigest()


def test_a_file_that_changed_after_the_scan_is_read_whole_and_not_trusted(
    tmp_path: Path,
) -> None:
    """A file that grew or shrank between the scan and the read is read to its end, and its
    hash is not kept (the manifest reads it again)."""
    bus = _bus(tmp_path)
    staging = _staged(bus, "a", {"grew.json": "[1]", "shrank.json": "[1, 2, 3]"})
    files = scan(staging)
    (staging / "grew.json").write_text("[1, 2, 3, 4]", encoding="utf-8")
    (staging / "shrank.json").write_text("[]", encoding="utf-8")

    assert read_file(f"{staging}/grew.json", files["grew.json"]) == b"[1, 2, 3, 4]"
    assert read_file(f"{staging}/shrank.json", files["shrank.json"]) == b"[]"
    OutputRules({}, {}, None, 60).validate(staging, {}, files)
    assert files.hashes == {}


def test_the_manifest_from_validation_equals_the_one_read_from_disk(tmp_path: Path) -> None:
    """The manifest written with the hashes validation kept is byte for byte the one written
    by reading every file again, and it verifies once committed."""
    bus = _bus(tmp_path)
    contents = {"out.json": json.dumps({"k": "é" * 50}), "notes.md": "x" * 3000}
    documents = []
    for key in ("a", "b"):
        staging = _staged(bus, key, contents)
        files = scan(staging)
        if key == "a":
            OutputRules({"out.json": ExpectSpec()}, {}, None, 60).validate(staging, {}, files)
            assert files.hashes
        for name in files:  # the same times for both, so the documents can be compared
            os.utime(staging / name, ns=(0, 1_000))
            files.mtimes[name] = 1_000
        digest = write_manifest(
            staging, files, stage="s", key="k", run_id="r1", attempt=1, fingerprint="f"
        )
        documents.append(((staging / ".phalanx-manifest.json").read_bytes(), digest))
        bus.commit(staging, tmp_path / "out" / key, stage="s", key=key)
    assert documents[0] == documents[1]
    manifest = read_manifest(tmp_path / "out" / "a")
    assert manifest is not None
    assert manifest.digest == documents[0][1]
    assert verify_output(tmp_path / "out" / "a", manifest) is None


@pytest.mark.parametrize("there", ["nothing", "empty folder", "folder", "file", "symlink"])
def test_commit_replaces_whatever_is_at_the_output(tmp_path: Path, there: str) -> None:
    """Whatever sits at the output path (nothing, an empty folder, an older output, a file,
    a symlink) is replaced by the staged folder; nothing of the old one is left once the bus
    closes."""
    bus = _bus(tmp_path)
    final = tmp_path / "out" / "a"
    final.parent.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if there == "empty folder":
        final.mkdir()
    elif there == "folder":
        final.mkdir()
        (final / "old.json").write_text("{}", encoding="utf-8")
    elif there == "file":
        final.write_text("old", encoding="utf-8")
    elif there == "symlink":
        final.symlink_to(elsewhere, target_is_directory=True)
    staging = _staged(bus, "a", {"new.json": "{}"})

    bus.commit(staging, final, stage="s", key="a")

    assert not final.is_symlink()
    assert sorted(os.listdir(final)) == ["new.json"]
    assert not staging.exists()
    assert elsewhere.is_dir()  # a link is replaced, not followed
    bus.close()
    assert not bus.trash_root.exists()
    assert sorted(os.listdir(final)) == ["new.json"]


def test_names_of_fixed_templates_are_computed_once(tmp_path: Path) -> None:
    """Expected names without fields are the same for every instance; names with fields are
    rendered per instance; a name leaving the output folder is refused per instance, as
    before."""
    fixed = OutputRules({"out.json": ExpectSpec(), "a/../b.md": ExpectSpec()}, {}, None, 60)
    assert fixed.names({"x": 1}) == ("out.json", "b.md")
    assert fixed.names({}) is fixed.names({"y": 2})
    templated = OutputRules({"{KEY}.json": ExpectSpec()}, {}, None, 60)
    assert templated.names({"KEY": "k1"}) == ("k1.json",)
    outside = OutputRules({"../x.json": ExpectSpec()}, {}, None, 60)
    with pytest.raises(ValueError, match="not a path inside the output folder"):
        outside.names({})
