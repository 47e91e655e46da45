"""The engine's database functions: installed by migrations as `engine.sql` defines them, all or
nothing when called, and, where they decide (admission, a run's end), checked against `engine.rules`
on random states."""

from __future__ import annotations

import random
import uuid
from datetime import timedelta

import pytest
from django.db import IntegrityError, connection, transaction
from django.db.models.functions import Now
from hypothesis import given, settings
from hypothesis import strategies as st

from events_app.models import Event, EventType
from tests import factories
from workflows_app import engine, pgsql
from workflows_app.engine import rules, sql
from workflows_app.models import TaskRun, WorkflowRun

ECHO = "workflows_app.tasks.echo"


@pytest.mark.django_db
def test_migrations_install_the_functions_the_engine_defines():
    """The test database was migrated: it holds each function exactly as `engine.sql` defines it, so
    a change there without its migration (`manage.py engine_functions --migration NAME`) fails here."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT p.proname, p.proconfig, p.prosrc FROM pg_proc p"
            " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = current_schema()"
            " AND p.proname LIKE 'eventflow%%'"
        )
        installed = {name: (config, body) for name, config, body in cursor.fetchall()}
    assert set(installed) == {name for name, *_ in sql.FUNCTIONS}
    for name, arguments, _returns, body in sql.FUNCTIONS:
        assert installed[name][1] == body, f"{name} differs from engine.sql: write its migration"
        assert installed[name][0] == [
            setting.replace(" = ", "=") for setting in sql.FUNCTION_SETTINGS.removeprefix("SET ").split(" SET ")
        ]
        with connection.cursor() as cursor:  # its signature is the one defined, or this raises
            cursor.execute("SELECT %s::regprocedure::text", [sql.signature(name, arguments)])


def test_the_latest_migration_of_the_functions_installs_the_definitions_of_engine_sql():
    """A change to `engine.sql` goes with a migration that installs it (the digest it names)."""
    import sys

    from django.db.migrations.loader import MigrationLoader

    loader = MigrationLoader(None, ignore_no_migrations=True)
    named = sorted(
        (name, getattr(sys.modules[migration.__module__], "DIGEST", None))
        for (app, name), migration in loader.disk_migrations.items()
        if app == "workflows_app"
    )
    latest = [(name, digest) for name, digest in named if digest][-1]
    assert latest[1] == sql.functions_digest(), (
        f"{latest[0]} installs other definitions than engine/sql.py's: "
        "write the next one with `manage.py engine_functions --migration NAME`"
    )


@pytest.mark.django_db(transaction=True)
def test_a_start_that_fails_part_way_writes_nothing_and_leaves_the_connection_usable():
    """The run's insert goes through and its root's Event collides: the call writes none of it."""
    workflow = factories.workflow(factories.spec("half", [("a", ECHO), ("b", ECHO)], [["a", "b"]]))
    taken = uuid.uuid4()
    Event.objects.create(event_id=taken, event_type="q_default", task_name=ECHO, timestamp=Now())
    original = uuid.uuid4
    calls = iter([taken])
    uuid.uuid4 = lambda: next(calls, None) or original()  # the root's Event gets the taken id
    try:
        with pytest.raises(IntegrityError):
            engine.workflow_run_start(workflow=workflow, payload={})
    finally:
        uuid.uuid4 = original
    assert not WorkflowRun.objects.exists() and not TaskRun.objects.exists()
    assert EventType.objects.get(name="q_default").held == 0
    run, created = engine.workflow_run_start(workflow=workflow, payload={})
    assert created and TaskRun.objects.filter(run=run).count() == 2


def _line(workflow, rng: random.Random, size: int) -> tuple[list[TaskRun], list[TaskRun]]:
    """A run whose first `size` tasks wait in the line (QUEUED, no slot), each ready at a random
    instant (ties included), and whose others wait for predecessors."""
    run, _ = engine.workflow_run_start(workflow=workflow, payload={})
    tasks = list(TaskRun.objects.filter(run=run).order_by("node_key"))
    for i, task in enumerate(tasks):
        task.status = TaskRun.Status.QUEUED if i < size else TaskRun.Status.WAITING
        task.holds_slot = False
        task.queued_at = task.run.created_at - timedelta(seconds=rng.randint(0, 5))
    TaskRun.objects.bulk_update(tasks, ["status", "holds_slot", "queued_at"])
    return tasks[:size], tasks[size:]


@pytest.mark.django_db
def test_admission_in_the_database_takes_whom_rules_admit_takes():
    workflow = factories.workflow(factories.spec("line", [(f"n{i}", ECHO) for i in range(8)], event_type="diff"))

    @settings(max_examples=60, deadline=None)
    @given(
        concurrency=st.integers(1, 6),
        held=st.integers(0, 7),
        released=st.integers(0, 2),
        waiting=st.integers(0, 8),
        ready=st.integers(0, 8),
        seed=st.integers(0, 10**6),
    )
    def check(concurrency, held, released, waiting, ready, seed):
        """`waiting` tasks in the line, and up to `ready` others becoming ready in the same call."""
        with transaction.atomic():
            EventType.objects.filter(name="diff").update(concurrency=1, held=1)  # the start admits nobody
            line, others = _line(workflow, random.Random(seed), waiting)
            fresh = others[:ready]
            events = {t.pk: uuid.uuid4() for t in fresh}
            Event.objects.bulk_create(
                Event(event_id=e, event_type="diff", task_name=ECHO, timestamp=Now()) for e in events.values()
            )
            EventType.objects.filter(name="diff").update(concurrency=concurrency, held=held)
            with connection.cursor() as cursor:
                cursor.execute("SELECT now()")
                (now,) = cursor.fetchone()
            expected = rules.admit(
                concurrency=concurrency,
                held=held,
                released=released,
                line=[rules.Waiting(t.queued_at, t.pk) for t in line] + [rules.Waiting(now, pk) for pk in events],
            )
            (sent,) = pgsql.fetch_one(
                "SELECT eventflow_admit(%(types)s, %(released)s, %(ready)s, %(events)s, %(ready_types)s, 60)",
                {
                    "types": ["diff"],
                    "released": [released],
                    "ready": list(events),
                    "events": list(events.values()),
                    "ready_types": ["diff"] * len(events),
                },
            )
            admitted = [str(e["event"]["event_id"] if "event" in e else e["event_id"]) for e in pgsql.loads(sent)]
            by_id = {t.pk: str(t.current_event_id) for t in line} | {pk: str(e) for pk, e in events.items()}
            assert admitted == [by_id[w.id] for w in expected]
            fresh_now = TaskRun.objects.filter(pk__in=events)
            assert all(t.status == "QUEUED" and t.holds_slot == (t.pk in {w.id for w in expected}) for t in fresh_now)
            assert EventType.objects.get(name="diff").held == rules.held_after(
                held=held, released=released, admitted=len(expected)
            )
            transaction.set_rollback(True)

    check()


@pytest.mark.django_db
def test_a_runs_end_in_the_database_is_what_rules_run_outcome_says():
    workflow = factories.workflow(factories.spec("ends", [(f"n{i}", ECHO) for i in range(6)]))

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.sampled_from(sorted(TaskRun.Status.values)), min_size=1, max_size=6))
    def check(statuses):
        with transaction.atomic():
            run, _ = engine.workflow_run_start(workflow=workflow, payload={})
            tasks = list(TaskRun.objects.filter(run=run).order_by("node_key"))[: len(statuses)]
            TaskRun.objects.filter(run=run).exclude(pk__in=[t.pk for t in tasks]).delete()
            for task, status in zip(tasks, statuses, strict=True):
                task.status = status
            TaskRun.objects.bulk_update(tasks, ["status"])
            (ended,) = pgsql.fetch_one("SELECT eventflow_end_run(%s)", [run.pk])
            assert ended == rules.run_outcome(statuses)
            transaction.set_rollback(True)

    check()
