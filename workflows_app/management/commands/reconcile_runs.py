"""Settle attempts whose worker was lost; workers do this on their own, this is for cron or by hand."""

from typing import Any

from django.core.management.base import BaseCommand

from workflows_app import engine


class Command(BaseCommand):
    help = (
        "Retry or fail started tasks whose lease lapsed (their worker died), freeing their slots; send again "
        "tasks whose message was lost; and recount each event type's held slots from its task rows."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        total = 0
        while settled := engine.task_runs_reconcile():
            total += settled
        self.stdout.write(f"settled {total} attempt(s)")
