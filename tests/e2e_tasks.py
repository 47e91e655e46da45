"""Tasks only end-to-end tests load into their workers (with `celery worker --include`)."""

import json
import os
import signal
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import redis
from celery import shared_task, signals

import tests.kinds  # noqa: F401 - the workers settle `noop` nodes too


def _redis() -> redis.Redis:
    """The test broker's Redis, also used as a counter store the test process can read."""
    return redis.Redis.from_url(os.environ.get("E2E_COUNTER_URL", "redis://127.0.0.1:6379/9"))


@shared_task(name="tests.e2e_tasks.capture")
def capture(event: dict) -> dict:
    """Return the Event exactly as the task received it, so a test can check its fields."""
    return {"event": event}


@shared_task(name="tests.e2e_tasks.count")
def count(event: dict) -> dict:
    """Count executions per event id (a body that runs twice counts 2), then sleep a little."""
    runs = _redis().incr(f"runs:{event['event_id']}")
    _redis().incr(f"node-runs:{event['trace_id']}:{event['context']['node']}")
    time.sleep(float(event["payload"].get("seconds", 0)))
    return {"runs": runs}


@shared_task(name="tests.e2e_tasks.journal")
def journal(event: dict) -> dict:
    """Sleep `seconds`, writing a line when the body begins and one when it ends to the file named by
    E2E_JOURNAL, which every host of a fleet shares (one appended write each, so lines never mix).

    The file, not Redis or the database, because the host writing may be cut from both; and its order,
    not a clock, tells whether two bodies of one attempt overlapped, because hosts' clocks may differ.
    """
    context = event["context"]
    line = {"event": event["event_id"], "trace": event["trace_id"], "node": context["node"]}
    line.update(attempt=context["attempt"], host=os.environ.get("EVENTFLOW_HOST", ""), pid=os.getpid())
    _journal({**line, "phase": "begin"})
    time.sleep(float(event["payload"].get("seconds", 0)))
    _journal({**line, "phase": "end"})
    return {"host": line["host"]}


def _journal(line: dict) -> None:
    fd = os.open(os.environ["E2E_JOURNAL"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


@shared_task(name="tests.e2e_tasks.flaky")
def flaky(event: dict) -> dict:
    """Fail while the run's `broken` flag is set in Redis, until the test clears it; with its
    `fail-first` flag set, fail the first attempt only (a retry a test need not catch in its delay)."""
    if _redis().exists(f"broken:{event['trace_id']}"):
        raise RuntimeError("dependency unavailable")
    if event["context"].get("attempt", 1) == 1 and _redis().exists(f"fail-first:{event['trace_id']}"):
        raise RuntimeError("dependency unavailable")
    return {"ok": True}


@shared_task(name="tests.e2e_tasks.item")
def item(event: dict) -> dict:
    """An instance of a mapped node: return its index and element. The element equal to the payload's
    `bad` fails while the Redis key `broken:<payload's flag>` is set."""
    context = event["context"]
    if context["item"] == event["payload"].get("bad") and _redis().exists(f"broken:{event['payload'].get('flag')}"):
        raise RuntimeError(f"element {context['item']} is broken")
    return {"index": context["map_index"], "item": context["item"]}


@shared_task(name="tests.e2e_tasks.fail_first_attempt")
def fail_first_attempt(event: dict) -> dict:
    """Fail the first attempt once the test sets the run's `gate` key in Redis; succeed on any later one.

    The gate lets a test act while the first attempt is known to be running (at most 30 s).
    """
    attempt = event["context"]["attempt"]
    if attempt == 1:
        deadline = time.monotonic() + 30
        while not _redis().exists(f"gate:{event['trace_id']}") and time.monotonic() < deadline:
            time.sleep(0.02)
        raise RuntimeError("the first attempt fails")
    return {"attempt": attempt}


@shared_task(name="tests.e2e_tasks.clock", ignore_result=True)
def clock(key: str) -> None:
    """Store under `clock:<key>` in Redis what this process's clocks read, and the database's and Redis's."""
    from django.db import connection
    from django.utils import timezone

    wall, monotonic = time.time(), time.monotonic()
    time.sleep(0.2)
    with connection.cursor() as cursor:
        cursor.execute("SELECT extract(epoch FROM clock_timestamp())")
        database = float(cursor.fetchone()[0])
    seconds, micros = _redis().time()
    readings = {
        "time": time.time(),
        "datetime": datetime.now(UTC).timestamp(),
        "django": timezone.now().timestamp(),
        "database": database,
        "redis": seconds + micros / 1e6,
        "wall_elapsed": time.time() - wall,
        "monotonic_elapsed": time.monotonic() - monotonic,
    }
    _redis().set(f"clock:{key}", json.dumps(readings), ex=600)


@shared_task(name="tests.e2e_tasks.die_after_return")
def die_after_return(event: dict) -> dict:
    """Return normally; the receiver below then kills the worker before the message is acknowledged."""
    return {"answer": 42}


@signals.task_success.connect
def _kill_worker_after_body(sender=None, **_: object) -> None:
    # task_success fires after the engine recorded the outcome (EventTask.__call__) and Celery
    # stored its result, before the message is acknowledged: dying here is the crash between them.
    if getattr(sender, "name", "") != "tests.e2e_tasks.die_after_return":
        return
    marker = Path(tempfile.gettempdir()) / f"eventflow-died-{sender.request.id}"
    if marker.exists():
        return  # die once per attempt: a second delivery must be able to finish
    marker.write_text("")
    os.kill(os.getppid(), signal.SIGKILL)
    os._exit(1)


@shared_task(name="tests.e2e_tasks.gate")
def gate(event: dict) -> dict:
    """Hold the attempt until the test sets the Redis key `open:<trace_id>` (at most 60 s), so a test
    can look at tasks while they run and wait; fails when the key never came."""
    deadline = time.monotonic() + 60
    while not _redis().exists(f"open:{event['trace_id']}"):
        if time.monotonic() > deadline:
            raise RuntimeError("the gate was never opened")
        time.sleep(0.02)
    return {"opened": True}


@shared_task(name="tests.e2e_tasks.chatty")
def chatty(event: dict) -> dict:
    """Log through the standard `logging` module, Celery's task logger and an exception's traceback,
    as a user's task would, then fail when the payload says so."""
    import logging

    from celery.utils.log import get_task_logger

    logging.getLogger("shop.tasks").info("plain logging from %s", event["context"]["node"])
    get_task_logger(__name__).warning("celery task logger from %s", event["context"]["node"])
    try:
        raise ValueError("a handled error")
    except ValueError:
        logging.getLogger("shop.tasks").exception("with a traceback")
    if event["payload"].get("fail"):
        raise RuntimeError("chatty fails as asked")
    return {"said": 3}


if os.environ.get("E2E_DIE_BEFORE_DELIVERY"):
    # The crash between a transition's commit and the sending of the webhook notification it wrote:
    # the first time a process of this worker is about to send one, it kills the worker (kill -9 of
    # its main process) instead. The notification is in the outbox; another worker must send it.
    from workflows_app.engine import outbox as _outbox

    _publish = _outbox.publish

    def _die_before_delivery(messages: list, revokes: list) -> None:
        delivering = any(message.get("task_name") == _outbox.DELIVER_TASK for message, _ in messages)
        if delivering and _redis().set("e2e:died-before-delivery", 1, nx=True, ex=600):
            os.kill(os.getppid(), signal.SIGKILL)
            os._exit(1)
        _publish(messages, revokes)

    _outbox.publish = _die_before_delivery
