"""The reviewer: the catalogue's layered quality assurance, as a gate before commit.

A stage with ``review:`` runs, after an attempt's outputs have passed the mechanical checks, a
second agent that reads them and judges them against the criteria no program can check ("every
activity is dated within the period and cites its source"). It writes ``verdict.json``:
``{"pass": true}`` or ``{"pass": false, "reasons": ["..."]}``. A failing verdict fails the
attempt (:class:`~phalanx.ReviewRejected`); the next attempt gets the reasons as feedback.
A reviewer that cannot answer fails the attempt too (:class:`~phalanx.ReviewFailed`): an
output nobody vouched for is not committed.

The reviewer reads the staging folder, never writes it: it works in a folder of its own, and
the reviewed files are compared before and after.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ._databus import changed_inputs, snapshot
from ._errors import InstanceError, ReviewFailed, ReviewRejected
from ._pipeline import ReviewPlan
from ._templates import stringify
from ._usage import Usage
from .runners import InputRef, InstanceContext, Runner
from .runners._base import Gate

__all__ = ["VERDICT", "Reviewer", "review_prompt"]

VERDICT = "verdict.json"
_Io = Callable[..., Awaitable[Any]]


def review_prompt(
    plan: ReviewPlan, ctx: InstanceContext, reviewed: Path, values: dict[str, object]
) -> str:
    """The reviewer's task: the blueprint of ``review.blueprint`` rendered with the instance's
    values, ``{CRITERIA}`` and ``{REVIEWED_DIR}``, or phalanx's own wording."""
    criteria = "\n".join(f"{n}. {item}" for n, item in enumerate(plan.criteria, 1))
    if plan.blueprint is not None:
        return plan.blueprint.render(
            {**values, "CRITERIA": criteria, "REVIEWED_DIR": str(reviewed)}, partition=ctx.key
        )
    params = [f"- {name}: {stringify(value)}" for name, value in values.items() if name.isupper()]
    return "\n".join(
        [
            f"You review the output of instance `{ctx.key}` of stage `{ctx.stage}` before it "
            "is accepted.",
            "",
            f"Its files are your input `inputs/{ctx.stage}/{ctx.key}` (on disk: {reviewed}). "
            "List them and read them; do not change them.",
            *(["", "The instance's parameters:", *params] if params else []),
            "",
            "Judge the files against each criterion:",
            criteria,
            "",
            f"Then write `{VERDICT}` into your output folder: "
            '{"pass": true} when every criterion is met, otherwise '
            '{"pass": false, "reasons": ["<the criterion>: <what is wrong>", ...]}.',
            f"Expected files: `{VERDICT}`.",
        ]
    )


class Reviewer:
    """Judges the attempts of one stage: :meth:`judge` returns when the verdict is a pass."""

    def __init__(self, plan: ReviewPlan, runner: Runner, workspace: Path) -> None:
        self.plan = plan
        self.runner = runner
        self.workspace = workspace  # the reviewers' folders: one per attempt under review

    async def judge(
        self, ctx: InstanceContext, reviewed: Path, io: _Io, gate: Gate | None = None
    ) -> None:
        """Review the staging folder ``reviewed`` of attempt ``ctx``, whose usage grows by what
        the review spends (whatever the verdict). The reviewer's calls go through ``gate``
        (the stage's lane, when it calls the same provider). Raises :class:`ReviewRejected`
        or :class:`ReviewFailed`."""
        folder = self.workspace / f"{ctx.key}.{ctx.attempt}"
        await io(_fresh, folder)
        values = dict(ctx.params)
        review = replace(
            ctx,
            params=values,
            prompt=review_prompt(self.plan, ctx, reviewed, values),
            output_dir=folder,
            final_dir=folder,
            inputs=(InputRef(ctx.stage, ctx.key, reviewed),),
            missing=(),
            log_dir=ctx.log_dir / "review",
            blueprint=self.plan.blueprint.path if self.plan.blueprint else None,
            timeout=self.plan.timeout,
            expected=(VERDICT,),
            feedback="",
            usage=Usage(),
            gate=gate if gate is not None else ctx.gate,
        )
        before = await io(snapshot, [reviewed])
        try:
            try:
                async with asyncio.timeout(self.plan.timeout):
                    await self.runner.run(review)
            except TimeoutError:
                raise ReviewFailed(
                    f"the reviewer ran past its timeout of {self.plan.timeout:g}s and was stopped"
                ) from None
            except InstanceError as exc:
                raise ReviewFailed(f"the reviewer failed: {exc}", detail=exc.detail) from exc
            if await io(changed_inputs, before, [reviewed]):
                raise ReviewFailed("the reviewer changed the files it was reviewing")
            verdict = await io(_read_verdict, folder, review.log_dir)
        finally:
            ctx.usage.add(review.usage)
            shutil.rmtree(folder, ignore_errors=True)  # a verdict and little else; even cancelled
        passed, reasons = verdict
        if not passed:
            shown = "; ".join(reasons) if reasons else "no reason given"
            raise ReviewRejected(f"the reviewer rejected the output: {shown}")


def _fresh(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def _read_verdict(folder: Path, log_dir: Path) -> tuple[bool, list[str]]:
    """``verdict.json`` of a finished review, kept in the attempt's log folder as well."""
    path = folder / VERDICT
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReviewFailed(f"the reviewer wrote no {VERDICT}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReviewFailed(f"the reviewer's {VERDICT} cannot be read: {exc}") from None
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / VERDICT).write_text(text, encoding="utf-8")
    try:
        data: object = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReviewFailed(f"the reviewer's {VERDICT} is not JSON: {exc}") from None
    passed = data.get("pass") if isinstance(data, dict) else None
    if not isinstance(passed, bool):
        raise ReviewFailed(
            f'the reviewer\'s {VERDICT} has no "pass": true or false (got {text[:200]!r})'
        )
    raw = data.get("reasons", []) if isinstance(data, dict) else []
    reasons = [str(item) for item in raw] if isinstance(raw, list) else [str(raw)]
    return passed, reasons
