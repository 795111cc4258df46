"""The OpenTelemetry export: one span per run, stage and attempt, in that hierarchy, with
outcomes, causes, tokens and cost, checked through the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from phalanx import InstanceContext, RunHandle, Usage, fan_out
from phalanx.otel import OTelHandler


def test_a_run_becomes_a_trace_of_stages_and_attempts(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    handle = RunHandle()

    async def agent(ctx: InstanceContext) -> None:
        ctx.usage.add(Usage(requests=1, input_tokens=100, output_tokens=20, cost_usd=0.01))
        if ctx.key == "a":
            handle.tune(2)
        if ctx.key == "b" and ctx.attempt == 1:
            raise ConnectionError("flaky")
        (ctx.output_dir / "out.txt").write_text(ctx.key)

    stage = asyncio.run(
        fan_out(["a", "b"], agent, output="out/{PARTITION_KEY}/", project_dir=tmp_path,
                retries=1, concurrency=1, handle=handle, on_event=OTelHandler(provider))
    )  # fmt: skip
    assert stage.committed == 2

    spans = exporter.get_finished_spans()
    runs = [s for s in spans if s.name == "phalanx.run"]
    stages = [s for s in spans if s.name.startswith("phalanx.stage")]
    attempts = [s for s in spans if s.name.startswith("phalanx.attempt")]
    assert len(runs) == 1
    assert len(stages) == 1
    assert len(attempts) == 3  # a, b's failed first attempt, b's retry
    (run,), (stage_span,) = runs, stages
    assert stage_span.parent is not None
    assert stage_span.parent.span_id == run.context.span_id
    for span in attempts:
        assert span.parent is not None
        assert span.parent.span_id == stage_span.context.span_id
        assert span.attributes is not None
        assert span.attributes["phalanx.input_tokens"] == 100
        assert span.attributes["phalanx.cost_usd"] == 0.01
    failed = [s for s in attempts if s.status.status_code == StatusCode.ERROR]
    assert len(failed) == 1
    assert failed[0].attributes is not None
    assert failed[0].attributes["phalanx.cause"] == "runner-error"
    assert failed[0].attributes["phalanx.key"] == "b"
    assert stage_span.attributes is not None
    assert stage_span.attributes["phalanx.committed"] == 2
    assert [e.name for e in run.events] == ["phalanx.limit_changed"]
    assert run.status.status_code != StatusCode.ERROR
