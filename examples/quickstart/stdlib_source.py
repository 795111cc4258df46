"""The quickstart's partition source: modules of Python's standard library, found on disk.

Nothing here imports a standard-library module to inspect it (``antigravity`` opens a web
browser, ``this`` prints a poem): modules are found with ``pkgutil.iter_modules`` on folders,
which only lists file names, and their size comes from ``stat``.
"""

from __future__ import annotations

import pkgutil
import sysconfig
from collections.abc import Iterator
from pathlib import Path

PACKAGES = (
    "asyncio",
    "collections",
    "concurrent",
    "dbm",
    "email",
    "html",
    "http",
    "importlib",
    "json",
    "logging",
    "sqlite3",
    "tomllib",
    "unittest",
    "urllib",
    "wsgiref",
    "xml",
    "xmlrpc",
    "zoneinfo",
)
"""Packages analysed with all their submodules (test suites excluded)."""

TOPLEVEL = (
    "abc",
    "argparse",
    "base64",
    "bisect",
    "calendar",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "difflib",
    "enum",
    "fnmatch",
    "fractions",
    "functools",
    "getopt",
    "glob",
    "graphlib",
    "gzip",
    "heapq",
    "hmac",
    "ipaddress",
    "keyword",
    "numbers",
    "operator",
    "pprint",
    "queue",
    "random",
    "reprlib",
    "sched",
    "secrets",
    "shlex",
    "shutil",
    "statistics",
    "string",
    "tempfile",
    "textwrap",
    "tokenize",
    "types",
    "uuid",
)
"""Single-file modules, grouped together under the package value ``toplevel``."""

TOPLEVEL_GROUP = "toplevel"


def stdlib_root() -> Path:
    """The folder holding the standard library's source of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def modules() -> list[dict[str, object]]:
    """One partition per module, sorted by dotted name: ``module``, ``package``, ``path``
    (relative to the standard library, with ``/``), ``file`` (absolute) and ``bytes`` (the
    source's size, used as the priority so the largest modules start first)."""
    root = stdlib_root()
    found: dict[str, tuple[str, Path]] = {}
    for name in PACKAGES:
        for module, path in _walk(root / name, name):
            found[module] = (name, path)
    for name in TOPLEVEL:
        if (root / f"{name}.py").is_file():
            found[name] = (TOPLEVEL_GROUP, root / f"{name}.py")
        else:  # some modules became packages in later Python versions (zipfile, pathlib)
            for module, path in _walk(root / name, name):
                found[module] = (name, path)
    return [
        {
            "module": module,
            "package": package,
            "path": path.relative_to(root).as_posix(),
            "file": str(path),
            "bytes": path.stat().st_size,
        }
        for module, (package, path) in sorted(found.items())
    ]


def _walk(folder: Path, dotted: str) -> Iterator[tuple[str, Path]]:
    """A package's ``__init__`` and, recursively, its submodules; test suites are skipped."""
    init = folder / "__init__.py"
    if not init.is_file():
        return
    yield dotted, init
    for info in pkgutil.iter_modules([str(folder)]):
        if info.name in {"test", "tests"} or info.name.startswith("test_"):
            continue
        if info.ispkg:
            yield from _walk(folder / info.name, f"{dotted}.{info.name}")
        elif (folder / f"{info.name}.py").is_file():
            yield f"{dotted}.{info.name}", folder / f"{info.name}.py"
