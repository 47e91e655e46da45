"""Log records carry the task attempt they were written in (`trace_id`, `event_id`, `node`), and
`LOG_FORMAT=json` writes each as one JSON object per line.

The attempt is kept in a context variable that `EventTask` sets around the engine's start, the task
body and the recording of its outcome, and a filter on the handlers copies it onto every record they
emit. A filter on the handler rather than on loggers: records reach the handler from any logger, the
user's own (`logging.getLogger(__name__)`) and Celery's task logger alike, without each logger
having to be set up.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from pythonjsonlogger.json import JsonFormatter

_attempt: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("eventflow_attempt", default=None)

# A record's own attributes that name the attempt; JsonFormatter writes any attribute a record has
# beyond the standard ones.
CONTEXT_FIELDS = ("trace_id", "event_id", "node")


@contextlib.contextmanager
def attempt_context(event: Mapping[str, Any]) -> Iterator[None]:
    """Within this block, every record emitted through a handler with `AttemptFilter` names the
    Event's run, attempt and node."""
    token = _attempt.set(_fields(event))
    try:
        yield
    finally:
        _attempt.reset(token)


def _fields(event: Mapping[str, Any]) -> dict[str, str]:
    context = event.get("context") or {}
    return {
        "trace_id": str(event.get("trace_id") or ""),
        "event_id": str(event.get("event_id") or ""),
        "node": str(context.get("node") or ""),
    }


def current_attempt() -> dict[str, str] | None:
    """The attempt being run in this thread or task, if any."""
    return _attempt.get()


class AttemptFilter(logging.Filter):
    """Adds the current attempt's fields to each record (never drops one); outside a task it adds
    nothing, so lines written between tasks have no such fields rather than empty ones."""

    def filter(self, record: logging.LogRecord) -> bool:
        attempt = _attempt.get()
        if attempt:
            for field in CONTEXT_FIELDS:
                if not hasattr(record, field):
                    setattr(record, field, attempt[field])
        return True


def _with_attempt(record: logging.LogRecord, text: str) -> str:
    """`text` with the attempt's fields at the end of its first line (before a traceback)."""
    if not getattr(record, "trace_id", None):
        return text
    first, newline, rest = text.partition("\n")
    fields = " ".join(f"{field}={getattr(record, field, '')}" for field in CONTEXT_FIELDS)
    return f"{first} [{fields}]{newline}{rest}"


class TextFormatter(logging.Formatter):
    """The message as before, followed on lines written during an attempt by its fields, so plain
    logs can be grepped by trace id too."""

    def format(self, record: logging.LogRecord) -> str:
        return _with_attempt(record, super().format(record))


class _AttemptSuffix(logging.Formatter):
    """Another formatter's line (Celery's task format), followed by the attempt's fields."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return _with_attempt(record, self.inner.format(record))


def json_formatter() -> logging.Formatter:
    """python-json-logger's formatter: `time` (ISO 8601, UTC), `level`, `logger`, `message`, then
    the attempt's fields and any `extra`; an exception's traceback stays inside the object."""
    return JsonFormatter(
        "{levelname}{name}{message}",
        style="{",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",
    )


def _json_logging() -> bool:
    from django.conf import settings

    return getattr(settings, "LOG_FORMAT", "text") == "json"


def celery_after_setup_logger(logger: logging.Logger, loglevel: int | str | None = None, **_: Any) -> None:
    """With LOG_FORMAT=json, a worker's root logger writes through Django's LOGGING (JSON, with the
    attempt's fields) even if Celery gave it a handler of its own, and so does billiard's pool
    logger (`multiprocessing`, which does not propagate), so no line of the worker is plain text.
    Python's warnings become records too. Text logs are left as Celery sets them up."""
    if not _json_logging():
        return
    import logging.config

    from celery.utils.log import get_multiprocessing_logger
    from django.conf import settings

    logging.config.dictConfig(settings.LOGGING)
    if loglevel:
        logger.setLevel(loglevel)  # the worker's `-l`, as Celery would set it
    logging.captureWarnings(True)
    pool_logger = get_multiprocessing_logger()
    if pool_logger is not None:
        pool_logger.handlers = list(logging.getLogger().handlers)


def celery_after_setup_task_logger(logger: logging.Logger, **_: Any) -> None:
    """Celery's task logger (`celery.task`, parent of every `get_task_logger`) gets a handler of its
    own with Celery's text format and does not propagate: with LOG_FORMAT=json it writes through the
    root's handlers instead; in text it keeps Celery's format, followed by the attempt's fields."""
    root_handlers = list(logging.getLogger().handlers)
    if _json_logging():
        logger.handlers = root_handlers
        return
    for handler in logger.handlers:
        if not any(isinstance(f, AttemptFilter) for f in handler.filters):
            handler.addFilter(AttemptFilter())
        if handler.formatter is not None and not isinstance(handler.formatter, _AttemptSuffix):
            handler.setFormatter(_AttemptSuffix(handler.formatter))


# The attempts whose fields Celery's tracer lines carry, by task id: set before the task's own
# wrapper runs and reset after the tracer's "succeeded in" or "raised" line, which it logs after
# `EventTask.__call__` returned.
_traced: dict[str, contextvars.Token] = {}


def celery_task_prerun(task_id: str | None = None, args: Any = None, **_: Any) -> None:
    """A task sent by the engine (its first argument the Event whose id is the task id) names its
    attempt on the tracer's lines too."""
    if task_id and args and isinstance(args[0], dict) and args[0].get("event_id") == task_id:
        _traced[task_id] = _attempt.set(_fields(args[0]))


def celery_task_postrun(task_id: str | None = None, **_: Any) -> None:
    token = _traced.pop(task_id or "", None)
    if token is not None:
        try:
            _attempt.reset(token)
        except ValueError:  # set in another context (a pool that switched threads): just clear it
            _attempt.set(None)
