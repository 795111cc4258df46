"""Backends: where attempts execute. Loaded by name (``backend: local | process | ray``).

The built-in backends are registered here; another package can add one under the entry-point
group ``phalanx.backends`` (``name = "package.module:BackendClass"``). A backend whose optional
dependency is missing reports the command that installs it when it is opened.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from pathlib import Path

from .._config import BackendConfig
from .._errors import UnknownPluginError
from ._base import Backend, RunnerSpec

__all__ = ["Backend", "RunnerSpec", "backend_names", "load_backend"]

_BUILTIN = {
    "local": "phalanx.backends._local:LocalBackend",
    "process": "phalanx.backends._process:ProcessBackend",
    "ray": "phalanx.backends._ray:RayBackend",
}


def _registry() -> dict[str, str]:
    found = dict(_BUILTIN)
    for entry in metadata.entry_points(group="phalanx.backends"):
        found.setdefault(entry.name, entry.value)
    return found


def backend_names() -> list[str]:
    """Every backend name that can be loaded: the built-in ones and the plugins'."""
    return sorted(_registry())


def load_backend(config: BackendConfig, *, project_dir: Path, where: str = "backend") -> Backend:
    """A backend for ``config``; ``where`` names the setting in messages. Importing it needs
    nothing optional: that is checked when it is opened."""
    target = _registry().get(config.type)
    if target is None:
        raise UnknownPluginError(
            f"{where}: no backend {config.type!r}; the backends are {', '.join(backend_names())}"
        )
    module_name, _, class_name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise UnknownPluginError(
            f"{where}: the backend {config.type!r} ({target}) cannot be loaded: {exc}"
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise UnknownPluginError(f"{where}: {target} is not a phalanx Backend")
    backend: Backend = cls(config, project_dir=project_dir)
    return backend
