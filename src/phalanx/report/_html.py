"""The report as one self-contained HTML page.

The numbers and tables that are the same for every reader are written here, as HTML; the
page's own script draws the timelines with plotly.js (bundled from the ``plotly`` package,
inlined: the page fetches nothing) and pages through the long tables, both from the model
embedded as JSON. Nothing a run recorded is trusted as markup: every string is escaped.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from html import escape
from importlib import resources
from typing import Any

__all__ = ["render"]


def _plotly_js() -> str:
    try:
        from plotly.offline import get_plotlyjs  # type: ignore[import-untyped]  # noqa: PLC0415 - only a report needs it
    except ImportError as exc:  # pragma: no cover - plotly is a dependency
        raise RuntimeError(
            "phalanx report needs plotly: pip install --upgrade phalanx (or pip install plotly)"
        ) from exc
    return str(get_plotlyjs())


def render(model: Mapping[str, Any], *, version: str) -> str:
    """The whole page for ``model`` (see ``_model.build``)."""
    run = model["run"]
    title = f"phalanx · {run['pipeline']} · run {run['id']}"
    data = json.dumps(model, ensure_ascii=False, separators=(",", ":"))
    # Inside <script>, "</" would end the element early and "<!--" would open a comment.
    data = data.replace("<", "\\u003c")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta name="generator" content="phalanx {escape(version)}">',
        f"<title>{escape(title)}</title>",
        f"<style>{_asset('report.css')}</style>",
        "</head>",
        "<body>",
        _header(model, version),
        "<main>",
        _overview(model),
        _stages_table(model),
        *(_stage_section(i, stage) for i, stage in enumerate(model["stages"])),
        _failures(model),
        _cost(model),
        _scheduling(model),
        "</main>",
        f'<script id="phalanx-data" type="application/json">{data}</script>',
        f"<script>{_plotly_js()}</script>",
        f"<script>{_asset('report.js')}</script>",
        "</body>",
        "</html>",
    ]
    return "\n".join(parts) + "\n"


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


# -- formatting ------------------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    if value is None:
        return "–"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 60:
        return f"{value:.2f} s"
    if value < 3600:
        return f"{int(value // 60)} min {value % 60:04.1f} s"
    return f"{int(value // 3600)} h {int(value % 3600 // 60):02d} min"


def _int(value: float | None) -> str:
    return "–" if value is None else f"{int(value):,}"


def _usd(value: float | None) -> str:
    return "–" if value is None else f"${value:,.4f}"


def _pct(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value * 100:.2f}%" if value < 0.01 else f"{value * 100:.1f}%"


def _when(t: float | None) -> str:
    if t is None:
        return "–"
    return dt.datetime.fromtimestamp(t).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _plural(count: int, word: str) -> str:
    return word if count == 1 else f"{word}s"


def _cell(value: str, field: str | None = None, *, numeric: bool = False) -> str:
    attrs = f' data-field="{escape(field)}"' if field else ""
    attrs += ' class="num"' if numeric else ""
    return f"<td{attrs}>{value}</td>"


def _table(head: Sequence[str], rows: Sequence[str], *, cls: str = "") -> str:
    heads = "".join(f"<th>{escape(name)}</th>" for name in head)
    klass = f' class="{cls}"' if cls else ""
    return f"<table{klass}><thead><tr>{heads}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _tokens(usage: Mapping[str, float]) -> int:
    return int(
        usage.get("input_tokens", 0)
        + usage.get("output_tokens", 0)
        + usage.get("cache_read_tokens", 0)
        + usage.get("cache_write_tokens", 0)
    )


# -- sections --------------------------------------------------------------------------------


def _header(model: Mapping[str, Any], version: str) -> str:
    run = model["run"]
    status = escape(run["status"])
    return (
        "<header>"
        f'<h1>{escape(run["pipeline"])} <span class="run-id">run {escape(run["id"])}</span> '
        f'<span class="status status-{status}" data-field="status">{status}</span></h1>'
        f"<p>Started {escape(_when(run['started']))} · wall time "
        f'<span data-field="wall">{escape(_seconds(run["wall_s"]))}</span> · '
        f"report by phalanx {escape(version)}</p>"
        "<nav>"
        + " ".join(
            f'<a href="#stage-{i}">{escape(stage["name"])}</a>'
            for i, stage in enumerate(model["stages"])
        )
        + ' <a href="#failures">failures</a> <a href="#cost">cost</a></nav>'
        "</header>"
    )


def _overview(model: Mapping[str, Any]) -> str:
    totals = model["totals"]
    usage = totals["usage"]
    cards = [
        ("instances", "Instances", _int(totals["instances"])),
        ("committed", "Committed", _int(totals["committed"])),
        ("cached", "Cached", _int(totals["cached"])),
        ("failed", "Failed", _int(totals["failed"])),
        ("skipped", "Skipped", _int(totals["skipped"])),
        ("attempts", "Attempts", _int(totals["attempts"])),
        ("tokens", "Tokens", _int(_tokens(usage))),
        ("cost", "Cost", _usd(usage["cost_usd"])),
        (
            "speedup",
            "Effective speedup",
            "–" if totals["speedup"] is None else f"{totals['speedup']:.2f}×",
        ),
    ]
    if totals["not_ended"]:
        cards.insert(5, ("not_ended", "Not ended", _int(totals["not_ended"])))
    body = "".join(
        f'<div class="card card-{field}"><div class="label">{escape(label)}</div>'
        f'<div class="value" data-field="{field}">{escape(value)}</div></div>'
        for field, label, value in cards
    )
    unpriced = (
        f"<p class='note'>{_int(usage['unpriced'])} requests had no known price: their cost "
        "is not counted.</p>"
        if usage["unpriced"]
        else ""
    )
    return (
        '<section id="overview"><h2>Overview</h2>'
        f'<div class="cards">{body}</div>'
        f"<p class='note'>Effective speedup is the instances' summed time "
        f"({escape(_seconds(totals['serial_s']))}) over the run's wall time; "
        f"{_int(totals['retries'])} retries and {_int(totals['backups'])} speculative "
        f"backups ran.</p>{unpriced}</section>"
    )


def _stages_table(model: Mapping[str, Any]) -> str:
    rows = []
    for i, stage in enumerate(model["stages"]):
        spread = stage["durations"] or {}
        rows.append(
            f'<tr data-stage="{escape(stage["name"])}">'
            f'<td><a href="#stage-{i}">{escape(stage["name"])}</a></td>'
            + _cell(escape(stage["runner"] or "–"))
            + _cell(_int(stage["total"]), "total", numeric=True)
            + _cell(_int(stage["committed"]), "committed", numeric=True)
            + _cell(_int(stage["cached"]), "cached", numeric=True)
            + _cell(_int(stage["failed"]), "failed", numeric=True)
            + _cell(_int(stage["skipped"]), "skipped", numeric=True)
            + _cell(_int(stage["attempts"]), "attempts", numeric=True)
            + _cell(_seconds(stage["wall_s"]), "wall", numeric=True)
            + _cell(_seconds(spread.get("p50")), numeric=True)
            + _cell(_seconds(spread.get("max")), numeric=True)
            + _cell(_usd(stage["usage"]["cost_usd"]), "cost", numeric=True)
            + "</tr>"
        )
    head = [
        "Stage",
        "Runner",
        "Total",
        "Committed",
        "Cached",
        "Failed",
        "Skipped",
        "Attempts",
        "Wall",
        "Median",
        "Slowest",
        "Cost",
    ]
    return f'<section id="stages"><h2>Stages</h2>{_table(head, rows)}</section>'


def _stage_section(index: int, stage: Mapping[str, Any]) -> str:
    name = escape(stage["name"])
    facts = [f"runner {escape(stage['runner'] or '–')}"]
    if stage["model"]:
        facts.append(f"model {escape(stage['model'])}")
    if stage["concurrency"]:
        facts.append(f"limit {stage['concurrency']}")
    facts.append(f"wall {_seconds(stage['wall_s'])}")
    facts.append(f"{_int(stage['attempts'])} attempts")
    if stage["retries"]:
        facts.append(f"{_int(stage['retries'])} retries")
    if stage["backups"]:
        facts.append(f"{_int(stage['backups'])} speculative backups")
    if stage["skipped_reason"]:
        facts.append(f"skipped: {escape(stage['skipped_reason'])}")
    timeline = stage["timeline"]
    if timeline["key"]:
        compact = (
            '<p class="note">This stage ran more attempts than the page draws one by one: '
            "each slot is a row of cells coloured by the outcome of the attempt holding it "
            "(where two share a cell, the one that did not commit shows); hover for the "
            "attempt.</p>"
            if timeline["mode"] == "compact"
            else ""
        )
        chart = (
            f"{compact}<div class='timeline' id='timeline-{index}' data-timeline='{name}' "
            f"data-mode='{timeline['mode']}' data-attempts='{len(timeline['key'])}'></div>"
        )
    else:
        chart = '<p class="note">No attempt ran in this stage.</p>'
    slowest_rows = [
        f"<tr><td>{escape(row['key'])}</td>"
        + _cell(escape(row["status"]))
        + _cell(_int(row["attempts"]), numeric=True)
        + _cell(_seconds(row["duration_s"]), numeric=True)
        + _cell(_pct(row["of_wall"]), numeric=True)
        + _cell(_pct(row["of_serial"]), numeric=True)
        + "</tr>"
        for row in stage["slowest"]
    ]
    slowest = (
        "<h3>Slowest instances</h3>"
        + _table(
            ["Key", "Status", "Attempts", "Time", "Of stage wall", "Of stage's summed time"],
            slowest_rows,
            cls="slowest",
        )
        if slowest_rows
        else ""
    )
    instances = (
        f"<h3>Instances</h3><div class='instances' data-stage-index='{index}'></div>"
        if stage["table"]["key"]
        else ""
    )
    return (
        f'<section class="stage" id="stage-{index}" data-stage="{name}">'
        f"<h2>Stage {name}</h2><p>{' · '.join(facts)}</p>"
        f"{chart}{slowest}{instances}</section>"
    )


def _failures(model: Mapping[str, Any]) -> str:
    groups = model["failures"]
    if not groups:
        return '<section id="failures"><h2>Failures</h2><p>No attempt failed.</p></section>'
    parts = ['<section id="failures"><h2>Failures by cause</h2>']
    for group in groups:
        cause = escape(group["cause"])
        items = []
        for item in group["items"]:
            links = " ".join(
                f'<a href="{escape(href)}">{escape(name)}</a>' for name, href in item["logs"]
            )
            detail = (
                f"<details><summary>detail</summary><pre>{escape(item['detail'])}</pre></details>"
                if item["detail"]
                else ""
            )
            final = "" if item["final"] else ' <span class="tag">retried</span>'
            items.append(
                f'<li class="failure" data-stage="{escape(item["stage"])}" '
                f'data-key="{escape(item["key"])}" data-attempt="{item["attempt"]}">'
                f"<b>{escape(item['stage'])}/{escape(item['key'])}</b> attempt "
                f"{item['attempt']}{final}: <span class='message'>{escape(item['message'])}"
                f"</span>{detail}"
                + (f'<div class="logs">logs: {links}</div>' if links else "")
                + "</li>"
            )
        more = (
            f"<p class='note'>and {_int(group['more'])} more attempts with this cause "
            f"(<code>phalanx status</code> and <code>phalanx logs</code> list them all).</p>"
            if group["more"]
            else ""
        )
        parts.append(
            f'<details class="cause" data-cause="{cause}" open><summary><b>{cause}</b>: '
            f'<span data-field="attempts">{group["attempts"]}</span> failed '
            f"{_plural(group['attempts'], 'attempt')}, "
            f'<span data-field="instances">{group["instances_failed"]}</span> '
            f"{_plural(group['instances_failed'], 'instance')} failed for good</summary>"
            f"<ul>{''.join(items)}</ul>{more}</details>"
        )
    parts.append("</section>")
    return "".join(parts)


def _usage_cells(usage: Mapping[str, float]) -> str:
    return (
        _cell(_int(usage["requests"]), numeric=True)
        + _cell(_int(usage["input_tokens"]), numeric=True)
        + _cell(_int(usage["output_tokens"]), numeric=True)
        + _cell(_int(usage["cache_read_tokens"] + usage["cache_write_tokens"]), numeric=True)
        + _cell(_usd(usage["cost_usd"]), "cost", numeric=True)
        + _cell(_int(usage["unpriced"]), numeric=True)
    )


def _cost(model: Mapping[str, Any]) -> str:
    head = ["Requests", "Input tokens", "Output tokens", "Cache tokens", "Cost", "Unpriced"]
    by_stage = [
        f'<tr data-stage="{escape(stage["name"])}"><td>{escape(stage["name"])}</td>'
        f"<td>{escape(stage['model'] or '–')}</td>{_usage_cells(stage['usage'])}</tr>"
        for stage in model["stages"]
    ]
    by_model = [
        f'<tr data-model="{escape(row["model"])}"><td>{escape(row["model"])}</td>'
        f"<td>{escape(', '.join(row['stages']))}</td>{_usage_cells(row['usage'])}</tr>"
        for row in model["models"]
    ]
    return (
        '<section id="cost"><h2>Cost</h2><h3>Per stage</h3>'
        + _table(["Stage", "Model", *head], by_stage, cls="cost-stage")
        + "<h3>Per model</h3>"
        + _table(["Model", "Stages", *head], by_model, cls="cost-model")
        + "</section>"
    )


def _scheduling(model: Mapping[str, Any]) -> str:
    events = model["scheduling"]
    if not events:
        return ""
    rows = []
    for event in events:
        kind = event["type"]
        if kind == "limit_changed":
            what = f"{event['old']} → {event['new']} ({event['reason']})"
            where = event.get("stage") or event.get("lane") or ""
        elif kind == "lane_paused":
            what = f"paused {event['seconds']:.1f} s"
            where = event["lane"]
        else:
            what = f"budget reached: {event['reason']}"
            where = event["stage"]
        rows.append(
            f"<tr><td class='num'>{_seconds(event['t'])}</td><td>{escape(kind)}</td>"
            f"<td>{escape(str(where))}</td><td>{escape(what)}</td></tr>"
        )
    more = (
        f"<p class='note'>and {_int(model['scheduling_more'])} more.</p>"
        if model["scheduling_more"]
        else ""
    )
    return (
        '<section id="scheduling"><h2>Scheduling events</h2>'
        + _table(["At", "Event", "Stage or lane", "What"], rows)
        + more
        + "</section>"
    )
