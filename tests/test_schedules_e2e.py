"""End to end: a schedule made in the admin starts runs with a real `celery beat`; disabling it stops them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from django_celery_beat.models import PeriodicTask
from django_celery_results.models import TaskResult

from tests import factories
from tests.e2e import wait_for
from tests.processes import Process
from tests.workers import worker_env
from workflows_app import tasks
from workflows_app.models import WorkflowRun
from workflows_app.schedules import SCHEDULE_TASK

QUEUE = "e2e_sched"
NAME = "stock-sync-every-second"
SOURCE = f"schedule:{NAME}"
# django-celery-beat's scheduler, when it reads the schedule again after a change (then, at DEBUG,
# it lists the schedule it read), and beat at the end of each pass of its loop, before it sleeps.
REREAD = "DatabaseScheduler: Schedule changed."
LISTED = "Current schedule:"
WOKE = "beat: Waking up"


class Beat(Process):
    """One `celery beat` process on the database scheduler."""

    def __init__(self, log_dir: Path):
        cmd = [
            # DEBUG: beat logs each pass of its loop and the schedule it read.
            *(sys.executable, "-m", "celery", "-A", "config", "beat", "-l", "DEBUG"),
            *("-S", "django_celery_beat.schedulers:DatabaseScheduler"),
            # Beat sleeps at most this long between looks at the schedule and its change marker,
            # so a schedule disabled in the admin stops within about a second.
            *("--max-interval", "1", "-s", str(log_dir / "beat-schedule")),
        ]
        super().__init__(cmd, log_path=log_dir / "beat.log", env=worker_env())

    def sent(self) -> int:
        """How many ticks of the schedule beat has sent so far."""
        if why := self.exited():
            raise AssertionError(why)
        return self.log().count(f"Sending due task {NAME} ")


@pytest.fixture
def beat(transactional_db, tmp_path):
    started: list[Beat] = []

    def start() -> Beat:
        started.append(Beat(tmp_path))
        return started[-1]

    yield start
    for process in started:
        process.stop()


def schedule_runs() -> dict[str, str]:
    return {str(k): v for k, v in WorkflowRun.objects.filter(source=SOURCE).values_list("trace_id", "status")}


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_admin_schedule_starts_runs_with_beat_and_disabling_it_stops_them(workers, beat, admin_client, api):
    workflow = factories.workflow(
        factories.spec("stock_sync", [("pull", "workflows_app.tasks.echo")], event_type=QUEUE)
    )

    # The changelist action leads to the form; the form makes the periodic task.
    chosen = admin_client.post(
        "/admin/workflows_app/workflowdefinition/", {"action": "schedule", "_selected_action": [workflow.pk]}
    )
    form_url = f"/admin/workflows_app/workflowdefinition/{workflow.pk}/schedule/"
    assert chosen.status_code == 302 and chosen["Location"] == form_url
    assert admin_client.get(form_url).status_code == 200
    created = admin_client.post(
        form_url,
        {"name": NAME, "every_seconds": "1", "crontab": "", "payload": '{"warehouse": "eu-1"}', "enabled": "on"},
    )
    assert created.status_code == 302, created.content.decode()[-2000:]
    task = PeriodicTask.objects.get(name=NAME)
    assert (task.task, task.queue, task.interval.every, task.interval.period) == (SCHEDULE_TASK, "celery", 1, "seconds")
    assert json.loads(task.kwargs) == {"workflow": "stock_sync", "payload": {"warehouse": "eu-1"}, "schedule": NAME}

    workers(["celery", QUEUE], concurrency=2)
    process = beat()

    def two_succeeded() -> list[str] | None:
        done = [t for t, s in schedule_runs().items() if s == WorkflowRun.Status.SUCCESS]
        return done if len(done) >= 2 else None

    trace_ids = wait_for(two_succeeded, timeout=60, what="two scheduled runs to succeed")
    run = WorkflowRun.objects.get(trace_id=trace_ids[0])
    assert run.payload == {"warehouse": "eu-1"} and run.workflow_id == workflow.pk
    assert api.get(f"/api/runs/{run.trace_id}/").json()["source"] == SOURCE
    # Each tick's own Celery result names the run it started.
    ticks = TaskResult.objects.filter(task_name=SCHEDULE_TASK, status="SUCCESS")
    assert str(run.trace_id) in {json.loads(t.result)["trace_id"] for t in ticks}

    rereads = process.log().count(REREAD)
    disabled = admin_client.post(
        "/admin/django_celery_beat/periodictask/", {"action": "disable_tasks", "_selected_action": [task.pk]}
    )
    assert disabled.status_code == 302
    assert not PeriodicTask.objects.get(name=NAME).enabled

    def looped_since_reread() -> str | None:
        """Beat's log from its reading of the changed schedule on, once it has passed its loop three
        more times (each pass sleeps up to --max-interval, one second: the schedule's own period)."""
        log = process.log()
        if log.count(REREAD) <= rereads:
            return None
        since = log[log.rindex(REREAD) :]
        return since if since.count(WOKE) >= 3 else None

    since = wait_for(looped_since_reread, timeout=30, what="beat to read the changed schedule and pass its loop")
    # From there on beat neither holds the disabled schedule nor sends it, though it kept looping
    # while ticks of it came due.
    assert LISTED in since and NAME not in since, since[-3000:]
    sent = process.sent()

    def settled() -> dict[str, str] | None:
        """The scheduled runs, once the ticks sent before the change have each started one and all ended."""
        runs = schedule_runs()
        done = len(runs) == sent and all(s != WorkflowRun.Status.RUNNING for s in runs.values())
        return runs if done else None

    runs = wait_for(settled, timeout=30, what=f"the {sent} ticks sent to start one run each and all to end")
    assert set(runs.values()) == {"SUCCESS"}
    assert process.sent() == sent and NAME not in process.log()[process.log().rindex(REREAD) :]


# --------------------------------------------------------------------------- the form and the tick, in process


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"every_seconds": "", "crontab": ""}, "Give either an interval in seconds or a crontab expression."),
        ({"every_seconds": "5", "crontab": "* * * * *"}, "Give either an interval in seconds or a crontab expression."),
        ({"every_seconds": "", "crontab": "61 * * * *"}, "invalid crontab expression"),
        ({"every_seconds": "", "crontab": "* * *"}, "a crontab expression has 5 fields"),
        ({"every_seconds": "0", "crontab": ""}, "greater than or equal to 1"),
        ({"every_seconds": "5", "payload": "[1, 2]"}, "must be a JSON object"),
        ({"every_seconds": "5", "payload": "{nope"}, "not valid JSON"),
    ],
)
def test_schedule_form_refuses_bad_input_and_creates_nothing(admin_client, fields, message):
    workflow = factories.workflow(factories.spec("nightly"))
    data = {"name": "nightly-1", "every_seconds": "", "crontab": "", "payload": "{}", "enabled": "on", **fields}
    page = admin_client.post(f"/admin/workflows_app/workflowdefinition/{workflow.pk}/schedule/", data)
    assert page.status_code == 200
    assert message in page.content.decode()
    assert not PeriodicTask.objects.filter(name="nightly-1").exists()


@pytest.mark.django_db
def test_schedule_form_makes_a_crontab_schedule_and_refuses_a_taken_name(admin_client):
    workflow = factories.workflow(factories.spec("nightly"))
    url = f"/admin/workflows_app/workflowdefinition/{workflow.pk}/schedule/"
    data = {"name": "nightly-2am", "crontab": "0 2 * * 1-5", "payload": '{"full": true}', "enabled": "on"}
    assert admin_client.post(url, data).status_code == 302
    task = PeriodicTask.objects.get(name="nightly-2am")
    cron = task.crontab
    assert (cron.minute, cron.hour, cron.day_of_month, cron.month_of_year, cron.day_of_week) == (
        "0",
        "2",
        "*",
        "*",
        "1-5",
    )
    assert task.interval is None and task.enabled
    page = admin_client.get(url).content.decode()
    assert "nightly-2am" in page and f"/admin/django_celery_beat/periodictask/{task.pk}/change/" in page
    again = admin_client.post(url, data)
    assert again.status_code == 200 and "already exists" in again.content.decode()


@pytest.mark.django_db
def test_schedule_needs_change_and_periodic_task_permissions(client, django_user_model):
    workflow = factories.workflow(factories.spec("nightly"))
    staff = django_user_model.objects.create_user("staff", password="pw-staff-123", is_staff=True)
    client.force_login(staff)
    assert client.get(f"/admin/workflows_app/workflowdefinition/{workflow.pk}/schedule/").status_code == 403


@pytest.mark.django_db
def test_the_action_wants_exactly_one_workflow(admin_client):
    first, second = factories.workflow(factories.spec("one")), factories.workflow(factories.spec("two"))
    page = admin_client.post(
        "/admin/workflows_app/workflowdefinition/",
        {"action": "schedule", "_selected_action": [first.pk, second.pk]},
        follow=True,
    )
    assert "Select exactly one workflow to schedule." in page.content.decode()


@pytest.mark.django_db
def test_a_tick_delivered_twice_starts_one_run_and_an_inactive_workflow_none():
    workflow = factories.workflow(factories.spec("nightly"))
    kwargs = {"workflow": "nightly", "payload": {"n": 1}, "schedule": "nightly-1"}
    first = tasks.start_scheduled_run.apply(kwargs=kwargs, task_id="tick-1").get()
    again = tasks.start_scheduled_run.apply(kwargs=kwargs, task_id="tick-1").get()
    assert first["trace_id"] == again["trace_id"]
    run = WorkflowRun.objects.get()
    assert (run.source, run.payload) == ("schedule:nightly-1", {"n": 1})

    workflow.is_active = False
    workflow.save(update_fields=["is_active"])
    assert tasks.start_scheduled_run.apply(kwargs=kwargs, task_id="tick-2").get()["trace_id"] is None
    assert WorkflowRun.objects.count() == 1
