"""Built-in tasks: echo, sleep and fail take the Event as their only argument; the rest are maintenance tasks."""

import time
from datetime import timedelta

from celery import shared_task

from . import engine
from .retention import runs_purge
from .schedules import scheduled_run_start


@shared_task(name="workflows_app.tasks.echo")
def echo(event: dict) -> dict:
    return {
        "payload": event["payload"],
        "upstream": event["context"].get("upstream", {}),
    }


@shared_task(name="workflows_app.tasks.sleep")
def sleep(event: dict) -> dict:
    time.sleep(float(event["payload"].get("seconds", 0.1)))
    return {
        "payload": event["payload"],
        "upstream": event["context"].get("upstream", {}),
    }


@shared_task(name="workflows_app.tasks.fail")
def fail(event: dict) -> None:
    raise RuntimeError(event["payload"].get("message", "failed"))


@shared_task(name="workflows_app.tasks.start_scheduled_run", bind=True, eventflow_internal=True)
def start_scheduled_run(self, workflow: str, payload: dict | None = None, schedule: str = "") -> dict:
    """Start one run for a django-celery-beat schedule; its runs have source "schedule:<schedule>"."""
    run = scheduled_run_start(workflow=workflow, payload=payload or {}, schedule=schedule, tick_id=self.request.id)
    return {"trace_id": str(run.trace_id) if run else None, "workflow": workflow, "schedule": schedule}


@shared_task(name="workflows_app.tasks.purge_runs", eventflow_internal=True)
def purge_runs(older_than_days: float = 30, batch_size: int = 1000) -> dict:
    """The `purge_runs` command as a task, for a beat schedule; returns the rows removed per kind."""
    return runs_purge(older_than=timedelta(days=older_than_days), batch_size=batch_size).as_dict()


@shared_task(name="workflows_app.tasks.reconcile", eventflow_internal=True)
def reconcile() -> int:
    """The reconciler as a beat task: a backstop for the one every worker runs on its own timer."""
    total = 0
    while settled := engine.task_runs_reconcile():
        total += settled
    return total


@shared_task(name="workflows_app.tasks.admit", eventflow_internal=True, ignore_result=True)
def admit(event_type: str) -> None:
    """Admit from an event type's line once its rate window has room again; sent by admission itself,
    due then. A lost one is made up by the reconciler (`EventType.rate_wake_at`)."""
    engine.event_type_admit(name=event_type)
