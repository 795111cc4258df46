"""Manifests and fingerprints: how the data bus describes itself.

A committed output folder carries ``.phalanx-manifest.json``: every file's name, size, content
hash and modification time, the fingerprint of the instance that wrote it, and the run and
attempt that committed it. The manifest is written into the staging folder before the commit
rename, so an output and its manifest appear together or not at all.

An instance's *fingerprint* hashes everything that decides what it writes: its stage's blueprint
file, runner settings and code, output rules and reference files (:func:`stage_digest`), its own
parameters and rendered prompt, and the *digests* (content hashes) of the upstream outputs it
reads (:func:`fingerprint`). An output whose manifest carries the instance's current fingerprint
and whose files still match it is up to date: a later run keeps it instead of paying for it
again.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ._databus import MANIFEST, Scan, read_all
from ._pipeline import StagePlan
from .runners import Runner
from .runners.python import PythonRunner

__all__ = [
    "MANIFEST",
    "Manifest",
    "fingerprint",
    "read_manifest",
    "stage_digest",
    "verify_output",
    "write_manifest",
]

_VERSION = 1
_SMALL = 1 << 20
# json.dumps with options builds an encoder per call; one is enough.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
# Runner settings that do not change what an agent writes: where a credential lives, which
# endpoint serves the model, which binary runs the CLI, how long to wait before a kill.
_OPERATIONAL = frozenset({"api_key_env", "base_url", "command", "kill_grace"})


@dataclass(frozen=True)
class Manifest:
    """What a committed output folder says of itself."""

    stage: str
    key: str
    run_id: str
    attempt: int
    fingerprint: str
    digest: str
    files: Mapping[str, tuple[int, str, int]]  # name -> (size, sha256, mtime_ns)


def _sha256_file(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _content_digest(files: Iterable[tuple[str, str]]) -> str:
    """One hash for an output's content: the sorted (name, file hash) pairs."""
    digest = hashlib.sha256()
    for name, sha in sorted(files):
        digest.update(f"{name}\0{sha}\n".encode())
    return digest.hexdigest()


def _describe(path: str) -> list[object]:
    """A file's manifest entry, ``[size, sha256, mtime_ns]``, from one open of it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if info.st_size <= _SMALL:  # most outputs: one read
            sha = hashlib.sha256(read_all(fd, info.st_size)).hexdigest()
        else:
            hasher = hashlib.sha256()
            while chunk := os.read(fd, _SMALL):
                hasher.update(chunk)
            sha = hasher.hexdigest()
    finally:
        os.close(fd)
    return [info.st_size, sha, info.st_mtime_ns]


def write_manifest(
    staging: Path,
    files: Mapping[str, int],
    *,
    stage: str,
    key: str,
    run_id: str,
    attempt: int,
    fingerprint: str,
) -> str:
    """Hash the validated files of ``staging`` and write its manifest; returns the digest.

    When ``files`` is the folder's :class:`~phalanx._databus.Scan`, the sizes and times it
    found are used, and so are the hashes validation took of the files it read: a small
    output is then described without reading anything again."""
    entries: dict[str, list[object]] = {}
    root = os.fspath(staging)
    hashes, mtimes = (files.hashes, files.mtimes) if isinstance(files, Scan) else ({}, {})
    for name in sorted(files):
        sha = hashes.get(name)
        if sha is not None:  # read by validation, as the scan found it
            entries[name] = [files[name], sha, mtimes[name]]
        else:
            entries[name] = _describe(f"{root}/{name}")
    digest = _content_digest((name, str(entry[1])) for name, entry in entries.items())
    document = {
        "phalanx_manifest": _VERSION,
        "stage": stage,
        "key": key,
        "run_id": run_id,
        "attempt": attempt,
        "fingerprint": fingerprint,
        "digest": digest,
        "files": entries,
    }
    data = _ENCODER.encode(document).encode()
    fd = os.open(f"{root}/{MANIFEST}", _CREATE, 0o666)  # three system calls, not seven
    try:
        while data:
            data = data[os.write(fd, data) :]
    finally:
        os.close(fd)
    return digest


def read_manifest(output: Path) -> Manifest | None:
    """The manifest of a committed output folder, or ``None`` when there is none (never
    committed by phalanx, or the manifest itself was damaged)."""
    try:
        fd = os.open(f"{os.fspath(output)}/{MANIFEST}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            document = json.loads(read_all(fd, os.fstat(fd).st_size))
        finally:
            os.close(fd)
        files = {
            str(name): (int(size), str(sha), int(mtime))
            for name, (size, sha, mtime) in document["files"].items()
        }
        return Manifest(
            stage=str(document["stage"]),
            key=str(document["key"]),
            run_id=str(document["run_id"]),
            attempt=int(document["attempt"]),
            fingerprint=str(document["fingerprint"]),
            digest=str(document["digest"]),
            files=files,
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def verify_output(output: Path, manifest: Manifest) -> str | None:
    """``None`` when the folder holds exactly the files its manifest lists, unchanged; else
    what differs. A file whose size and modification time match is trusted without reading
    it (as ``make`` and ``git`` do); one whose time moved is hashed again."""
    root = os.fspath(output)
    present: set[str] = set()
    pending = [("", root)]
    try:
        while pending:
            prefix, folder = pending.pop()
            with os.scandir(folder) as entries:
                for entry in entries:
                    name = prefix + entry.name
                    if entry.is_dir(follow_symlinks=False):
                        pending.append((name + "/", entry.path))
                    elif name != MANIFEST:
                        present.add(name)
    except OSError as exc:
        return f"cannot read the output folder: {exc.strerror or exc}"
    missing = sorted(set(manifest.files) - present)
    if missing:
        return f"{missing[0]} was removed after the commit"
    extra = sorted(present - set(manifest.files))
    if extra:
        return f"{extra[0]} was added after the commit"
    for name, (size, sha, mtime) in sorted(manifest.files.items()):
        path = f"{root}/{name}"
        try:
            info = os.lstat(path)
        except OSError:
            return f"{name} was removed after the commit"
        if not os.path.isfile(path) or os.path.islink(path):
            return f"{name} was replaced after the commit"
        if info.st_size != size:
            return f"{name} was changed after the commit (size {size} -> {info.st_size} bytes)"
        if info.st_mtime_ns != mtime and _sha256_file(path) != sha:
            return f"{name} was changed after the commit"
    return None


# -- fingerprints ------------------------------------------------------------------------------


# What json.dumps(value, sort_keys=True, ensure_ascii=False, default=str) writes, without
# building an encoder per call. Fingerprints depend on it: changing it reruns everything.
_CANONICAL = json.JSONEncoder(sort_keys=True, ensure_ascii=False, default=str)


def _hash_json(value: object) -> str:
    return hashlib.sha256(_CANONICAL.encode(value).encode()).hexdigest()


def _file_state(path: Path) -> object:
    """A file's content hash; for a folder, each file's name, size and modification time."""
    if path.is_file():
        return _sha256_file(os.fspath(path))
    if path.is_dir():
        listing = []
        for dirpath, _dirnames, filenames in os.walk(path):
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                info = os.stat(full)
                listing.append([os.path.relpath(full, path), info.st_size, info.st_mtime_ns])
        return sorted(listing)
    return None


def _runner_code(runner: Runner, project_dir: Path, argv: Iterable[str]) -> object:
    """The code an agent runs, as far as phalanx can see it: a ``python`` function's source
    file, and any file inside the project that a ``command`` names in its argv."""
    if isinstance(runner, PythonRunner):
        try:
            source = inspect.getsourcefile(runner.function)
        except TypeError:
            source = None
        return _sha256_file(source) if source and os.path.isfile(source) else None
    hashed = {}
    for arg in argv:
        candidate = (project_dir / arg).resolve() if not os.path.isabs(arg) else Path(arg)
        if candidate.is_relative_to(project_dir.resolve()) and candidate.is_file():
            hashed[arg] = _sha256_file(os.fspath(candidate))
    return hashed


def stage_digest(stage: StagePlan, runner: Runner, project_dir: Path) -> str:
    """Hash what every instance of ``stage`` shares and what changes its results."""
    settings = stage.runner.model_dump(mode="json", by_alias=True)
    argv = [str(arg) for arg in settings.get("argv", [])]
    settings = {name: value for name, value in settings.items() if name not in _OPERATIONAL}
    return _hash_json(
        {
            "stage": stage.name,
            "kind": stage.kind,
            "prompt_mode": stage.prompt_mode,
            "blueprint": _file_state(stage.blueprint.path) if stage.blueprint else None,
            "runner": settings,
            "code": _runner_code(runner, project_dir, argv),
            "expect": {
                name: spec.model_dump(mode="json", by_alias=True)
                for name, spec in sorted(stage.expect.items())
            },
            "schemas": {name: _file_state(path) for name, path in sorted(stage.schemas.items())},
            "check": stage.config.check,
            "reads": {rel: _file_state(project_dir / rel) for rel in stage.config.reads},
        }
    )


def fingerprint(
    stage_hash: str,
    key: str,
    prompt: str,
    values: Mapping[str, object],
    inputs: Iterable[tuple[str, str, str]],
    missing: Iterable[str],
) -> str:
    """One instance's fingerprint: its stage's digest, its parameters and prompt, and the
    ``(stage, key, digest)`` of each upstream output it reads (and which ones are missing)."""
    return _hash_json([stage_hash, key, prompt, values, list(inputs), list(missing)])
