"""LOG_FORMAT=json: a real worker writes each line as one JSON object, naming the attempt while a task runs."""

from __future__ import annotations

import json
import sys

import pytest
import redis

import tests.e2e_tasks  # noqa: F401 - registers the test tasks here as the workers' --include does there
from tests import factories
from tests.e2e import trigger, wait_final, wait_for
from tests.processes import Process
from tests.workers import purge_broker, worker_env
from workflows_app.models import TaskRun

CHATTY = "tests.e2e_tasks.chatty"


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_log_format_json_writes_each_line_of_a_task_as_one_object_naming_its_attempt(api, tmp_path):
    factories.workflow(
        factories.spec(
            "chatty",
            [("c1", CHATTY), {"key": "c2", "task": CHATTY, "params": {"fail": True}}],
            [["c1", "c2"]],
            event_type="m_logs",
        )
    )
    purge_broker()
    name = "jsonlog@metrics-test"
    # `-q`: no banner, which Celery prints on stdout outside logging; everything else is a log record.
    cmd = [
        *(sys.executable, "-m", "celery", "-A", "config", "-q", "worker", "-Q", "m_logs", "-c", "1", "-n", name),
        *("--pool", "prefork", "--include", "tests.e2e_tasks", "--without-gossip", "--without-mingle", "-l", "INFO"),
    ]
    worker = Process(cmd, log_path=tmp_path / "jsonlog.log", env=worker_env(LOG_FORMAT="json"))
    try:
        from config.celery import app

        def ready() -> bool:
            if why := worker.exited():
                raise AssertionError(why)
            try:
                return bool(app.control.ping(destination=[name], timeout=0.5))
            except (ConnectionError, OSError, redis.exceptions.ConnectionError):
                return False

        wait_for(ready, timeout=60, interval=0.2, what="the JSON-logging worker to answer a ping")
        trace_id = trigger(api, "chatty")
        assert wait_final([trace_id]) == {trace_id: "FAILED"}
        events = dict(TaskRun.objects.filter(run_id=trace_id).values_list("node_key", "current_event_id"))
        # The tracer's "raised" line comes after the outcome is recorded: wait for it, not for a time.
        wait_for(lambda: "chatty fails as asked" in worker.log(), timeout=30, what="the failure's log line")
        written = worker.log()
    finally:
        worker.stop()

    # Every line from the worker's "ready." on, through both tasks: its own, Celery's and the tasks'.
    # (Before it, Celery warns about running as root before logging is set up, on plain stderr.)
    lines = [line for line in written.splitlines() if line.strip()]
    ready = next(i for i, line in enumerate(lines) if f"{name} ready." in line)
    records = [json.loads(line) for line in lines[ready:]]
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records), records

    by_node = {}
    for r in records:
        if r.get("trace_id"):
            by_node.setdefault(r["node"], []).append(r)
    assert set(by_node) == {"c1", "c2"}
    for node, mine in by_node.items():
        assert {r["trace_id"] for r in mine} == {trace_id}
        assert {r["event_id"] for r in mine} == {str(events[node])}
        messages = {(r["logger"], r["message"]) for r in mine}
        assert ("shop.tasks", f"plain logging from {node}") in messages
        assert ("tests.e2e_tasks", f"celery task logger from {node}") in messages
        traceback = next(r for r in mine if r["message"] == "with a traceback")
        assert "ValueError: a handled error" in traceback["exc_info"]
    # The tracer's line about the failure, and the task's error inside it, name the attempt too.
    raised = [r for r in by_node["c2"] if "chatty fails as asked" in r.get("exc_info", "") + r["message"]]
    assert raised and raised[0]["level"] == "ERROR"
    # Lines of the task's loggers outside an attempt: none.
    assert not [r for r in records if r["logger"] in ("shop.tasks", "tests.e2e_tasks") and not r.get("trace_id")]


def test_text_lines_written_during_an_attempt_end_with_its_fields():
    """LOG_FORMAT=text (the default) keeps the message as it was and adds the attempt's fields only
    on lines written during one; the handler's filter and formatter come from settings.LOGGING."""
    import io
    import logging

    from workflows_app.logs import AttemptFilter, TextFormatter, attempt_context

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(AttemptFilter())
    handler.setFormatter(TextFormatter())
    log = logging.getLogger("tests.text_lines")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("before")
        with attempt_context({"trace_id": "t-1", "event_id": "e-1", "context": {"node": "intake"}}):
            log.warning("during")
        log.warning("after")
    finally:
        log.removeHandler(handler)
    assert stream.getvalue().splitlines() == ["before", "during [trace_id=t-1 event_id=e-1 node=intake]", "after"]


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_text_logs_of_a_real_worker_name_the_attempt_on_each_line_a_task_writes(workers, api):
    factories.workflow(factories.spec("chatty_text", [("only", CHATTY)], event_type="m_text"))
    worker = workers(["m_text"], concurrency=1)
    trace_id = trigger(api, "chatty_text")
    assert wait_final([trace_id]) == {trace_id: "SUCCESS"}
    event_id = TaskRun.objects.get(run_id=trace_id).current_event_id
    fields = f"[trace_id={trace_id} event_id={event_id} node=only]"
    wait_for(lambda: "succeeded in" in worker.log(), timeout=30, what="the tracer's line about the task's end")

    lines = worker.log().splitlines()
    for said in ("plain logging from only", "celery task logger from only", "with a traceback", "succeeded in"):
        line = next(line for line in lines if said in line)
        assert line.endswith(fields), line
