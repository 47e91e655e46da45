"""The base class of every task on the app: asks the engine before an Event's attempt may run."""

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from celery import Task
from celery.exceptions import Ignore

logger = logging.getLogger(__name__)
T = TypeVar("T")


def with_database_retry(call: Callable[[], T], *, what: str) -> T:
    """Run `call`, retrying while the database is unreachable, up to EVENTFLOW["DB_RETRY_SECONDS"].

    Celery only logs a signal handler's exception, so giving up at the first connection error
    would silently drop a completion during a short database outage.
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


class EventTask(Task):
    """Refuses an attempt the database says must not run: final, revoked, or superseded.

    Celery's revoke list lives in worker memory and is lost on restart; this check reads the
    durable state instead, so a cancel or a redelivered finished task never starts again.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        event = event_of(args, request.id) if not request.called_directly else None
        if event is not None:
            from . import engine

            attempt = (event.get("context") or {}).get("attempt", 1)
            allowed = with_database_retry(
                lambda: engine.task_run_start(
                    event_id=event["event_id"], attempt=attempt, worker=request.hostname or ""
                ),
                what="recording a task start",
            )
            if not allowed:
                raise Ignore()
        return super().__call__(*args, **kwargs)
