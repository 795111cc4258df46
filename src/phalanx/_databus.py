"""The data bus: staging folders, validation of what an attempt wrote, and atomic commit.

Every attempt writes into a private staging folder under the project's ``.phalanx/staging/``
(same filesystem as the outputs, so a rename is atomic). When the runner returns, the folder is
validated; only then is it renamed onto the instance's output folder. A reader of the data bus
therefore sees an instance's output complete and validated, or not at all.

Replacing an existing output takes two renames (old folder aside into ``.phalanx/trash/``, new
folder in): between them the output is absent, never half-written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import posixpath
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema

from ._checks import check_problems
from ._config import CheckSpec, ExpectSpec
from ._errors import ConfinementError, OutputInvalidError, PipelineError
from ._templates import TemplateKeyError, render_config

__all__ = [
    "MANIFEST",
    "DataBus",
    "OutputRules",
    "Scan",
    "changed_inputs",
    "expected_name",
    "load_schema",
    "read_all",
    "read_file",
    "scan",
    "snapshot",
]

_MAX_PROBLEMS = 8
MANIFEST = ".phalanx-manifest.json"  # written by phalanx._manifest at commit time
_INLINE_JSON_BYTES = 256 * 1024


def load_schema(path: Path, *, display: str) -> jsonschema.protocols.Validator:
    """A validator for the JSON Schema at ``path``; a broken schema is a usage error."""
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
    except (OSError, ValueError, jsonschema.SchemaError) as exc:
        message = getattr(exc, "message", None) or str(exc)
        raise PipelineError(f"{display}: not a valid JSON Schema: {message}") from exc
    validator: jsonschema.protocols.Validator = cls(schema)
    return validator


class OutputRules:
    """What one stage's outputs must satisfy: expected files (non-empty, JSON parses, schema),
    an optional check command. Built once per stage, applied to every attempt."""

    def __init__(
        self,
        expect: Mapping[str, ExpectSpec],
        schemas: Mapping[str, jsonschema.protocols.Validator],
        check: list[str] | None,
        check_timeout: float,
        checks: Sequence[CheckSpec] = (),
    ) -> None:
        self.expect = expect
        self.schemas = schemas
        self.check = check
        self.check_timeout = check_timeout
        self.checks = tuple(checks)
        self._fixed: tuple[str, ...] | None = None  # the names, when no template has a field
        if not any("{" in template for template in expect):
            with contextlib.suppress(ValueError):  # raised again, per instance, by names()
                self._fixed = tuple(expected_name(template, {}) for template in expect)

    def names(self, values: Mapping[str, object]) -> tuple[str, ...]:
        """The expected file names of one instance (templates rendered with its values)."""
        if self._fixed is not None:
            return self._fixed
        return tuple(expected_name(template, values) for template in self.expect)

    def cheap(self, files: Mapping[str, int]) -> bool:
        """Whether validating ``files`` is quick enough to do on the event loop: no check
        command to wait for, and little JSON to parse. Handing a few syscalls to a thread
        costs more than doing them."""
        if self.check is not None or self.checks:
            return False
        json_bytes = sum(size for name, size in files.items() if name.endswith(".json"))
        return json_bytes <= _INLINE_JSON_BYTES

    def validate(
        self, staging: Path, values: Mapping[str, object], files: Mapping[str, int] | None = None
    ) -> None:
        """Raise :class:`OutputInvalidError` or :class:`ConfinementError` unless the staging
        folder holds a complete, valid output. ``files`` is the folder's :func:`scan`, when
        the caller already has it; the hashes of the files read here are kept in it (see
        :class:`Scan`)."""
        if files is None:
            files = scan(staging)
        root = os.fspath(staging)
        problems: list[str] = []
        if MANIFEST in files:
            problems.append(f"{MANIFEST}: the name is reserved for phalanx's own manifest")
        if not self.expect and not files:
            problems.append("the agent wrote no file (the stage expects at least one)")
        checked: set[str] = set()
        for template, name in zip(self.expect, self.names(values), strict=True):
            checked.add(name)
            size = files.get(name)
            if size is None:
                problems.append(f"{name}: missing")
            elif size == 0:
                problems.append(f"{name}: empty")
            elif (validator := self.schemas.get(template)) is not None:
                problems.extend(_schema_problems(root, name, files, validator))
            elif name.endswith(".json"):
                problems.extend(_load_json(root, name, files)[1])
        for name in sorted(files):
            if name.endswith(".json") and name not in checked:
                problems.extend(_load_json(root, name, files)[1])
        by_file: dict[str, list[CheckSpec]] = {}
        for spec in self.checks:
            try:
                by_file.setdefault(expected_name(spec.file, values), []).append(spec)
            except (ValueError, TemplateKeyError) as exc:
                problems.append(f"check of {spec.file!r}: {exc}")
        for name, specs in by_file.items():
            if name in files or name not in checked:  # a missing expected file: said above
                problems.extend(check_problems(staging, name, specs))
        if problems:
            shown = problems[:_MAX_PROBLEMS]
            more = len(problems) - len(shown)
            text = "; ".join(shown) + (f"; and {more} more" if more else "")
            raise OutputInvalidError(f"invalid output: {text}")
        if self.check:
            self._run_check(staging, values)

    def _run_check(self, staging: Path, values: Mapping[str, object]) -> None:
        assert self.check is not None  # noqa: S101 - caller checked
        try:
            argv = [render_config(arg, {**values, "OUTPUT_DIR": staging}) for arg in self.check]
        except TemplateKeyError as exc:
            raise OutputInvalidError(f"check command refers to unknown {{{exc.name}}}") from None
        try:
            done = subprocess.run(
                argv,
                cwd=staging,
                capture_output=True,
                timeout=self.check_timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise OutputInvalidError(
                f"check command {argv[0]!r} ran past {self.check_timeout:g}s"
            ) from None
        except OSError as exc:
            raise OutputInvalidError(f"check command {argv[0]!r} cannot start: {exc}") from exc
        if done.returncode != 0:
            said = (done.stderr or done.stdout).decode("utf-8", "replace").strip()
            last = "\n".join(said.splitlines()[-10:])
            raise OutputInvalidError(
                f"check command {Path(argv[0]).name} exited with code {done.returncode}",
                detail=last,
            )


def expected_name(template: str, values: Mapping[str, object]) -> str:
    """The relative path an ``expect`` entry names for one instance.

    Raises ``ValueError`` for a path that leaves the output folder (absolute, or through
    ``..``), and :class:`~phalanx._templates.TemplateKeyError` for a missing value.
    """
    name = render_config(template, values) if "{" in template else template
    norm = posixpath.normpath(name.replace("\\", "/"))
    if norm.startswith("/") or norm in {".", ".."} or norm.startswith("../"):
        raise ValueError(f"expected file {name!r} is not a path inside the output folder")
    return norm


class Scan(dict[str, int]):
    """What :func:`scan` found in a staging folder: relative path -> size, plus what the
    manifest needs of each file. ``mtimes`` holds every file's modification time (ns);
    ``hashes`` the SHA-256 of the files validation read, so that
    :func:`~phalanx._manifest.write_manifest` need not read them again."""

    __slots__ = ("hashes", "mtimes")

    def __init__(self) -> None:
        super().__init__()
        self.mtimes: dict[str, int] = {}
        self.hashes: dict[str, str] = {}

    def read(self, name: str, data: bytes) -> None:
        """``data`` is the content of ``name`` as read after the scan: keep its hash, unless
        its size says the file changed since."""
        if len(data) == self.get(name):
            self.hashes[name] = hashlib.sha256(data).hexdigest()


def scan(staging: Path) -> Scan:
    """Relative path -> size of every regular file under ``staging`` (a :class:`Scan`).

    Raises :class:`ConfinementError` for a symlink or a special file anywhere in it.
    """
    files = Scan()
    mtimes = files.mtimes
    pending = [("", os.fspath(staging))]
    while pending:
        prefix, folder = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                rel = prefix + entry.name
                if entry.is_symlink():
                    raise ConfinementError(
                        f"output {rel} is a symlink; outputs must be plain files and folders"
                    )
                if entry.is_file():
                    info = entry.stat(follow_symlinks=False)
                    files[rel] = info.st_size
                    mtimes[rel] = info.st_mtime_ns
                elif entry.is_dir():
                    pending.append((rel + "/", entry.path))
                else:
                    raise ConfinementError(f"output {rel} is not a regular file")
    return files


Snapshot = dict[str, tuple[int, int, int]]


def snapshot(folders: list[Path]) -> Snapshot:
    """Path -> (mode, size, mtime) of everything under ``folders``: enough to tell whether an
    attempt wrote into the upstream outputs it was only meant to read."""
    seen: Snapshot = {}
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            for name in dirnames + filenames:
                info = os.lstat(os.path.join(dirpath, name))
                seen[os.path.join(dirpath, name)] = (info.st_mode, info.st_size, info.st_mtime_ns)
        if not os.path.isdir(folder):
            seen[str(folder)] = (0, -1, -1)
    return seen


def changed_inputs(before: Snapshot, folders: list[Path]) -> list[str]:
    """What differs between ``before`` and the folders now: changed, added or removed paths."""
    after = snapshot(folders)
    return sorted(
        path for path in before.keys() | after.keys() if before.get(path) != after.get(path)
    )


def read_file(path: str, size: int) -> bytes:
    """The content of the file at ``path``, which a scan found ``size`` bytes long: three
    system calls when it still is (``Path.read_bytes`` takes nine)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return read_all(fd, size)
    finally:
        os.close(fd)


def read_all(fd: int, size: int) -> bytes:
    """The rest of the open file ``fd``, expected to be ``size`` bytes: one ``read`` when it
    is, more when it is not (it changed, or a filesystem returned less)."""
    data = os.read(fd, size + 1)
    if len(data) == size:
        return data
    chunks = [data]
    while chunk := os.read(fd, max(size, 1 << 16)):
        chunks.append(chunk)
    return b"".join(chunks)


def _load_json(root: str, name: str, files: Mapping[str, int]) -> tuple[Any, list[str]]:
    data = read_file(f"{root}/{name}", files[name])
    if isinstance(files, Scan):
        files.read(name, data)
    try:
        return json.loads(data), []
    except UnicodeDecodeError:
        return None, [f"{name}: not UTF-8 text"]
    except json.JSONDecodeError as exc:
        return None, [f"{name}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"]


def _schema_problems(
    root: str, name: str, files: Mapping[str, int], validator: jsonschema.protocols.Validator
) -> list[str]:
    document, problems = _load_json(root, name, files)
    if problems:
        return problems
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    return [f"{name}: {error.json_path}: {error.message}" for error in errors[:3]]


_TAKEN = frozenset({errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR})
"""What ``rename(2)`` of a folder fails with when something is in the way: a folder with
files in it, or a file. (An empty folder it replaces.)"""

_OWNER = ".owner"
_UNOWNED_GRACE_S = 3600.0


def _abandoned(folder: Path) -> bool:
    """Whether a run's staging folder belongs to a process that no longer exists."""
    try:
        pid = int((folder / _OWNER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        try:
            return time.time() - folder.stat().st_mtime > _UNOWNED_GRACE_S
        except OSError:
            return False
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, and someone else's
    return False


class DataBus:
    """Staging folders and commits for one run of one project."""

    def __init__(self, project_dir: Path, state_dir: Path, run_id: str) -> None:
        self.project_dir = project_dir
        self.staging_root = state_dir / "staging" / run_id
        self.trash_root = state_dir / "trash" / run_id
        self._staging = os.fspath(self.staging_root)
        self._made: set[str] = set()

    def staging_dir(self, stage: str, key: str, attempt: int) -> Path:
        """Create and return a fresh, empty staging folder for one attempt."""
        parent = f"{self._staging}/{stage}"
        self._ensure(parent)
        path = f"{parent}/{key}.{attempt}"
        try:
            os.mkdir(path)
        except FileExistsError:  # left by an attempt of the same number that crashed
            shutil.rmtree(path)
            os.mkdir(path)
        return Path(path)

    def review_dir(self, stage: str) -> Path:
        """Where the reviewers of ``stage`` work (one folder per attempt under review); inside
        the run's staging folder, so swept with it, and named so no stage can own it."""
        return self.staging_root / "~review" / stage

    def _ensure(self, folder: str) -> None:
        if folder not in self._made:
            os.makedirs(folder, exist_ok=True)
            self._made.add(folder)

    def commit(self, staging: Path, final: Path, *, stage: str, key: str) -> None:
        """Move a validated staging folder onto ``final`` (replacing an older output)."""
        target = os.fspath(final)
        self._ensure(os.path.dirname(target))
        try:  # most outputs are new: one rename, no look first
            os.rename(staging, target)
        except OSError as exc:
            # Something is there (a folder with files, a file, a link) or another filesystem.
            if exc.errno not in _TAKEN and exc.errno != errno.EXDEV:
                raise
        else:
            return
        old = None
        if os.path.lexists(final):
            old = self.trash_root / stage / key
            old.parent.mkdir(parents=True, exist_ok=True)
            if os.path.lexists(old):
                shutil.rmtree(old)
            os.rename(final, old)
        try:
            os.rename(staging, final)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # Another filesystem: copy beside the target, then rename there (still atomic).
            beside = final.with_name(f".{final.name}.phalanx-partial")
            if beside.exists():
                shutil.rmtree(beside)
            shutil.copytree(staging, beside, symlinks=True)
            os.rename(beside, final)
            shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def discard(staging: Path) -> None:
        """Remove an attempt's staging folder, if it is still there."""
        if os.path.lexists(staging):
            shutil.rmtree(staging, ignore_errors=True)

    def open(self) -> None:
        """Claim this run's staging folder, and sweep the ones runs that died left behind.

        A folder left by an earlier process of this same run (a resume) is emptied first.
        Each run writes its process id into ``.owner`` in its staging folder; a folder whose
        owner is gone (a ``kill -9``, a power cut) holds only half-written attempts that never
        became visible, and is removed, together with its trash. A folder without an owner file
        is left alone unless it is an hour old: it may belong to a run that is just starting.
        """
        if self.staging_root.exists():
            # A resumed run: what its earlier process staged was never committed. The caller
            # holds the project's lock, so no other process can be using the folder.
            shutil.rmtree(self.staging_root)
        self.staging_root.mkdir(parents=True, exist_ok=True)
        (self.staging_root / _OWNER).write_text(str(os.getpid()), encoding="utf-8")
        for folder in self.staging_root.parent.iterdir():
            if folder != self.staging_root and _abandoned(folder):
                shutil.rmtree(self.trash_root.parent / folder.name, ignore_errors=True)
                shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        """Remove this run's (now empty) staging and trash folders."""
        for root in (self.staging_root, self.trash_root):
            shutil.rmtree(root, ignore_errors=True)
            with contextlib.suppress(OSError):
                root.parent.rmdir()  # only if no other run left anything there
