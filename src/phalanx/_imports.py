"""Importing users' code by ``module:attribute`` from a project directory."""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["forget_foreign"]


def forget_foreign(module_name: str, project_dir: Path) -> None:
    """Drop a cached module of the same name that belongs to another project.

    Two projects run from one process often both have an ``agent.py``; without this the second
    would silently get the first one's functions.
    """
    top = module_name.split(".", 1)[0]
    local = project_dir / f"{top}.py", project_dir / top / "__init__.py"
    cached = sys.modules.get(top)
    if cached is None or not any(path.is_file() for path in local):
        return
    origin = getattr(cached, "__file__", None)
    if origin is not None and Path(origin).resolve() in {p.resolve() for p in local}:
        return
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        del sys.modules[name]
