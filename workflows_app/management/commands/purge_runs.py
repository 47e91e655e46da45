"""Remove old finished runs with their task runs, events and Celery results, batch by batch."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from workflows_app.retention import PurgeCounts, runs_purge


def _positive(kind: type) -> Any:
    def parse(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise CommandError(f"expected a number, got '{value}'") from None
        if number <= 0:
            raise CommandError(f"expected a number above 0, got '{value}'")
        return number

    return parse


class Command(BaseCommand):
    help = (
        "Remove runs that finished more than --older-than DAYS ago, with their task runs, events and stored "
        "Celery results, in batches of --batch-size, each its own short transaction."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than", type=_positive(float), required=True, metavar="DAYS", help="age of the finish, in days"
        )
        parser.add_argument("--batch-size", type=_positive(int), default=1000, metavar="N", help="runs per batch")
        parser.add_argument("--dry-run", action="store_true", help="count what would be removed, remove nothing")

    def handle(self, *args: Any, **options: Any) -> None:
        started = time.monotonic()

        def progress(counts: PurgeCounts) -> None:
            if options["verbosity"] >= 2:
                self.stdout.write(f"batch {counts.batches}: {counts.runs} run(s) so far")

        counts = runs_purge(
            older_than=timedelta(days=options["older_than"]),
            batch_size=options["batch_size"],
            dry_run=options["dry_run"],
            progress=progress,
        )
        if options["dry_run"]:
            self.stdout.write(
                f"would remove {counts.runs} run(s), {counts.task_runs} task run(s), {counts.events} event(s)"
            )
            return
        self.stdout.write(
            f"removed {counts.runs} run(s), {counts.task_runs} task run(s), {counts.events} event(s), "
            f"{counts.results} Celery result(s) in {counts.batches} batch(es), {time.monotonic() - started:.1f}s"
        )
