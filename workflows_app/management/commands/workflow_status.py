"""manage.py workflow_status: a run's header and its task table, as the status page shows them."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from workflows_app import selectors

from ._helpers import error_summary, run_get_or_error, table_format, time_format

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
        for task in selectors.run_tasks(run=run):
            duration = task.duration
            rows.append(
                [
                    task.node_key,
                    task.event_type_id or "",
                    task.status,
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
