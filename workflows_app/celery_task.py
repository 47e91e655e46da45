"""The base class of every task on the app: asks the engine before an Event's attempt may run."""

from typing import Any

from celery import Task
from celery.exceptions import Ignore


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
            if not engine.task_run_start(
                event_id=event["event_id"],
                attempt=attempt,
                worker=request.hostname or "",
            ):
                raise Ignore()
        return super().__call__(*args, **kwargs)
