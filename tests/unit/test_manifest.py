"""Manifests and fingerprints: stable hashes, and manifests read back or refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from phalanx._manifest import MANIFEST, fingerprint, read_manifest


def test_fingerprints_do_not_change_with_the_encoder() -> None:
    """A fingerprint is the SHA-256 of ``json.dumps(..., sort_keys=True, ensure_ascii=False,
    default=str)`` of its parts, exactly: outputs committed by an earlier phalanx stay up to
    date."""
    values = {"b": [1, 2.5, None], "a": "é ünïcode", "path": Path("/x/y"), "nested": {"z": 1}}
    inputs = [("up", "k1", "d" * 64)]
    expected_text = json.dumps(
        ["stage-hash", "k", "prompt", values, inputs, ["up/k2"]],
        sort_keys=True,
        ensure_ascii=False,
        default=str,
    )
    expected = hashlib.sha256(expected_text.encode()).hexdigest()
    assert fingerprint("stage-hash", "k", "prompt", values, inputs, ["up/k2"]) == expected


@pytest.mark.parametrize(
    "content",
    [None, b"", b"{not json", b"\xef\xbb\xbf{}", b"\xff\xfe", b"[]", b'{"stage": "s"}'],
    ids=["missing", "empty", "broken", "bom", "not-utf8", "list", "incomplete"],
)
def test_a_missing_or_damaged_manifest_reads_as_none(tmp_path: Path, content: bytes | None) -> None:
    """No manifest, or one that is not a complete manifest document, reads as ``None``."""
    if content is not None:
        (tmp_path / MANIFEST).write_bytes(content)
    assert read_manifest(tmp_path) is None


def test_a_manifest_reads_back(tmp_path: Path) -> None:
    """A manifest document reads back with its files as (size, sha256, mtime_ns)."""
    document = {
        "phalanx_manifest": 1,
        "stage": "s",
        "key": "ké",
        "run_id": "r1",
        "attempt": 2,
        "fingerprint": "f",
        "digest": "d",
        "files": {"out.json": [3, "abc", 7]},
    }
    (tmp_path / MANIFEST).write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    manifest = read_manifest(tmp_path)
    assert manifest is not None
    assert (manifest.key, manifest.attempt) == ("ké", 2)
    assert manifest.files == {"out.json": (3, "abc", 7)}
