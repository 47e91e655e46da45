"""manage.py cancel_run: cancel a run; every unfinished task ends REVOKED."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from workflows_app import engine

from ._helpers import run_get_or_error


class Command(BaseCommand):
    help = (
        "Cancel a run by trace_id: unfinished tasks end REVOKED, running ones are terminated. "
        "A run that already ended is left as it is."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("trace_id", metavar="TRACE_ID", help="The run's trace_id (a uuid).")

    def handle(self, *args: Any, trace_id: str, **options: Any) -> None:
        run = run_get_or_error(trace_id)
        was_final = run.is_final
        try:
            run = engine.workflow_run_cancel(trace_id=str(run.trace_id))
        except engine.EngineError as exc:
            raise CommandError(str(exc)) from None
        note = " (already final, nothing changed)" if was_final else ""
        self.stdout.write(f"{run.trace_id} {run.status}{note}")
