"""manage.py workflow_status: a run's header and its task table, as the status page shows them."""

from __future__ import annotations

from collections import Counter
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from workflows_app import selectors
from workflows_app.engine import graph_for_version
from workflows_app.models import TaskRun

from ._helpers import error_summary, run_get_or_error, table_format, time_format, waiting_for

# The instances of a mapped node listed one by one: running, or ended without success.
SHOWN_INSTANCES = {
    TaskRun.Status.STARTED,
    TaskRun.Status.RETRY,
    TaskRun.Status.FAILURE,
    TaskRun.Status.REVOKED,
}
HEADERS = ["node", "event type", "status", "attempts", "queued", "started", "finished", "duration", "error"]


class Command(BaseCommand):
    help = "Show a run (by trace_id) and every task of it: status, attempts, timings (UTC) and error."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("trace_id", metavar="TRACE_ID", help="The run's trace_id (a uuid).")

    def handle(self, *args: Any, trace_id: str, **options: Any) -> None:
        run = run_get_or_error(trace_id)
        header = [
            ("trace_id", str(run.trace_id)),
            ("workflow", run.workflow.name),
            ("version", str(run.workflow_version)),
            ("status", run.status),
            ("source", run.source),
            ("created", time_format(run.created_at)),
            ("finished", time_format(run.finished_at)),
        ]
        for label, value in header:
            self.stdout.write(f"{label + ':':<10} {value}")
        rows = []
        tasks = selectors.run_tasks(run=run)
        instances: dict[str, list[TaskRun]] = {}
        for task in tasks:
            if task.map_index is not None:
                instances.setdefault(task.node_key, []).append(task)
        graph = graph_for_version(run.version_id)
        for task in tasks:
            status = task.status
            if task.status == TaskRun.Status.DEFERRED and task.node_key in graph.nodes:
                status += f" (waits for {waiting_for(task, graph.nodes[task.node_key].kind)})"
            if task.map_index is None and task.node_key in instances:
                counted = Counter(t.status for t in instances[task.node_key])
                status += f" ({', '.join(f'{n} {s}' for s, n in sorted(counted.items()))})"
            elif task.map_index is not None and task.status not in SHOWN_INSTANCES:
                continue  # a mapped node's instances are counted on its row; those running or failed are listed
            duration = task.duration
            rows.append(
                [
                    task.node_key if task.map_index is None else f"{task.node_key}[{task.map_index}]",
                    task.event_type_id or "",
                    status,
                    str(task.attempts),
                    time_format(task.queued_at, short=True),
                    time_format(task.started_at, short=True),
                    time_format(task.finished_at, short=True),
                    "-" if duration is None else f"{duration:.3f}s",
                    error_summary(task.error, limit=80) or "-",
                ]
            )
        self.stdout.write("")
        self.stdout.write(table_format(HEADERS, rows))
