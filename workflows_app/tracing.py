"""OpenTelemetry traces of runs: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, every trigger and every task
attempt is a span, exported over OTLP/HTTP by the OpenTelemetry SDK, whose trace id is the run's
`trace_id` (the same 128 bits), so a tracing backend shows one run as one trace.

The run's trace id is known everywhere (every Event carries it), so no context is propagated in the
messages: the trigger's span gets the run's trace id and a span id derived from it
(`trigger_span_id`), through the SDK's public `IdGenerator`, and each attempt's span, in whichever
worker it runs, takes that span as its parent. Celery's own instrumentation would start a trace per
message instead, whose id is not the run's. Each process makes its own tracer provider on first use
(a prefork pool process or a forked web worker included: the SDK's export thread does not survive a
fork), and the SDK's standard `OTEL_*` variables configure the exporter and its batching.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import hashlib
import os
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"

_ids: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("eventflow_span_ids", default=None)
_tracers: dict[tuple[int, str], Any] = {}


def enabled() -> bool:
    return bool(os.environ.get(ENDPOINT))


def trigger_span_id(trace_id: uuid.UUID | str) -> int:
    """The span id of a run's trigger: 64 bits of its trace id's hash, never 0."""
    digest = hashlib.sha256(uuid.UUID(str(trace_id)).bytes).digest()
    return int.from_bytes(digest[:8], "big") or 1


def _tracer() -> Any:
    key = (os.getpid(), os.environ.get(ENDPOINT, ""))
    tracer = _tracers.get(key)
    if tracer is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator

        class RunIds(IdGenerator):
            """The ids `_ids` names for the span being started (a trigger's), else random ones."""

            random = RandomIdGenerator()

            def generate_trace_id(self) -> int:
                given = _ids.get()
                return given[0] if given else self.random.generate_trace_id()

            def generate_span_id(self) -> int:
                given = _ids.get()
                return given[1] if given else self.random.generate_span_id()

        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "eventflow")})
        provider = TracerProvider(resource=resource, id_generator=RunIds())
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        atexit.register(provider.shutdown)
        tracer = _tracers[key] = provider.get_tracer("eventflow")
        tracer.provider = provider
    return tracer


def flush() -> None:
    """Export what this process has finished (a pool process about to exit)."""
    for tracer in _tracers.values():
        tracer.provider.force_flush()


def trigger_span(*, trace_id: uuid.UUID | str, workflow: str, source: str, created_at: datetime) -> None:
    """The span of a run's start: the root of its trace."""
    if not enabled():
        return
    from opentelemetry.trace import SpanKind

    run = uuid.UUID(str(trace_id))
    token = _ids.set((run.int, trigger_span_id(run)))
    try:
        span = _tracer().start_span(
            f"trigger {workflow}",
            kind=SpanKind.PRODUCER,
            start_time=int(created_at.timestamp() * 1e9),
            attributes={"eventflow.trace_id": str(run), "eventflow.workflow": workflow, "eventflow.source": source},
        )
    finally:
        _ids.reset(token)
    span.end()


@contextlib.contextmanager
def attempt_span(event: Mapping[str, Any]) -> Iterator[Any]:
    """The span of one task attempt, a child of its run's trigger; None when tracing is off."""
    if not enabled():
        yield None
        return
    from opentelemetry.trace import (
        NonRecordingSpan,
        SpanContext,
        SpanKind,
        Status,
        StatusCode,
        TraceFlags,
        set_span_in_context,
    )

    run = uuid.UUID(str(event["trace_id"]))
    context = event.get("context") or {}
    parent = NonRecordingSpan(
        SpanContext(run.int, trigger_span_id(run), is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    )
    attributes = {
        "eventflow.trace_id": str(run),
        "eventflow.event_id": str(event["event_id"]),
        "eventflow.node": str(context.get("node", "")),
        "eventflow.attempt": int(context.get("attempt", 1)),
        "eventflow.event_type": str(event.get("event_type", "")),
    }
    if context.get("map_index") is not None:
        attributes["eventflow.map_index"] = int(context["map_index"])
    name = f"{context.get('node', event.get('task_name', 'task'))} attempt {attributes['eventflow.attempt']}"
    with _tracer().start_as_current_span(
        name,
        context=set_span_in_context(parent),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
        record_exception=True,
        set_status_on_exception=True,
    ) as span:
        yield span
        if span.is_recording() and span.status.status_code == StatusCode.UNSET:
            span.set_status(Status(StatusCode.OK))
