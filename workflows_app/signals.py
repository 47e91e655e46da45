"""Celery signal handlers: thin, they hand each finished attempt to the engine."""

import traceback
from typing import Any

from celery import signals, states

from .celery_task import event_of


def on_task_postrun(
    sender: Any = None,
    task_id: str | None = None,
    args: Any = None,
    retval: Any = None,
    state: str | None = None,
    **_: Any,
) -> None:
    event = event_of(args, task_id)
    if event is None or state in (states.IGNORED, None):
        return
    from . import engine

    if state == states.SUCCESS:
        engine.task_run_finish(trace_id=event["trace_id"], event_id=task_id, succeeded=True, result=retval)
    elif state == states.RETRY:
        engine.task_run_retrying(event_id=task_id, error=_describe(retval))
    else:
        engine.task_run_finish(
            trace_id=event["trace_id"],
            event_id=task_id,
            succeeded=False,
            error=_describe(retval),
        )


def _describe(exc: Any) -> str:
    if isinstance(exc, BaseException):
        return "".join(traceback.format_exception(exc)).strip()[-10000:]
    return str(exc)


def connect() -> None:
    signals.task_postrun.connect(on_task_postrun, dispatch_uid="eventflow_task_postrun")
