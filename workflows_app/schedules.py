"""Schedules: django-celery-beat periodic tasks that start runs of a workflow, and the run each tick starts."""

from __future__ import annotations

import json
import logging

from celery.schedules import crontab as celery_crontab
from django.conf import settings
from django.db import transaction
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

from . import engine
from .models import WorkflowDefinition, WorkflowRun

logger = logging.getLogger(__name__)

SCHEDULE_TASK = "workflows_app.tasks.start_scheduled_run"
# The engine's own queue: `run_workers` always serves it.
SCHEDULE_QUEUE = "celery"
SOURCE_PREFIX = "schedule:"
# WorkflowRun.source holds "schedule:<name>" in 100 characters.
NAME_MAX_LENGTH = 100 - len(SOURCE_PREFIX)
CRONTAB_FIELDS = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")


class ScheduleError(ValueError):
    """A schedule that cannot be created, with a message naming the problem."""


def crontab_parse(expression: str) -> dict[str, str]:
    """The five fields of a cron expression ("*/5 * * * *": minute hour day-of-month month day-of-week)."""
    parts = expression.split()
    if len(parts) != 5:
        raise ScheduleError(f"a crontab expression has 5 fields (minute hour day month weekday), got {len(parts)}")
    fields = dict(zip(CRONTAB_FIELDS, parts, strict=True))
    try:
        celery_crontab(**fields)
    except (ValueError, TypeError) as exc:
        raise ScheduleError(f"invalid crontab expression '{expression}': {exc}") from None
    return fields


def schedule_source(name: str) -> str:
    """The `source` of the runs a schedule starts."""
    return f"{SOURCE_PREFIX}{name}"


def workflow_schedule_create(
    *,
    workflow: WorkflowDefinition,
    name: str,
    payload: dict,
    every_seconds: int | None = None,
    crontab: str = "",
    enabled: bool = True,
) -> PeriodicTask:
    """A periodic task that starts a run of `workflow` with `payload` every N seconds or on a crontab."""
    if bool(every_seconds) == bool(crontab.strip()):
        raise ScheduleError("give either an interval in seconds or a crontab expression")
    if not name or len(name) > NAME_MAX_LENGTH:
        raise ScheduleError(f"the schedule name needs 1 to {NAME_MAX_LENGTH} characters")
    try:
        payload = engine.run_payload_check(payload)
    except engine.EngineError as exc:
        raise ScheduleError(str(exc)) from None
    with transaction.atomic():
        if PeriodicTask.objects.filter(name=name).exists():
            raise ScheduleError(f"a periodic task named '{name}' already exists")
        interval = cron = None
        if every_seconds:
            if every_seconds < 1:
                raise ScheduleError("the interval must be at least 1 second")
            interval, _ = IntervalSchedule.objects.get_or_create(every=every_seconds, period=IntervalSchedule.SECONDS)
        else:
            cron, _ = CrontabSchedule.objects.get_or_create(**crontab_parse(crontab), timezone=settings.TIME_ZONE)
        return PeriodicTask.objects.create(
            name=name,
            task=SCHEDULE_TASK,
            interval=interval,
            crontab=cron,
            kwargs=json.dumps({"workflow": workflow.name, "payload": payload, "schedule": name}),
            queue=SCHEDULE_QUEUE,
            enabled=enabled,
            description=f"Starts a run of workflow '{workflow.name}'.",
        )


def workflow_schedule_list(*, workflow: WorkflowDefinition) -> list[PeriodicTask]:
    """The periodic tasks that start runs of this workflow."""
    tasks = PeriodicTask.objects.filter(task=SCHEDULE_TASK).select_related("interval", "crontab").order_by("name")
    return [t for t in tasks if _kwargs(t).get("workflow") == workflow.name]


def _kwargs(task: PeriodicTask) -> dict:
    try:
        value = json.loads(task.kwargs or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def scheduled_run_start(*, workflow: str, payload: dict, schedule: str, tick_id: str | None) -> WorkflowRun | None:
    """Start the run of one schedule tick; None when the workflow is inactive (its schedule idles).

    The tick's Celery task id is the run's idempotency key, so a tick message delivered twice
    (late acknowledgement after a worker crash) still starts one run.
    """
    definition = WorkflowDefinition.objects.filter(name=workflow).first()
    if definition is None:
        raise ScheduleError(f"schedule '{schedule}': workflow '{workflow}' does not exist")
    if not definition.is_active:
        logger.warning("schedule '%s': workflow '%s' is inactive, no run started", schedule, workflow)
        return None
    try:
        run, _ = engine.workflow_run_start(
            workflow=definition,
            payload=payload,
            idempotency_key=f"{SOURCE_PREFIX}{tick_id}" if tick_id else None,
            source=schedule_source(schedule)[:100],
        )
    except engine.EngineError as exc:
        # E.g. a payload edited in beat's admin, or kept from before the limit was lowered: the
        # tick fails, naming its schedule, and starts nothing.
        raise ScheduleError(f"schedule '{schedule}': {exc}") from None
    return run
