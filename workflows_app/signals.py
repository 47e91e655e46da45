"""Celery signal handlers: thin, they hand each finished attempt to the engine."""

import traceback
from collections.abc import Callable
from typing import Any

from celery import signals, states

from .celery_task import event_of, with_database_retry


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

    record: Callable[[], None]
    if state == states.SUCCESS:
        record = lambda: engine.task_run_finish(  # noqa: E731
            trace_id=event["trace_id"], event_id=task_id, succeeded=True, result=retval
        )
    elif state == states.RETRY:
        record = lambda: engine.task_run_retrying(event_id=task_id, error=_describe(retval))  # noqa: E731
    else:
        record = lambda: engine.task_run_finish(  # noqa: E731
            trace_id=event["trace_id"], event_id=task_id, succeeded=False, error=_describe(retval)
        )
    with_database_retry(record, what="recording a task outcome")


def _describe(exc: Any) -> str:
    if isinstance(exc, BaseException):
        return "".join(traceback.format_exception(exc)).strip()[-10000:]
    return str(exc)


def connect() -> None:
    signals.task_postrun.connect(on_task_postrun, dispatch_uid="eventflow_task_postrun")
