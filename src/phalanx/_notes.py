"""The human-readable record: the failure journal (``wip/notes.md``) and stage summaries.

The journal is append-only and shared by every run of the project; each entry names its run.
A stage summary is rewritten when its stage ends: the counts (which always add up to the
stage's total), each failed or skipped partition with its cause, the slowest instances, and the
effective speedup (serial time over wall time).
"""

from __future__ import annotations

import datetime as dt
import heapq
from collections import Counter
from pathlib import Path

from ._results import InstanceResult, StageResult
from ._usage import Usage

__all__ = ["Notes"]

_HEADER = (
    "# phalanx notes\n\nFailed attempts, newest last. Written by phalanx; safe to edit or delete.\n"
)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _fence(text: str) -> str:
    longest = max((len(run) for run in text.split("\n") if set(run) == {"`"}), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text.rstrip()}\n{fence}\n"


class Notes:
    """Writes the journal and the summaries of one run."""

    def __init__(self, journal: Path, summaries_dir: Path, *, run_id: str, pipeline: str) -> None:
        self.journal = journal
        self.summaries_dir = summaries_dir
        self.run_id = run_id
        self.pipeline = pipeline
        self.written = False

    def failure(
        self,
        *,
        stage: str,
        key: str,
        attempt: int,
        attempts: int,
        cause: str,
        message: str,
        detail: str,
        action: str,
        logs: Path | None = None,
    ) -> None:
        """Append one failed attempt to the journal. ``logs`` is the attempt's log folder
        (prompt, stdout, stderr), named when the runner wrote one."""
        entry = (
            f"\n## {_now()} · {stage} · {key} · attempt {attempt}/{attempts}\n\n"
            f"- run: `{self.run_id}`\n"
            f"- cause: {cause}\n"
            f"- message: {message}\n"
            f"- action: {action}\n"
        )
        if logs is not None:
            entry += f"- logs: `{logs}`\n"
        if detail.strip():
            entry += "\n" + _fence(detail)
        self._append(entry)

    def stale(self, *, stage: str, key: str, problem: str) -> None:
        """Record that a committed output no longer matched its manifest and runs again."""
        self._append(
            f"\n## {_now()} · {stage} · {key} · committed output changed\n\n"
            f"- run: `{self.run_id}`\n"
            f"- found: {problem}\n"
            "- action: running the instance again (its output no longer matches the manifest "
            "written when it was committed)\n"
        )

    def _append(self, entry: str) -> None:
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.journal.exists()
        with self.journal.open("a", encoding="utf-8") as handle:
            if fresh:
                handle.write(_HEADER)
            handle.write(entry)
        self.written = True

    def summary(self, result: StageResult) -> Path:
        """Write the stage's summary; returns its path."""
        self.summaries_dir.mkdir(parents=True, exist_ok=True)
        path = self.summaries_dir / f"{result.name}.md"
        path.write_text(render_summary(result, run_id=self.run_id), encoding="utf-8")
        return path


def _seconds(value: float) -> str:
    return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"


def _row(inst: InstanceResult) -> str:
    why = inst.cause if inst.status == "failed" else inst.reason
    message = inst.message.replace("|", "\\|").replace("\n", " ")
    return f"| `{inst.key}` | {inst.status} | {why or ''} | {len(inst.attempts)} | {message} |"


def usage_lines(usage: Usage) -> list[str]:
    """Requests, tokens and cost as Markdown list items."""
    lines = [
        f"- requests: {usage.requests}",
        f"- tokens: {usage.input_tokens} input, {usage.output_tokens} output, "
        f"{usage.cache_read_tokens} cache read, {usage.cache_write_tokens} cache write",
        f"- cost: ${usage.cost_usd:.4f}",
    ]
    if usage.unpriced:
        lines.append(
            f"- {usage.unpriced} requests to models without a price are not in the cost; "
            "add them under the pipeline's `prices:`"
        )
    return lines


def render_summary(result: StageResult, *, run_id: str) -> str:
    """The Markdown summary of one stage."""
    verdict = "met" if result.met_threshold else "MISSED"
    # One pass over the instances instead of one per figure: a stage may have 100,000.
    counts: Counter[str] = Counter()
    trouble: list[InstanceResult] = []
    ran: list[tuple[float, InstanceResult]] = []
    serial = 0.0
    usage = Usage()
    for inst in result.instances:
        counts[inst.status] += 1
        if inst.status in ("failed", "skipped"):
            trouble.append(inst)
        if inst.attempts:
            duration = 0.0
            spent: Usage | None = None
            for attempt in inst.attempts:
                duration += attempt.duration_s
                if attempt.usage is not None:
                    if spent is None:
                        spent = Usage()
                    spent.add(attempt.usage)
            ran.append((duration, inst))
            serial += duration
            if spent is not None:
                usage.add(spent)
    lines = [
        f"# Stage `{result.name}`",
        "",
        f"Run `{run_id}`, finished {_now()}.",
        "",
        "| total | committed | cached | failed | skipped | required | threshold |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        f"| {result.total} | {counts['committed']} | {counts['cached']} | {counts['failed']} "
        f"| {counts['skipped']} | {result.required} | {verdict} |",
        "",
    ]
    if result.skipped_reason:
        lines += [f"The stage did not run: {result.skipped_reason}.", ""]
    if trouble:
        lines += [
            "## Failed and skipped partitions",
            "",
            "| partition | status | cause | attempts | message |",
            "| --- | --- | --- | ---: | --- |",
            *(_row(inst) for inst in trouble),
            "",
        ]
    slowest = heapq.nlargest(5, ran, key=lambda item: item[0])  # as StageResult.slowest(5)
    if slowest:
        lines += [
            "## Slowest instances",
            "",
            "| partition | time | share of wall time |",
            "| --- | ---: | ---: |",
        ]
        for duration, inst in slowest:
            share = duration / result.wall_s if result.wall_s else 0.0
            lines.append(f"| `{inst.key}` | {_seconds(duration)} | {share:.0%} |")
        lines.append("")
    if usage:
        lines += ["## Model usage", "", *usage_lines(usage), ""]
    lines += [
        "## Efficiency",
        "",
        f"- wall time: {_seconds(result.wall_s)}",
        f"- sum of instance times (serial): {_seconds(serial)}",
        f"- effective speedup: {serial / result.wall_s if result.wall_s > 0 else 0.0:.1f}x",
    ]
    if result.streaming is not None:
        flow = result.streaming
        lines.append(
            f"- streaming fan-in: the first instance started {_seconds(flow.early_s)} before "
            f"the upstream barrier, {flow.started_early} started before it; estimated time "
            f"saved against strict layers: {_seconds(flow.saved_s)}"
        )
    if result.speculation is not None:
        spec = result.speculation
        lines.append(
            f"- speculative backups: {spec.backups} started, {spec.won} committed first; "
            f"extra slot time {_seconds(spec.extra_s)}, extra cost ${spec.extra_cost_usd:.4f}"
        )
    lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"
