"""OpenTelemetry export (``pip install 'phalanx[otel]'``): a run as traces.

:class:`OTelHandler` is an event handler (pass it as ``on_event``) that turns a run into one
span per run, a child span per stage and a grandchild span per attempt. Attempt spans carry
their outcome, cause, tokens and cost; stage spans their counts; a failed attempt's span has
an error status. ``phalanx run --otel`` installs one that exports over OTLP/HTTP to where the
standard ``OTEL_EXPORTER_OTLP_*`` variables say (by default ``http://localhost:4318``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._errors import UnknownPluginError
from ._events import (
    AttemptEnded,
    AttemptStarted,
    BudgetReached,
    Event,
    LanePaused,
    LimitChanged,
    RunEnded,
    RunStarted,
    StageEnded,
    StageStarted,
)

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

__all__ = ["OTelHandler", "otlp_provider"]

_INSTALL = "the OpenTelemetry export needs its extra: pip install 'phalanx[otel]'"


def _trace() -> Any:
    try:
        return importlib.import_module("opentelemetry.trace")
    except ImportError:
        raise UnknownPluginError(_INSTALL) from None


def otlp_provider() -> TracerProvider:
    """A tracer provider exporting in batches over OTLP/HTTP, configured by the standard
    ``OTEL_*`` environment variables (service name ``phalanx`` unless ``OTEL_SERVICE_NAME``
    says otherwise)."""
    try:
        resources = importlib.import_module("opentelemetry.sdk.resources")
        sdk_trace = importlib.import_module("opentelemetry.sdk.trace")
        export = importlib.import_module("opentelemetry.sdk.trace.export")
        otlp = importlib.import_module("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    except ImportError:
        raise UnknownPluginError(_INSTALL) from None
    resource = resources.Resource.create({"service.name": "phalanx"})
    provider: TracerProvider = sdk_trace.TracerProvider(resource=resource)
    provider.add_span_processor(export.BatchSpanProcessor(otlp.OTLPSpanExporter()))  # type: ignore[attr-defined]
    return provider


class OTelHandler:
    """Spans for a run, its stages and its attempts, from the run's events.

    ``provider`` is a ``TracerProvider`` (the global one by default). The spans are started
    and ended as the events come, with the events' own times, so a trace shows the run's real
    shape: the stages side by side or one after another, the attempts inside them, retries as
    sibling attempts, speculative backups beside their originals.
    """

    def __init__(self, provider: TracerProvider | None = None) -> None:
        trace = _trace()
        self._trace = trace
        self.tracer: Tracer = trace.get_tracer("phalanx", tracer_provider=provider)
        self._run: Span | None = None
        self._stages: dict[str, Span] = {}
        self._attempts: dict[tuple[str, str, int], Span] = {}

    def _child(self, name: str, parent: Span | None, attributes: dict[str, Any]) -> Span:
        context = self._trace.set_span_in_context(parent) if parent is not None else None
        span: Span = self.tracer.start_span(name, context=context, attributes=attributes)
        return span

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self._run = self._child(
                "phalanx.run",
                None,
                {"phalanx.run_id": event.run_id, "phalanx.pipeline": event.pipeline},
            )
        elif isinstance(event, StageStarted):
            self._stages[event.stage] = self._child(
                f"phalanx.stage {event.stage}",
                self._run,
                {
                    "phalanx.stage": event.stage,
                    "phalanx.total": event.total,
                    "phalanx.concurrency": event.concurrency,
                    "phalanx.runner": event.runner,
                },
            )
        elif isinstance(event, AttemptStarted):
            self._attempts[event.stage, event.key, event.attempt] = self._child(
                f"phalanx.attempt {event.stage}/{event.key}",
                self._stages.get(event.stage, self._run),
                {
                    "phalanx.stage": event.stage,
                    "phalanx.key": event.key,
                    "phalanx.attempt": event.attempt,
                },
            )
        elif isinstance(event, AttemptEnded):
            self._attempt_ended(event)
        elif isinstance(event, StageEnded):
            stage = event.result
            span = self._stages.pop(stage.name, None)
            if span is not None:
                for name in ("committed", "cached", "failed", "skipped"):
                    span.set_attribute(f"phalanx.{name}", getattr(stage, name))
                span.set_attribute("phalanx.met_threshold", stage.met_threshold)
                usage = stage.usage
                span.set_attribute("phalanx.cost_usd", usage.cost_usd)
                span.set_attribute("phalanx.input_tokens", usage.input_tokens)
                span.set_attribute("phalanx.output_tokens", usage.output_tokens)
                if not stage.met_threshold:
                    span.set_status(self._trace.Status(self._trace.StatusCode.ERROR))
                span.end()
        elif isinstance(event, RunEnded):
            for span in [*self._attempts.values(), *self._stages.values()]:
                span.end()  # only after a stop: nothing is left open
            self._attempts.clear()
            self._stages.clear()
            if self._run is not None:
                self._run.set_attribute("phalanx.ok", event.ok)
                self._run.set_attribute("phalanx.cancelled", event.cancelled)
                if not event.ok:
                    self._run.set_status(self._trace.Status(self._trace.StatusCode.ERROR))
                self._run.end()
                self._run = None
        elif isinstance(event, LimitChanged | LanePaused | BudgetReached):
            self._note(event)

    def _attempt_ended(self, event: AttemptEnded) -> None:
        span = self._attempts.pop((event.stage, event.key, event.attempt), None)
        if span is None:
            return
        span.set_attribute("phalanx.outcome", "committed" if event.cause is None else "failed")
        span.set_attribute("phalanx.duration_s", event.duration_s)
        if event.usage is not None:
            span.set_attribute("phalanx.requests", event.usage.requests)
            span.set_attribute("phalanx.input_tokens", event.usage.input_tokens)
            span.set_attribute("phalanx.output_tokens", event.usage.output_tokens)
            span.set_attribute("phalanx.cost_usd", event.usage.cost_usd)
        if event.cause is not None:
            span.set_attribute("phalanx.cause", event.cause)
            if event.retry_in is not None:
                span.set_attribute("phalanx.retry_in", event.retry_in)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, event.message))
        span.end()

    def _note(self, event: LimitChanged | LanePaused | BudgetReached) -> None:
        """Limit changes, pauses and budget stops are events on the run's span."""
        if self._run is None:
            return
        if isinstance(event, LimitChanged):
            self._run.add_event(
                "phalanx.limit_changed",
                {
                    "phalanx.stage": event.stage or "",
                    "phalanx.lane": event.lane or "",
                    "phalanx.old": event.old,
                    "phalanx.new": event.new,
                    "phalanx.reason": event.reason,
                },
            )
        elif isinstance(event, LanePaused):
            self._run.add_event(
                "phalanx.lane_paused",
                {"phalanx.lane": event.lane, "phalanx.seconds": event.seconds},
            )
        else:
            self._run.add_event(
                "phalanx.budget_reached",
                {"phalanx.stage": event.stage, "phalanx.reason": event.reason},
            )
