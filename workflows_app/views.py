"""Server-rendered status pages: the run list, a run (with its live fragment), a workflow, the queues."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any

from django.contrib.auth.mixins import LoginRequiredMixin
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.urls import reverse
from django.utils import timezone
from django.utils.http import urlencode
from django.views.generic import TemplateView

from . import graph_svg, selectors
from .engine import graph_from_spec
from .models import TaskRun, WorkflowRun

RUNS_PER_PAGE = 50
RECENT_RUNS = 20
# Long payloads, results and errors are cut: the live fragment is fetched every second per viewer.
PAYLOAD_PREVIEW_CHARS = 20_000
RESULT_PREVIEW_CHARS = 160
ERROR_PREVIEW_CHARS = 200


def home(request: HttpRequest) -> HttpResponse:
    return redirect("workflows_app:run-list")


def format_duration(seconds: float | None) -> str:
    """A short human duration: 340 ms, 2.4 s, 3m 05s, 2h 03m; empty for unknown."""
    if seconds is None:
        return ""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _between(start: datetime | None, end: datetime | None) -> float | None:
    return (end - start).total_seconds() if start and end else None


def _preview(value: Any, limit: int) -> str:
    if value in (None, {}, [], ""):
        return ""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _first_line(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    # A Python traceback's useful line is its last one; any other message leads with it.
    line = lines[-1] if lines and lines[0].startswith("Traceback") else (lines[0] if lines else "")
    return _preview(line.strip(), ERROR_PREVIEW_CHARS)


class _KnownCountPaginator(Paginator):
    """A paginator told its total, which the per-status aggregate already gave: one COUNT saved."""

    def __init__(self, object_list: Any, per_page: int, *, count: int):
        super().__init__(object_list, per_page)
        self._known_count = count

    @cached_property
    def count(self) -> int:
        return self._known_count


class PageMixin(LoginRequiredMixin):
    """Login required; the nav entry to highlight and the status palette for base.html."""

    nav = ""

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        context.update(nav=self.nav, status_css=graph_svg.status_css())
        return context


class RunListView(PageMixin, TemplateView):
    template_name = "workflows_app/run_list.html"
    nav = "runs"

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        params = self.request.GET
        workflow = params.get("workflow", "").strip()
        status = params.get("status", "").strip().upper()
        if status not in WorkflowRun.Status.values:
            status = ""
        counts = selectors.run_status_counts(workflow=workflow or None)
        total = counts[status] if status else sum(counts.values())
        runs = selectors.run_list(workflow=workflow or None, status=status or None)
        page = _KnownCountPaginator(runs, RUNS_PER_PAGE, count=total).get_page(params.get("page"))
        now = timezone.now()
        for run in page.object_list:
            run.elapsed = format_duration(_between(run.created_at, run.finished_at or now))
        context.update(
            page=page,
            runs=page.object_list,
            workflow=workflow,
            status=status,
            workflows=list(selectors.workflow_list().values_list("name", flat=True)),
            statuses=WorkflowRun.Status.values,
            status_counts=[(s, counts[s]) for s in WorkflowRun.Status.values],
            total=sum(counts.values()),
            # Query strings that keep the current filters across pages and status links.
            filter_query=urlencode({k: v for k, v in (("workflow", workflow), ("status", status)) if v}),
            workflow_query=urlencode({"workflow": workflow}) if workflow else "",
        )
        return context


def run_live_context(*, trace_id: str) -> dict[str, Any]:
    """Everything the live fragment draws: the run, its coloured DAG, timeline, task rows and events."""
    run = selectors.run_page_get(trace_id=trace_id)
    if run is None:
        raise Http404("No run with this trace id.")
    # The run's own version snapshot, already loaded: no query, and never the live definition.
    graph = graph_from_spec(run.version.spec, version=run.workflow_version)
    now = timezone.now()
    tasks = {task.node_key: task for task in run.tasks.all()}
    rows = []
    nodes = []
    for key, spec in graph.nodes.items():
        task = tasks.get(key)
        if task is None:
            continue
        running = bool(task.started_at) and task.status in (TaskRun.Status.STARTED, TaskRun.Status.RETRY)
        duration = _between(task.started_at, task.finished_at or (now if running else None))
        waiting = _between(task.queued_at, task.started_at or task.finished_at or now) if task.queued_at else None
        if task.line_position is not None:
            place = f"#{task.line_position} in line"
        elif task.status == TaskRun.Status.QUEUED:
            place = "sent to a worker"
        else:
            place = ""
        row = {
            "task": task,
            "key": key,
            "duration": format_duration(duration),
            "running": running,
            "waited": format_duration(waiting),
            "place": place,
            "error": _first_line(task.error),
            "error_full": _preview(task.error, 2000),
        }
        rows.append(row)
        detail = place or " \u00b7 ".join(
            part
            for part in (
                f"attempt {task.attempts}" if task.attempts else "",
                row["duration"],
            )
            if part
        )
        nodes.append(
            graph_svg.SvgNode(
                key=key,
                lines=(spec.event_type, detail or task.get_status_display()),
                status=task.status,
                href=f"#task-{key}",
                tooltip=f"{key} \u00b7 {spec.task} \u00b7 {task.status}",
            )
        )
    edges = [(source, target) for target, sources in graph.preds.items() for source in sources]
    timeline_end = run.finished_at or now
    events = [
        {
            "event": event,
            "node": (event.context or {}).get("node", ""),
            "attempt": (event.context or {}).get("attempt", ""),
            "result": _preview(event.result, RESULT_PREVIEW_CHARS),
        }
        for event in selectors.run_events(trace_id=str(run.trace_id))
    ]
    counts: dict[str, int] = {}
    for task in tasks.values():
        counts[task.status] = counts.get(task.status, 0) + 1
    return {
        "run": run,
        "rows": rows,
        "events": events,
        "dag_svg": graph_svg.dag_svg(nodes, edges, label=f"{run.workflow.name} run {run.trace_id}"),
        "timeline_svg": graph_svg.timeline_svg(
            [
                graph_svg.TimelineRow(
                    key=r["key"],
                    status=r["task"].status,
                    queued_at=r["task"].queued_at,
                    started_at=r["task"].started_at,
                    finished_at=r["task"].finished_at,
                )
                for r in rows
            ],
            start=run.created_at,
            end=max(timeline_end, run.created_at + timedelta(milliseconds=1)),
        ),
        "task_counts": [(s, counts[s]) for s in graph_svg.TASK_STATUSES if counts.get(s)],
        "legend": graph_svg.legend(),
        "run_duration": format_duration(_between(run.created_at, run.finished_at or now)),
        "live_url": reverse("workflows_app:run-live", args=[run.trace_id]),
    }


class RunDetailView(PageMixin, TemplateView):
    template_name = "workflows_app/run_detail.html"
    nav = "runs"

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        context.update(run_live_context(trace_id=str(kwargs["trace_id"])))
        payload = json.dumps(context["run"].payload, indent=2, sort_keys=True, default=str)
        context["payload_json"] = _preview(payload, PAYLOAD_PREVIEW_CHARS)
        return context


class RunLiveFragmentView(LoginRequiredMixin, TemplateView):
    """The part of the run page that changes, polled by the page while the run is not final."""

    template_name = "workflows_app/_run_live.html"

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        context.update(run_live_context(trace_id=str(kwargs["trace_id"])))
        return context

    def render_to_response(self, context: dict[str, Any], **kwargs: Any) -> HttpResponse:
        response = super().render_to_response(context, **kwargs)
        response["Cache-Control"] = "no-store"
        return response


class WorkflowDetailView(PageMixin, TemplateView):
    template_name = "workflows_app/workflow_detail.html"
    nav = ""

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        workflow = selectors.workflow_page_get(name=kwargs["name"])
        if workflow is None:
            raise Http404("No workflow with this name.")
        nodes = list(workflow.nodes.all())
        key_of = {node.id: node.key for node in nodes}
        edges = [(key_of[e.source_id], key_of[e.target_id]) for e in workflow.edges.all()]
        after: dict[str, list[str]] = {}
        for source, target in edges:
            after.setdefault(target, []).append(source)
        for node in nodes:
            node.params_json = json.dumps(node.params, sort_keys=True) if node.params else ""
            node.after = after.get(node.key, [])
        svg_nodes = [
            graph_svg.SvgNode(
                key=node.key,
                lines=(
                    f"{node.event_type_id} ({node.event_type.concurrency})",
                    node.task.rsplit(".", 1)[-1],
                ),
                href=f"#node-{node.key}",
                tooltip=f"{node.key} \u00b7 {node.task} \u00b7 {node.event_type_id}",
            )
            for node in nodes
        ]
        runs = selectors.workflow_recent_runs(workflow=workflow, limit=RECENT_RUNS)
        now = timezone.now()
        for run in runs:
            run.elapsed = format_duration(_between(run.created_at, run.finished_at or now))
        context.update(
            workflow=workflow,
            nodes=nodes,
            edges=edges,
            versions=list(workflow.versions.all()),
            runs=runs,
            dag_svg=graph_svg.dag_svg(svg_nodes, edges, label=f"{workflow.name} definition"),
        )
        return context


class QueueListView(PageMixin, TemplateView):
    template_name = "workflows_app/queue_list.html"
    nav = "queues"

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        now = timezone.now()
        queues = list(selectors.event_type_queue_list())
        for queue in queues:
            queue.running = queue.running or 0
            queue.queued = queue.queued or 0
            queue.oldest_wait = format_duration(_between(queue.oldest_queued_at, now))
            queue.full = queue.running >= queue.concurrency
            queue.usage = min(100, round(100 * queue.running / queue.concurrency)) if queue.concurrency else 0
        context.update(queues=queues, now=now)
        return context
