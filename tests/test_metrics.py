"""GET /metrics read with Prometheus' own parser against the database while real workers run, and its token."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.db.models import Count, F, Sum
from prometheus_client.parser import text_string_to_metric_families

import tests.e2e_tasks  # noqa: F401 - registers the test tasks here as the workers' --include does there
from tests import factories
from tests.e2e import trigger, wait_final, wait_for
from tests.e2e_tasks import _redis
from workflows_app.models import TaskRun, WorkflowRun

ECHO, FAIL, GATE = "workflows_app.tasks.echo", "workflows_app.tasks.fail", "tests.e2e_tasks.gate"


def scrape(client, **headers) -> dict:
    """The metric families of one scrape, by name (a counter's family drops its `_total`)."""
    response = client.get("/metrics", **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(response.content.decode())}


def values(families: dict, family: str, sample: str | None = None, labels: tuple[str, ...] = ("event_type",)) -> dict:
    """Each sample `sample` (by default the family's own name) of a family: the values of `labels`
    (and `le` for a bucket) -> the sample's value."""
    wanted = sample or family
    return {
        tuple(s.labels[k] for k in labels) + ((s.labels["le"],) if "le" in s.labels else ()): s.value
        for s in families[family].samples
        if s.name == wanted
    }


def runs_total(families: dict) -> dict:
    return values(families, "eventflow_runs", "eventflow_runs_total", ("workflow", "status"))


def tasks_total(families: dict) -> dict:
    return values(families, "eventflow_tasks", "eventflow_tasks_total", ("event_type", "status"))


def db_runs_final() -> dict[tuple, float]:
    rows = (
        WorkflowRun.objects.filter(status__in=WorkflowRun.FINAL)
        .values("workflow__name", "status")
        .annotate(n=Count("trace_id"))
    )
    return {(r["workflow__name"], r["status"]): r["n"] for r in rows}


def db_tasks_final() -> dict[tuple, float]:
    rows = TaskRun.objects.filter(status__in=TaskRun.FINAL).values("event_type_id", "status").annotate(n=Count("id"))
    return {(r["event_type_id"] or "", r["status"]): r["n"] for r in rows}


def db_line(event_type: str) -> tuple[int, int]:
    """(holding a slot, waiting in line) for one event type, counted on the task rows."""
    tasks = TaskRun.objects.filter(event_type_id=event_type)
    return tasks.filter(holds_slot=True).count(), tasks.filter(status="QUEUED", holds_slot=False).count()


def check_histogram(families: dict, name: str, event_type: str) -> tuple[float, float]:
    """The (count, sum) of one event type's histogram, after checking its buckets are cumulative."""
    buckets = [v for (t, _le), v in values(families, name, f"{name}_bucket").items() if t == event_type]
    assert buckets == sorted(buckets), buckets
    count = values(families, name, f"{name}_count")[(event_type,)]
    assert buckets[-1] == count  # the +Inf bucket
    return count, values(families, name, f"{name}_sum")[(event_type,)]


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_scrape_matches_the_database_while_real_workers_run(workers, api, client):
    factories.workflow(
        factories.spec(
            "metered",
            [{"key": "a", "task": ECHO, "event_type": "m_fast"}, {"key": "b", "task": GATE, "event_type": "m_slow"}],
            [["a", "b"]],
            event_types={"m_fast": {"concurrency": 2}, "m_slow": {"concurrency": 1}},
        )
    )
    factories.workflow(factories.spec("metered_fail", [("x", FAIL)], event_type="m_fast"))
    workers(["m_fast", "m_slow"], concurrency=2)
    runs = [trigger(api, "metered", {"n": i}) for i in range(3)]

    # One gate runs (m_slow's only slot), two wait in its line: a state that holds until the test opens them.
    wait_for(
        lambda: (
            TaskRun.objects.filter(event_type_id="m_slow", status="STARTED").count() == 1
            and db_line("m_slow") == (1, 2)
        ),
        timeout=60,
        what="one gate running and two queued",
    )
    first = scrape(client)
    assert values(first, "eventflow_event_type_running")[("m_slow",)] == 1
    assert values(first, "eventflow_event_type_queued")[("m_slow",)] == 2
    assert values(first, "eventflow_event_type_running")[("m_fast",)] == db_line("m_fast")[0] == 0
    assert values(first, "eventflow_event_type_queued")[("m_fast",)] == 0
    assert values(first, "eventflow_event_type_concurrency") == {("m_fast",): 2, ("m_slow",): 1}
    assert tasks_total(first) == db_tasks_final() == {("m_fast", "SUCCESS"): 3}
    assert runs_total(first) == db_runs_final() == {}
    assert values(first, "eventflow_runs_running", labels=("workflow",)) == {("metered",): 3}
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT extract(epoch FROM now() - min(queued_at)) FROM workflows_app_taskrun "
            "WHERE event_type_id = 'm_slow' AND status = 'QUEUED' AND NOT holds_slot"
        )
        oldest_now = cursor.fetchone()[0]
    oldest = values(first, "eventflow_oldest_queued_seconds")[("m_slow",)]
    assert 0 < oldest <= float(oldest_now)
    assert values(first, "eventflow_oldest_queued_seconds")[("m_fast",)] == 0
    # The head of the line keeps waiting, so its age rises from scrape to scrape.
    wait_for(
        lambda: values(scrape(client), "eventflow_oldest_queued_seconds")[("m_slow",)] > oldest + 0.2,
        timeout=10,
        what="the oldest wait to grow",
    )
    # The running gate has waited (first attempt); the echoes ran and ended.
    assert check_histogram(first, "eventflow_task_wait_seconds", "m_slow")[0] == 1
    assert check_histogram(first, "eventflow_task_duration_seconds", "m_fast")[0] == 3
    assert check_histogram(first, "eventflow_task_duration_seconds", "m_slow") == (0, 0)  # none ended yet

    failing = trigger(api, "metered_fail")
    for trace_id in runs:
        _redis().set(f"open:{trace_id}", 1, ex=300)
    assert wait_final([*runs, failing]) == {**dict.fromkeys(runs, "SUCCESS"), failing: "FAILED"}

    last = scrape(client)
    assert runs_total(last) == db_runs_final()
    assert db_runs_final() == {("metered", "SUCCESS"): 3, ("metered_fail", "FAILED"): 1}
    assert tasks_total(last) == db_tasks_final()
    assert db_tasks_final() == {("m_fast", "SUCCESS"): 3, ("m_fast", "FAILURE"): 1, ("m_slow", "SUCCESS"): 3}
    assert values(last, "eventflow_runs_running", labels=("workflow",)) == {}
    for event_type in ("m_fast", "m_slow"):
        assert db_line(event_type) == (0, 0)
        assert values(last, "eventflow_event_type_running")[(event_type,)] == 0
        assert values(last, "eventflow_event_type_queued")[(event_type,)] == 0
        assert values(last, "eventflow_oldest_queued_seconds")[(event_type,)] == 0

    # The histograms hold every attempt that ended (all within the window), with the database's times.
    slow = TaskRun.objects.filter(event_type_id="m_slow").aggregate(
        ran=Sum(F("finished_at") - F("started_at")), waited=Sum(F("started_at") - F("queued_at"))
    )
    count, total = check_histogram(last, "eventflow_task_duration_seconds", "m_slow")
    assert count == 3 and total == pytest.approx(slow["ran"].total_seconds(), abs=1e-3)
    count, total = check_histogram(last, "eventflow_task_wait_seconds", "m_slow")
    assert count == 3 and total == pytest.approx(slow["waited"].total_seconds(), abs=1e-3)
    # Two gates waited in line behind the first, held until the test opened it.
    assert slow["waited"] > timedelta(seconds=0.2)
    assert check_histogram(last, "eventflow_task_duration_seconds", "m_fast")[0] == 4


@pytest.mark.django_db
def test_the_token_is_required_once_set(client, settings):
    factories.workflow(factories.spec("tokened", event_type="m_tok"))
    assert client.get("/metrics").status_code == 200  # no token configured: open

    settings.EVENTFLOW = {**settings.EVENTFLOW, "METRICS_TOKEN": "s3cret-token"}
    for headers in ({}, {"HTTP_AUTHORIZATION": "Bearer wrong"}, {"HTTP_AUTHORIZATION": "Token s3cret-token"}):
        response = client.get("/metrics", **headers)
        assert response.status_code == 401, headers
        assert response["WWW-Authenticate"].startswith("Bearer")
        assert b"eventflow_" not in response.content

    families = scrape(client, HTTP_AUTHORIZATION="Bearer s3cret-token")
    assert values(families, "eventflow_event_type_concurrency") == {("m_tok",): 1}


@pytest.mark.django_db
def test_a_scrape_asks_a_fixed_number_of_queries(client, django_assert_num_queries):
    """However many runs and event types there are: the queue gauges, the runs and tasks that ended
    (the rollup and what ended since), the histograms; and the rollup moving on, once a minute."""
    factories.workflow(factories.spec("q1", event_type="m_q1"))
    factories.workflow(factories.spec("q2", event_type="m_q2"))
    scrape(client)  # the first rolls up what ended before five minutes ago
    with django_assert_num_queries(3):
        scrape(client)


@pytest.mark.django_db
def test_the_counters_keep_what_the_rollup_counted_after_purging_and_add_what_ended_since(client):
    from django.db.models.functions import Now

    from workflows_app import engine
    from workflows_app.models import MetricsWatermark

    workflow = factories.workflow(factories.spec("rolled", [("a", "workflows_app.tasks.fail")], event_type="m_r"))
    runs = [engine.workflow_run_start(workflow=workflow, payload={})[0] for _ in range(3)]
    for run in runs:
        engine.workflow_run_cancel(trace_id=str(run.trace_id))
    # Two of them ended an hour ago: the next scrape rolls them up.
    WorkflowRun.objects.filter(pk__in=[runs[0].pk, runs[1].pk]).update(finished_at=Now() - timedelta(hours=1))
    TaskRun.objects.filter(run__in=runs[:2]).update(finished_at=Now() - timedelta(hours=1))
    MetricsWatermark.objects.all().delete()
    first = scrape(client)
    assert runs_total(first)[("rolled", "CANCELED")] == 3
    assert tasks_total(first)[("m_r", "REVOKED")] == 3
    assert MetricsWatermark.objects.get().until is not None
    WorkflowRun.objects.filter(pk__in=[runs[0].pk, runs[1].pk]).delete()  # purged
    later = scrape(client)
    assert runs_total(later)[("rolled", "CANCELED")] == 3
    assert tasks_total(later)[("m_r", "REVOKED")] == 3
