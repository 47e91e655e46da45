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

from events_app.models import Event, EventType, EventTypeKey
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


KEYS = ["", "A", "B", "C"]


def _tasks(workflow, rng: random.Random, runs: int) -> list[TaskRun]:
    """`runs` runs' tasks, WAITING, each with a random priority, run start and fairness key."""
    tasks = []
    for _ in range(runs):
        run, _ = engine.workflow_run_start(workflow=workflow, payload={})
        tasks.extend(TaskRun.objects.filter(run=run).order_by("node_key"))
    for task in tasks:
        task.status, task.holds_slot = TaskRun.Status.WAITING, False
        task.priority = rng.choice([0, 5, 5, 9])
        task.run_created_at = task.run.created_at - timedelta(seconds=rng.randint(0, 3))
        task.queued_at = task.run.created_at - timedelta(seconds=rng.randint(0, 5))
        task.fair_key = rng.choice(KEYS)
    return tasks


@pytest.mark.django_db
def test_admission_in_the_database_takes_whom_rules_admit_takes():
    """Random lines over fairness keys (priorities, run ages, readiness, shares held, turns, a rate
    window, slots given back, tasks joining): `eventflow_admit` hands out the tasks `rules.admit` picks,
    in its order, and leaves the counts `rules` says."""
    workflow = factories.workflow(factories.spec("line", [(f"n{i}", ECHO) for i in range(4)], event_type="diff"))

    @settings(max_examples=80, deadline=None)
    @given(
        concurrency=st.integers(1, 8),
        held=st.integers(0, 9),
        per_key=st.one_of(st.none(), st.integers(1, 3)),
        rate=st.one_of(st.none(), st.integers(1, 6)),
        rate_used=st.integers(0, 7),
        released_key=st.one_of(st.none(), st.sampled_from(KEYS)),
        waiting=st.integers(0, 10),
        ready=st.integers(0, 4),
        seed=st.integers(0, 10**6),
    )
    def check(concurrency, held, per_key, rate, rate_used, released_key, waiting, ready, seed):
        rng = random.Random(seed)
        with transaction.atomic():
            EventType.objects.filter(name="diff").update(concurrency=1, held=1)  # the starts admit nobody
            tasks = _tasks(workflow, rng, 4)
            EventTypeKey.objects.filter(event_type="diff").delete()
            line, fresh = tasks[:waiting], tasks[waiting : waiting + ready]
            for task in line:
                task.status = TaskRun.Status.QUEUED
            TaskRun.objects.bulk_update(
                tasks, ["status", "holds_slot", "priority", "run_created_at", "queued_at", "fair_key"]
            )
            events = {t.pk: uuid.uuid4() for t in fresh}
            Event.objects.bulk_create(
                Event(event_id=e, event_type="diff", task_name=ECHO, timestamp=Now()) for e in events.values()
            )
            # Each key's state: its shares held, its last turn, and its head's priority while it may be served.
            states = {k: rules.KeyState(rng.randint(0, 3), rng.randint(0, 20)) for k in KEYS}
            for key, state in states.items():
                heads = [t.priority for t in line if t.fair_key == key]
                servable = heads and (per_key is None or state.held < per_key)
                EventTypeKey.objects.create(
                    event_type_id="diff",
                    key=key,
                    held=state.held,
                    turn=state.turn,
                    head_priority=max(heads) if servable else None,
                )
            (clock,) = pgsql.fetch_one("SELECT clock_timestamp()", {})
            log = rules.RateLog((clock - timedelta(seconds=0.2),), (rate_used,)) if rate_used else rules.RateLog()
            EventType.objects.filter(name="diff").update(
                concurrency=concurrency,
                held=held,
                per_key_concurrency=per_key,
                rate_limit=f"{rate}/second" if rate else None,
                rate_times=list(log.times),
                rate_counts=list(log.counts),
            )
            (now,) = pgsql.fetch_one("SELECT now()", {})
            released = 1 if released_key is not None else 0
            if released_key is not None:
                states[released_key] = states[released_key]._replace(held=max(states[released_key].held - 1, 0))
            room = None if rate is None else rate - rate_used
            expected = rules.admit(
                free=rules.free_slots(concurrency=concurrency, held=held, released=released, room=room),
                line=[rules.Waiting(t.priority, t.run_created_at, t.queued_at, t.pk, t.fair_key) for t in line]
                + [rules.Waiting(t.priority, t.run_created_at, now, t.pk, t.fair_key) for t in fresh],
                keys=states,
                per_key=per_key,
                turn=max(s.turn for s in states.values()),
            )
            (sent,) = pgsql.fetch_one(
                "SELECT eventflow_admit("
                "%(types)s, %(released)s, %(ready)s, %(events)s, %(ready_types)s, NULL, NULL, 60)",
                {
                    "types": ["diff"],
                    "released": pgsql.as_json(
                        [{"type": "diff", "key": released_key, "n": 1}] if released_key is not None else []
                    ),
                    "ready": list(events),
                    "events": list(events.values()),
                    "ready_types": ["diff"] * len(events),
                },
            )
            answered = pgsql.loads(sent)
            admitted = [
                str(e["event"]["event_id"] if "event" in e else e["event_id"]) for e in answered if "wake" not in e
            ]
            by_id = {t.pk: str(t.current_event_id) for t in line} | {pk: str(e) for pk, e in events.items()}
            assert admitted == [by_id[w.id] for w in expected]
            chosen = {w.id for w in expected}
            fresh_now = TaskRun.objects.filter(pk__in=events)
            assert all(t.status == "QUEUED" and t.holds_slot == (t.pk in chosen) for t in fresh_now)
            assert EventType.objects.get(name="diff").held == rules.held_after(
                held=held, released=released, admitted=len(expected)
            )
            if per_key is not None:  # a key counts its slots while its type has a share
                for key, state in states.items():
                    taken = sum(1 for w in expected if w.key == key)
                    assert EventTypeKey.objects.get(event_type="diff", key=key).held == state.held + taken
            woken = [e for e in answered if "wake" in e]
            if rate is not None and len(expected) < len(line) + len(fresh) and rate_used + len(expected) >= rate:
                if concurrency - (held - released) - len(expected) > 0 and any(
                    per_key is None
                    or states[w.fair_key].held + sum(1 for x in expected if x.key == w.fair_key) < per_key
                    for w in [*line, *fresh]
                    if w.pk not in chosen
                ):
                    assert woken and woken[0]["wake"] == "diff"
            transaction.set_rollback(True)

    check()


@pytest.mark.django_db
def test_the_rate_window_in_the_database_is_what_rules_say():
    """`eventflow_rate_used`, `_opens` and `_record` against their `rules` counterparts on random records."""

    @settings(max_examples=60, deadline=None)
    @given(
        entries=st.lists(st.tuples(st.integers(-3000, 1000), st.integers(1, 4)), max_size=12),
        count=st.integers(1, 8),
        period=st.sampled_from([1, 60]),
        at_ms=st.integers(0, 2000),
        add=st.integers(0, 3),
    )
    def check(entries, count, period, at_ms, add):
        (now,) = pgsql.fetch_one("SELECT now()", {})
        rate = rules.Rate(count, period)
        log = rules.rate_record(rules.RateLog(), now - timedelta(hours=2), now - timedelta(hours=2), 0, rate)
        for ms, n in sorted(entries):
            log = rules.RateLog((*log.times, now + timedelta(milliseconds=ms)), (*log.counts, n))
        at = now + timedelta(milliseconds=at_ms)
        params = {
            "times": list(log.times),
            "counts": list(log.counts),
            "now": now,
            "at": at,
            "count": count,
            "period": timedelta(seconds=period),
            "add": add,
        }
        (used,) = pgsql.fetch_one("SELECT eventflow_rate_used(%(times)s, %(counts)s, %(now)s, %(period)s)", params)
        assert used == rules.rate_used(log, now, rate)
        (opens,) = pgsql.fetch_one(
            "SELECT eventflow_rate_opens(%(times)s, %(counts)s, %(at)s, %(count)s, %(period)s)", params
        )
        assert opens == rules.rate_opens(log, at, rate)
        times, counts = pgsql.fetch_one(
            "SELECT * FROM eventflow_rate_record(%(times)s, %(counts)s, %(now)s, %(at)s, %(add)s, %(period)s)", params
        )
        expected = rules.rate_record(log, now, at, add, rate)
        assert sorted(zip(times, counts, strict=True)) == sorted(zip(expected.times, expected.counts, strict=True))

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


@pytest.mark.django_db(transaction=True)
def test_a_start_commits_while_another_transaction_holds_a_type_of_its_tasks():
    """A start inserts task rows referring to each of its types, whose foreign keys PostgreSQL checks at
    commit (FOR KEY SHARE on each type's row). Admission holds types NO KEY: a finish holding one type
    while it waits for the start's root type lets the start commit, where FOR UPDATE deadlocked them."""
    import threading

    import psycopg

    from tests.workers import database_url

    workflow = factories.workflow(
        factories.spec(
            "ab",
            [{"key": "b", "task": ECHO, "event_type": "t_b"}, {"key": "a", "task": ECHO, "event_type": "t_a"}],
            [["b", "a"]],
        )
    )
    with psycopg.connect(database_url()) as holder:
        holder.execute(sql.LOCK_TYPE.replace("%(name)s", "'t_a'"))  # a finish holding t_a, not committed
        done = threading.Event()
        errors = []

        def start() -> None:
            try:
                engine.workflow_run_start(workflow=workflow, payload={})
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)
            finally:
                from django.db import connection as own

                own.close()
                done.set()

        threading.Thread(target=start, daemon=True).start()
        assert done.wait(10), "the start waited on the type another transaction holds"
        holder.rollback()
    assert not errors and WorkflowRun.objects.filter(workflow=workflow).count() == 1
