"""Reporting: the live terminal display (:mod:`.progress`) and the HTML run report.

:func:`write_report` writes one self-contained HTML page for a run, built from the run's
event records: rebuilt from the project's ledger, or read from an ``--events`` file.
"""

from __future__ import annotations

import os
import secrets
import time
from importlib import metadata
from pathlib import Path

from .._errors import UsageError
from .._ledger import LEDGER_FILE, find_ledger, open_ledger
from .._pipeline import STATE_DIR
from ._html import render
from ._model import build
from ._records import ledger_records, read_events

__all__ = ["write_report"]


def write_report(
    out: str | Path | None = None,
    *,
    run: str | None = None,
    project: str | Path | None = None,
    events: str | Path | None = None,
) -> Path:
    """Write the HTML report of ``run`` (an id, a unique prefix, or ``None`` / ``"latest"``
    for the newest) and return the file written.

    The run is read from the ledger of ``project`` (default: the project holding the current
    folder), or from the event file ``events`` when given. ``out`` defaults to
    ``.phalanx/runs/RUN/report.html`` in the project. The page links each failed attempt's
    log files relative to where it is written, so keep them side by side when moving it.
    Raises :class:`~phalanx.UsageError` when there is no such run or file.
    """
    project_dir = _project(project, required=events is None)
    if events is not None:
        run_id, records = read_events(Path(events), run)
    else:
        assert project_dir is not None  # noqa: S101 - _project raised otherwise
        with open_ledger(project_dir / STATE_DIR) as ledger:
            wanted = None if run in (None, "latest") else run
            row = ledger.get_run(wanted)
            if row is None:
                recent = [item.id for item in ledger.runs(limit=5)]
                if not recent:
                    raise UsageError(f"no runs recorded in {project_dir} yet")
                raise UsageError(
                    f"no run {run!r} in {project_dir}; the latest are {', '.join(recent)} "
                    "(phalanx runs lists them all)"
                )
            run_id, records = row.id, ledger_records(ledger, row)
    if out is None:
        if project_dir is None:
            raise UsageError("give the report's file with -o FILE (there is no project here)")
        target = project_dir / STATE_DIR / "runs" / run_id / "report.html"
    else:
        target = Path(out)
    target = target.resolve()
    try:
        model = build(
            records, project_dir=project_dir, out_dir=target.parent, generated=time.time()
        )
    except (KeyError, TypeError, ValueError) as exc:
        source = events if events is not None else "the ledger"
        raise UsageError(f"cannot build a report of run {run_id} from {source}: {exc}") from None
    page = render(model, version=_version())
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed over it: a reader never sees half a page. Opened
    # with "x" rather than by mkstemp so that the file gets the umask's mode, not 0600.
    temporary = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with temporary.open("x", encoding="utf-8") as stream:
            stream.write(page)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


def _project(project: str | Path | None, *, required: bool) -> Path | None:
    if project is not None:
        folder = Path(project).resolve()
        if required and not (folder / STATE_DIR / LEDGER_FILE).is_file():
            raise UsageError(
                f"no phalanx ledger in {folder} (no {STATE_DIR}/{LEDGER_FILE}): "
                "run a pipeline there first"
            )
        return folder
    try:
        return find_ledger(Path.cwd()).parent.parent
    except UsageError:
        if required:
            raise
        return None


def _version() -> str:
    try:
        return metadata.version("phalanx")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
        return "unknown"
