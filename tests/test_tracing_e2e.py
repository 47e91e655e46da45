"""End to end: traces from real worker processes, received over OTLP/HTTP by a receiver in the test and
read with the OpenTelemetry protocol's own messages: one trace per run, whose id is the run's trace_id,
the trigger its root, and a span for every task attempt under it."""

from __future__ import annotations

import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

import tests.e2e_tasks  # noqa: F401 - registers the test tasks here as the workers' --include does there
from tests import factories
from tests.e2e import trigger, wait_final, wait_for
from workflows_app import tracing
from workflows_app.models import TaskRun

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

ECHO, FLAKY = "workflows_app.tasks.echo", "tests.e2e_tasks.flaky"


class Collector:
    """An OTLP/HTTP trace receiver: every span it was sent, by trace id."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                request = ExportTraceServiceRequest.FromString(body)
                with collector.lock:
                    for resource_spans in request.resource_spans:
                        for scope_spans in resource_spans.scope_spans:
                            collector.spans.extend(scope_spans.spans)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def of(self, trace_id: str) -> list[Any]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == uuid.UUID(trace_id).bytes]


@pytest.fixture
def collector(monkeypatch):
    found = Collector()
    monkeypatch.setenv(tracing.ENDPOINT, found.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    yield found
    tracing.flush()
    found.server.shutdown()


def test_each_run_is_one_trace_with_a_span_per_attempt_under_its_trigger(workers, api, collector, monkeypatch):
    # a -> (b, flaky c): c fails once, then succeeds on its retry.
    nodes = [("a", ECHO), ("b", ECHO), {"key": "c", "task": FLAKY, "max_retries": 1, "retry_delay": 1}]
    factories.workflow(factories.spec("traced", nodes, [["a", "b"], ["a", "c"]], event_type="e2e"))
    env = {tracing.ENDPOINT: collector.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    runs = [trigger(api, "traced") for _ in range(2)]
    tests.e2e_tasks._redis().set(f"fail-first:{runs[0]}", 1, ex=300)  # the first run's c fails once
    workers(["celery", "e2e"], concurrency=2, env=env)
    assert set(wait_final(runs).values()) == {"SUCCESS"}
    assert TaskRun.objects.get(run_id=runs[0], node_key="c").attempts == 2
    tracing.flush()
    for run in runs:
        attempts = 4 if run == runs[0] else 3
        wait_for(lambda run=run, n=attempts + 1: len(collector.of(run)) >= n, timeout=60, what=f"spans of {run}")
        spans = collector.of(run)
        assert len(spans) == attempts + 1
        roots = [s for s in spans if not s.parent_span_id]
        assert [r.name for r in roots] == ["trigger traced"]
        root = roots[0]
        assert root.span_id == tracing.trigger_span_id(run).to_bytes(8, "big")
        children = [s for s in spans if s is not root]
        assert all(s.parent_span_id == root.span_id for s in children)
        names = sorted(s.name for s in children)
        expected = ["a attempt 1", "b attempt 1", "c attempt 1"] + (["c attempt 2"] if attempts == 4 else [])
        assert names == expected
        event_ids = {a.value.string_value for s in children for a in s.attributes if a.key == "eventflow.event_id"}
        stored = set(TaskRun.objects.filter(run_id=run).values_list("current_event_id", flat=True))
        assert {str(e) for e in stored} <= event_ids
