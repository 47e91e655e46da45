"""Celery signal handlers: thin, they hand each finished attempt to the engine.

Tasks built on `EventTask` (every task of the app unless a task names another base class) record
their own outcome; this handler covers the others.
"""

from typing import Any

from celery import signals, states

from .celery_task import EventTask, describe_error, event_of, record_outcome, record_retrying


def on_task_postrun(
    sender: Any = None,
    task_id: str | None = None,
    args: Any = None,
    retval: Any = None,
    state: str | None = None,
    **_: Any,
) -> None:
    if isinstance(sender, EventTask):
        return
    event = event_of(args, task_id)
    if event is None or state in (states.IGNORED, None):
        return
    if state == states.SUCCESS:
        record_outcome(event, succeeded=True, result=retval)
    elif state == states.RETRY:
        record_retrying(event, retval)
    else:
        record_outcome(event, succeeded=False, error=describe_error(retval))


def connect() -> None:
    signals.task_postrun.connect(on_task_postrun, dispatch_uid="eventflow_task_postrun")
