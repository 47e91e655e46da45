"""The engine's database functions, outside any transaction of Django's (so on a database these tests
really commit to): a call writes all or nothing, and the functions are installed by `migrate` or
at their first call."""

from __future__ import annotations

import uuid

import pytest
from django.db import IntegrityError, connection
from django.utils import timezone

from events_app.models import Event, EventType
from tests import factories
from workflows_app import engine, pgsql
from workflows_app.models import TaskRun, WorkflowRun

ECHO = "workflows_app.tasks.echo"

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_start_that_fails_part_way_writes_nothing_and_leaves_the_connection_usable():
    """The run's insert goes through and its root's Event collides: the call writes none of it."""
    workflow = factories.workflow(factories.spec("half", [("a", ECHO), ("b", ECHO)], [["a", "b"]]))
    now = timezone.now()
    run, graph, events = engine._new_run(workflow, engine._current_version_id(workflow), {}, None, "api", None, now)
    taken = events["a"]
    Event.objects.create(
        event_id=taken.event_id, trace_id=uuid.uuid4(), event_type=taken.event_type, task_name=ECHO, timestamp=now
    )
    with pytest.raises(IntegrityError):
        engine._start_run_in_one_call(run, graph, events, now)
    assert not WorkflowRun.objects.exists() and not TaskRun.objects.exists()
    assert EventType.objects.get(name="q_default").held == 0
    run, created = engine.workflow_run_start(workflow=workflow, payload={})
    assert created and TaskRun.objects.filter(run=run).count() == 2


def functions() -> dict[str, str]:
    """The engine's functions in the database, by name, with their source."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT proname, prosrc FROM pg_proc WHERE proname LIKE 'eventflow%%'")
        return dict(cursor.fetchall())


def test_migrate_installs_the_engines_functions_and_drops_those_of_other_code():
    installed = functions()  # the test database was migrated
    assert set(installed) == {pgsql.FINISH_SUCCESS_FUNCTION, pgsql.START_RUN_FUNCTION}
    source = installed[pgsql.FINISH_SUCCESS_FUNCTION]
    assert "FOR UPDATE" in source and "p_run_id" in source and "%(" not in source
    with connection.cursor() as cursor:  # as an older version of the code left it
        cursor.execute(
            "CREATE FUNCTION eventflow_finish_success_000000000000(a int) RETURNS int LANGUAGE sql AS 'SELECT a'"
        )
    pgsql.install_functions()
    assert functions() == installed


def test_a_database_without_the_functions_gets_them_at_the_first_call():
    workflow = factories.workflow(factories.spec("healed", [("a", ECHO)]))
    with connection.cursor() as cursor:
        for name in (pgsql.FINISH_SUCCESS_FUNCTION, pgsql.START_RUN_FUNCTION):
            cursor.execute(f"DROP FUNCTION {name}")
    try:
        run, created = engine.workflow_run_start(workflow=workflow, payload={})
        assert created and TaskRun.objects.get(run=run).status == "QUEUED"
        assert set(functions()) == {pgsql.FINISH_SUCCESS_FUNCTION, pgsql.START_RUN_FUNCTION}
    finally:
        pgsql.install_functions()  # for the tests after this one, whatever happened
