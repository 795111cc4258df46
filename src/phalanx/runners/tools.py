"""The file tools phalanx gives an LLM agent: ``write_file``, ``read_file``, ``list_files``.

An agent sees one small virtual tree. Plain relative paths (``activities.json``,
``notes/a.md``) are its own staging folder, the only place it can write. Read-only *mounts* add
what the stage lets it read: upstream outputs (``inputs/research/org_1/activities.json``) and
reference files (``references/organizations.json``). Nothing else exists for it.

Every path is checked before any file is touched: absolute paths, ``..`` that would climb out,
NUL and control characters, and symlinks anywhere on the way are refused; writes over the size
limit are refused; reads are cut at the limit and say so. A refusal is returned as a tool error
the model can read and correct — never raised — and logged by the runner.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .._databus import MANIFEST

__all__ = ["FileTools", "ToolResult"]

_MAX_WRITE_BYTES = 2 * 1024 * 1024
_MAX_READ_BYTES = 256 * 1024
_MAX_LISTED = 500

_SCHEMAS: dict[str, tuple[str, dict[str, Any]]] = {
    "write_file": (
        "Write a text file into your output folder (creating folders as needed). The path is "
        "relative to your output folder, e.g. 'activities.json'. Overwrites an existing file.",
        {
            "type": "object",
            "properties": {
                "path": {"type": "string", "description": "Relative path, e.g. 'sources.md'"},
                "content": {"type": "string", "description": "The whole text of the file"},
            },
            "required": ["path", "content"],
        },
    ),
    "read_file": (
        "Read a text file: one you wrote, or one of the read-only inputs and references "
        "(list_files shows them).",
        {
            "type": "object",
            "properties": {"path": {"type": "string", "description": "Relative path"}},
            "required": ["path"],
        },
    ),
    "list_files": (
        "List the files under a folder: '' or '.' for your output folder and the read-only "
        "mounts, or a relative folder path.",
        {
            "type": "object",
            "properties": {"path": {"type": "string", "description": "Relative folder, or ''"}},
        },
    ),
}


@dataclass(frozen=True)
class ToolResult:
    """What a tool call returns to the model; ``is_error`` marks a refusal or a failure."""

    text: str
    is_error: bool = False


class _Refused(Exception):
    pass


class FileTools:
    """The file tools of one attempt.

    ``write_root`` is the staging folder. ``mounts`` maps a virtual folder (``inputs/research/
    org_1``, ``references``) to a real file or folder the agent may read.
    """

    names = tuple(_SCHEMAS)

    def __init__(
        self,
        write_root: Path,
        mounts: Mapping[str, Path] | None = None,
        *,
        max_write_bytes: int = _MAX_WRITE_BYTES,
        max_read_bytes: int = _MAX_READ_BYTES,
    ) -> None:
        self.write_root = write_root
        self.mounts = {_clean_mount(name): path for name, path in (mounts or {}).items()}
        self.max_write_bytes = max_write_bytes
        self.max_read_bytes = max_read_bytes
        self.written: list[str] = []

    def definitions(self, flavor: Literal["anthropic", "openai"]) -> list[dict[str, Any]]:
        """The tools in the shape each API expects."""
        if flavor == "anthropic":
            return [
                {"name": name, "description": text, "input_schema": schema}
                for name, (text, schema) in _SCHEMAS.items()
            ]
        return [
            {
                "type": "function",
                "function": {"name": name, "description": text, "parameters": schema},
            }
            for name, (text, schema) in _SCHEMAS.items()
        ]

    def call(self, name: str, arguments: object) -> ToolResult:
        """Run one tool call; every problem comes back as an error result, never raised."""
        if name not in _SCHEMAS:
            return ToolResult(f"unknown tool {name!r}; tools: {', '.join(_SCHEMAS)}", True)
        if not isinstance(arguments, Mapping):
            return ToolResult(f"{name}: arguments must be an object, not {arguments!r:.80}", True)
        try:
            if name == "write_file":
                return self._write(_text_arg(arguments, "path"), _text_arg(arguments, "content"))
            if name == "read_file":
                return self._read(_text_arg(arguments, "path"))
            return self._list(str(arguments.get("path") or ""))
        except _Refused as refusal:
            return ToolResult(f"{name}: {refusal}", True)
        except OSError as exc:
            return ToolResult(f"{name}: {exc.strerror or exc}", True)

    # -- the tools -----------------------------------------------------------------------------

    def _write(self, path: str, content: str) -> ToolResult:
        rel = _relative(path)
        if self._mount_of(rel) is not None:
            raise _Refused(f"{path!r} is read-only; write into your output folder instead")
        data = content.encode("utf-8")
        if len(data) > self.max_write_bytes:
            raise _Refused(
                f"{len(data)} bytes is over the limit of {self.max_write_bytes}; split the file"
            )
        target = self._inside(self.write_root, rel, creating=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        _no_links(self.write_root, target.parent)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
        descriptor = os.open(target, flags, 0o644)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        if rel not in self.written:
            self.written.append(rel)
        return ToolResult(f"wrote {rel} ({len(data)} bytes)")

    def _read(self, path: str) -> ToolResult:
        rel = _relative(path)
        mount = self._mount_of(rel)
        if mount is None:
            target = self._inside(self.write_root, rel)
        else:
            name, rest = mount
            target = self._inside(self.mounts[name], rest) if rest else self.mounts[name]
        info = _lstat(target, path)
        if not stat.S_ISREG(info.st_mode):
            raise _Refused(f"{path!r} is not a file")
        with target.open("rb") as handle:
            data = handle.read(self.max_read_bytes + 1)
        text = data[: self.max_read_bytes].decode("utf-8", "replace")
        if len(data) > self.max_read_bytes:
            text += f"\n[cut: the file is longer than {self.max_read_bytes} bytes]"
        return ToolResult(text)

    def _list(self, path: str) -> ToolResult:
        rel = "" if path.strip() in ("", ".", "./") else _relative(path)
        if not rel:
            lines = self._walk(self.write_root, "")
            lines += [f"{name}/ (read-only)" for name in sorted(self.mounts)]
            return ToolResult("\n".join(lines) or "(empty)")
        mount = self._mount_of(rel)
        if mount is None:
            root, prefix = self._inside(self.write_root, rel), rel
        else:
            name, rest = mount
            base = self.mounts[name]
            root, prefix = (self._inside(base, rest) if rest else base), rel
        if not root.is_dir():
            raise _Refused(f"{path!r} is not a folder")
        return ToolResult("\n".join(self._walk(root, prefix)) or "(empty)")

    # -- paths ---------------------------------------------------------------------------------

    def _mount_of(self, rel: str) -> tuple[str, str] | None:
        for name in sorted(self.mounts, key=len, reverse=True):
            if rel == name or rel.startswith(name + "/"):
                return name, rel[len(name) + 1 :]
        return None

    @staticmethod
    def _inside(root: Path, rel: str, *, creating: bool = False) -> Path:
        target = root / rel
        _no_links(root, target if not creating else target.parent)
        if creating and os.path.islink(target):
            raise _Refused(f"{rel!r} is a symlink")
        return target

    def _walk(self, root: Path, prefix: str) -> list[str]:
        lines: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                full = Path(dirpath, name)
                if full.is_symlink() or name == MANIFEST:  # phalanx's bookkeeping, not data
                    continue
                rel = full.relative_to(root).as_posix()
                lines.append(posixpath.join(prefix, rel) if prefix else rel)
                if len(lines) >= _MAX_LISTED:
                    return [*lines, f"[cut: more than {_MAX_LISTED} files]"]
        return lines


def _text_arg(arguments: Mapping[str, object], name: str) -> str:
    value = arguments.get(name)
    if not isinstance(value, str):
        raise _Refused(f"argument {name!r} must be a string")
    return value


def _relative(path: str) -> str:
    """A normalised relative path, or a refusal saying why not."""
    if any(ord(char) < 32 for char in path):
        raise _Refused(f"{path!r} contains a control character")
    text = path.replace("\\", "/").strip()
    if text.startswith("./"):
        text = text[2:]
    if not text:
        raise _Refused("the path is empty")
    if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        raise _Refused(f"{path!r} is absolute; use a path relative to your output folder")
    norm = posixpath.normpath(text)
    if norm in (".", "..") or norm.startswith("../"):
        raise _Refused(f"{path!r} leads outside the folders you may use")
    return norm


def _clean_mount(name: str) -> str:
    try:
        return _relative(name)
    except _Refused as refusal:
        raise ValueError(f"mount name {name!r}: {refusal}") from None


def _no_links(root: Path, target: Path) -> None:
    """Refuse when any existing component between ``root`` and ``target`` is a symlink."""
    current = root
    for part in target.relative_to(root).parts:
        current = current / part
        if os.path.islink(current):
            raise _Refused(f"{current.relative_to(root).as_posix()!r} is a symlink")
        if not os.path.lexists(current):
            return


def _lstat(target: Path, shown: str) -> os.stat_result:
    try:
        return target.lstat()
    except FileNotFoundError:
        raise _Refused(f"{shown!r} does not exist; list_files shows what does") from None
