"""manage.py retry_run: re-run the failed, upstream-failed and revoked tasks of a finished run."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from workflows_app import engine

from ._helpers import run_get_or_error


class Command(BaseCommand):
    help = (
        "Retry a failed or canceled run by trace_id: its failed, upstream-failed and revoked tasks run "
        "again under the same trace_id; successful tasks and their results are kept."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("trace_id", metavar="TRACE_ID", help="The run's trace_id (a uuid).")

    def handle(self, *args: Any, trace_id: str, **options: Any) -> None:
        run = run_get_or_error(trace_id)
        try:
            run = engine.workflow_run_retry(trace_id=str(run.trace_id))
        except engine.EngineError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"{run.trace_id} {run.status}")
