"""The base class of every task on the app: asks the engine before an Event's attempt may run, and
records its outcome as soon as the body returns."""

import logging
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from celery import Task, states
from celery.exceptions import Ignore, Retry

from . import tracing
from .logs import attempt_context

logger = logging.getLogger(__name__)
T = TypeVar("T")


def with_database_retry(call: Callable[[], T], *, what: str) -> T:
    """Run `call`, retrying while the database is unreachable, up to EVENTFLOW["DB_RETRY_SECONDS"].

    Giving up at the first connection error would drop a completion during a short database outage,
    and with it the run.
    """
    from django.conf import settings
    from django.db import InterfaceError, OperationalError, connections

    deadline = time.monotonic() + settings.EVENTFLOW["DB_RETRY_SECONDS"]
    delay = 0.2
    while True:
        try:
            return call()
        except (OperationalError, InterfaceError) as exc:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("database unavailable while %s (%s); retrying in %.1fs", what, exc, delay)
            # Drop the broken connection so the next attempt opens a fresh one.
            for connection in connections.all(initialized_only=True):
                connection.close()
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def event_of(args: Any, task_id: str | None) -> dict | None:
    """The Event when a task was sent by the engine (its task id is the event id), else None."""
    if args and isinstance(args[0], dict) and task_id and args[0].get("event_id") == task_id:
        return args[0]
    return None


def describe_error(exc: Any) -> str:
    """The error text kept on the task: the traceback, last 10,000 characters."""
    if isinstance(exc, BaseException):
        return "".join(traceback.format_exception(exc)).strip()[-10000:]
    return str(exc)


def record_outcome(
    event: dict,
    *,
    succeeded: bool,
    result: Any = None,
    error: str = "",
    celery_result: dict | None = None,
    run_payload: dict | None = None,
) -> bool:
    """Record the attempt's outcome; True when Celery's result row was written with it."""
    from . import engine

    return with_database_retry(
        lambda: engine.task_run_finish(
            trace_id=event["trace_id"],
            event_id=event["event_id"],
            succeeded=succeeded,
            result=result,
            error=error,
            celery_result=celery_result,
            event=event,
            run_payload=run_payload,
        ),
        what="recording a task outcome",
    )


def celery_result_row(task: Task, retval: Any) -> dict | None:
    """The row django-celery-results would store for this success, built by its own backend, so the
    engine can write it in the transaction that records the outcome: one commit per task instead of
    two, and no separate read-then-insert. None when results go elsewhere or are not kept, or the
    value cannot be encoded (Celery then stores the task's outcome as it would)."""
    from celery.app.task import get_actual_ignore_result
    from django_celery_results.backends.database import DatabaseBackend

    backend, request = task.backend, task.request
    if not isinstance(backend, DatabaseBackend) or get_actual_ignore_result(task, request):
        return None
    try:
        content_type, content_encoding, result = backend.encode_content(backend.encode_result(retval, states.SUCCESS))
        meta = {**backend._get_meta_from_request(request), "children": backend.current_task_children(request)}
        row = backend._get_extended_properties(request, None)
        row.update(
            task_id=request.id,
            status=states.SUCCESS,
            result=result,
            content_type=content_type,
            content_encoding=content_encoding,
            meta=backend.encode_content(meta)[2],
        )
    except Exception:
        logger.debug("Celery's result row not built; Celery stores it", exc_info=True)
        return None
    return row


def record_retrying(event: dict, exc: Any) -> None:
    from . import engine

    with_database_retry(
        lambda: engine.task_run_retrying(event_id=event["event_id"], error=describe_error(exc)),
        what="recording a task retry",
    )


class EventTask(Task):
    """Refuses an attempt the database says must not run (final, revoked, or superseded), and
    records the outcome of one that ran.

    Celery's revoke list lives in worker memory and is lost on restart; the start check reads the
    durable state instead, so a cancel or a redelivered finished task never starts again. The
    outcome is recorded here, right after the body and before Celery acknowledges the message, so
    the successors are on their way while this process still does Celery's bookkeeping. A success's
    Celery result row is written in the same transaction (see `celery_result_row`).
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        event = event_of(args, request.id) if not request.called_directly else None
        if event is None:
            return super().__call__(*args, **kwargs)
        # Every line logged from here to the outcome's record names the attempt (workflows_app/logs.py).
        with attempt_context(event):
            return self._attempt(event, args, kwargs)

    def _attempt(self, event: dict, args: Any, kwargs: Any) -> Any:
        """Start the attempt, run the body, record the outcome."""
        request = self.request
        start = self._start(event, request.hostname or "")
        if not start:
            raise Ignore()
        with tracing.attempt_span(event):
            return self._run(event, start, args, kwargs)

    def _run(self, event: dict, start: Any, args: Any, kwargs: Any) -> Any:
        """Run the body of an attempt allowed to start, and record its outcome."""
        request = self.request
        try:
            retval = super().__call__(*args, **kwargs)
        except Retry as exc:
            _or_log(record_retrying, event, exc)
            raise
        except Ignore:
            raise
        except Exception as exc:
            _or_log(record_outcome, event, succeeded=False, error=describe_error(exc), run_payload=start.run_payload)
            raise
        row = celery_result_row(self, retval)
        if _or_log(
            record_outcome, event, succeeded=True, result=retval, celery_result=row, run_payload=start.run_payload
        ):
            # Written with the outcome: Celery's tracer skips its own store for an ignored result.
            request.ignore_result = True
        return retval

    @staticmethod
    def _start(event: dict, worker: str) -> Any:
        """Ask the engine whether the attempt may run. One that arrived before its due time (this
        host's clock runs ahead of the database's, by which Celery's ETA was set) waits out the
        difference, measured on this host's monotonic clock, then asks again."""
        from . import engine

        attempt = (event.get("context") or {}).get("attempt", 1)
        while True:
            start = with_database_retry(
                lambda: engine.task_run_start(event_id=event["event_id"], attempt=attempt, worker=worker),
                what="recording a task start",
            )
            if start or not start.wait:
                return start
            time.sleep(start.wait)


def _or_log(record: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Record, or log why not: Celery then stores the task's own outcome, which the reconciler takes
    once the attempt's lease lapses, so the body's result or error is not lost."""
    try:
        return record(*args, **kwargs)
    except Exception:
        logger.exception("could not record a task outcome; the reconciler will take Celery's stored result")
        return None
