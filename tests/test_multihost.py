"""Faults across hosts: workers and the web app each on a host of their own (`tests.hosts`), whose links
to PostgreSQL and Redis are cut, made lossy or slow while real workers run product-shaped DAGs.

Every scenario asserts, besides its own bound:
- every run ends in a final state within the bound it states;
- no attempt's body runs twice, at the same time or after (the shared journal of `tests.e2e_tasks.journal`);
- no successor is dispatched twice, and none starts before its predecessors ended;
- no slot is left held, on any event type or fairness key;
- nothing a worker finished is lost: every body that ended on a host in reach of the database has its
  outcome recorded, and a body that ended on a cut host either has it recorded or was taken over
  because its lease lapsed, and then changed nothing.

Workers run with short leases (3 s lease, 1 s reconcile, 5 s dispatch grace). Run with
`pytest -m multihost`; `.ci/run` runs them as a step of their own.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest
from django.db import connection

import tests.e2e_tasks  # noqa: F401 - registers the test tasks here as the workers' --include does there
from events_app.models import Event, EventType, EventTypeKey
from tests import factories
from tests import test_faults as faults
from tests.e2e import trigger, wait_final, wait_for
from tests.hosts import Fleet, Unavailable
from tests.test_faults import FAST, assert_sound
from workflows_app.models import TaskRun, Worker, WorkflowRun

pytestmark = [pytest.mark.multihost, pytest.mark.e2e, pytest.mark.fault, pytest.mark.django_db(transaction=True)]

JOURNAL_TASK = "tests.e2e_tasks.journal"
QUEUE = "fleet"
LEASE_bound = float(FAST["EVENTFLOW_LEASE_SECONDS"]) + float(FAST["EVENTFLOW_RECONCILE_SECONDS"])
GRACE = float(FAST["EVENTFLOW_DISPATCH_GRACE_SECONDS"])


@pytest.fixture
def fleet(tmp_path: Path, transactional_db):
    """A fleet of hosts on this machine; its hosts, proxies and processes are removed after the test."""
    from tests.workers import purge_broker

    purge_broker()
    try:
        made = Fleet(tmp_path)
    except Unavailable as why:
        pytest.skip(f"hosts cannot be made on this machine: {why}")
    made.journal = tmp_path / "journal.jsonl"
    made.journal.touch()
    try:
        yield made
    finally:
        made.close()
        print(f"host logs in {tmp_path}")


def worker_env(fleet: Fleet, **extra: str) -> dict[str, str]:
    return {**FAST, "E2E_JOURNAL": str(fleet.journal), **extra}


def diamond(name: str, *, seconds: float = 1.0) -> None:
    """a -> (b, c) -> d, every node a journal task of `seconds` on the queue `fleet`, 6 at once."""
    faults.diamond(name, task=JOURNAL_TASK, seconds=seconds, queue=QUEUE)
    EventType.objects.filter(name=QUEUE).update(concurrency=6)


def journal(fleet: Fleet) -> list[dict]:
    return [json.loads(line) for line in fleet.journal.read_text().splitlines() if line.strip()]


def snapshot(trace_ids: list[str]) -> dict:
    """What the database says of these runs: every run's, task's and attempt's status and result."""
    runs = dict(WorkflowRun.objects.filter(trace_id__in=trace_ids).values_list("trace_id", "status"))
    tasks = sorted(
        TaskRun.objects.filter(run_id__in=trace_ids).values_list("run_id", "node_key", "status", "attempts", "result")
    )
    events = sorted(
        (str(e), s, json.dumps(r, sort_keys=True))
        for e, s, r in Event.objects.filter(trace_id__in=trace_ids).values_list("event_id", "status", "result")
    )
    return {"runs": runs, "tasks": tasks, "events": events}


def assert_fleet_sound(fleet: Fleet, trace_ids: list[str], *, cut_hosts: set[str] = frozenset()) -> None:
    """The guarantees every scenario states (see the module's docstring)."""
    assert_sound(trace_ids)
    assert not EventType.objects.filter(held__gt=0).exists(), "an event type still counts a slot held"
    # A key counts its slots only while its type has a share (`per_key_concurrency`).
    shared_keys = EventTypeKey.objects.filter(held__gt=0, event_type__per_key_concurrency__isnull=False)
    assert not shared_keys.exists(), "a fairness key still counts a slot held"

    lines = journal(fleet)
    begun = Counter(line["event"] for line in lines if line["phase"] == "begin")
    twice = {event: n for event, n in begun.items() if n > 1}
    assert not twice, f"an attempt's body ran more than once: {twice}"
    running: set[str] = set()
    for line in lines:  # the order of the lines, not any host's clock, says what overlapped
        if line["phase"] == "begin":
            assert line["event"] not in running, f"one attempt's bodies overlapped: {line}"
            running.add(line["event"])
        else:
            running.discard(line["event"])

    assert_concurrency_held(lines)

    ended = {line["event"]: line for line in lines if line["phase"] == "end" and line["trace"] in trace_ids}
    statuses = dict(Event.objects.filter(event_id__in=list(ended)).values_list("event_id", "status"))
    statuses = {str(k): v for k, v in statuses.items()}
    current = {str(e) for e in TaskRun.objects.filter(run_id__in=trace_ids).values_list("current_event_id", flat=True)}
    for event, line in ended.items():
        if statuses.get(event) == "SUCCESS":
            continue
        # Not recorded: only a cut host may have lost it, and only as an attempt taken over since.
        lost = f"{line['host']} finished {event} and its outcome is lost: {statuses.get(event)}"
        assert line["host"] in cut_hosts, lost
        assert event not in current, f"{event} ended on {line['host']}, was not recorded and was not taken over"


def assert_concurrency_held(lines: list[dict]) -> None:
    """Never more bodies of an event type running at once, across every host, than its concurrency: a
    body runs only while its task holds a slot, so the journal's order bounds what admission let out.
    (A body on a cut host that was taken over still runs after its slot was given back; those are
    skipped, their attempt's Event being a failure the reconciler wrote.)"""
    lost = {
        str(e)
        for e in Event.objects.filter(
            event_id__in={line["event"] for line in lines}, result__error__startswith="worker lost"
        ).values_list("event_id", flat=True)
    }
    types = {
        (str(run), node): name
        for run, node, name in TaskRun.objects.filter(run_id__in={line["trace"] for line in lines}).values_list(
            "run_id", "node_key", "event_type__name"
        )
    }
    limits = dict(EventType.objects.values_list("name", "concurrency"))
    running: Counter = Counter()
    most: Counter = Counter()
    for line in lines:
        if line["event"] in lost:
            continue
        kind = types[(line["trace"], line["node"])]
        running[kind] += 1 if line["phase"] == "begin" else -1
        most[kind] = max(most[kind], running[kind])
    over = {kind: n for kind, n in most.items() if n > limits[kind]}
    assert not over, f"more bodies ran at once than the concurrency allows: {over} (limits {limits})"


def database_now() -> float:
    with connection.cursor() as cursor:
        cursor.execute("SELECT extract(epoch FROM clock_timestamp())")
        return float(cursor.fetchone()[0])


def wait_back(worker_name: str, after: float, timeout: float) -> None:
    """Wait until the worker `worker_name` heartbeats again after `after` (the database's clock) with no
    attempt in its pool: it is back in reach, and whatever it held has been recorded or refused."""

    def back() -> bool:
        row = Worker.objects.filter(name=worker_name).values("last_seen", "attempts").first()
        return bool(row) and row["last_seen"].timestamp() > after and not row["attempts"]

    began = time.monotonic()
    wait_for(back, timeout=timeout, interval=0.5, what=f"{worker_name} to come back idle")
    print(f"{worker_name} came back idle {time.monotonic() - began:.1f} s after its link returned")


# --------------------------------------------------------------------------- 1: a host cut from everything


def test_a_host_cut_from_the_database_and_the_broker_for_60_s(fleet, api):
    """Host `lost` runs tasks when it is cut from PostgreSQL and Redis for 60 s. Bound: every run ends
    while it is still cut (the attempts it runs are taken over once their leases lapse; a message it
    took but had not started would be sent again after the dispatch grace, which scenario 2 exercises);
    once back, its stale completions change nothing."""
    diamond("cut_both", seconds=1.5)
    lost = fleet.host("lost").worker([QUEUE], env=worker_env(fleet))
    for name in ("b1", "b2"):
        fleet.host(name).worker([QUEUE], env=worker_env(fleet))
    trace_ids = [trigger(api, "cut_both") for _ in range(10)]
    wait_for(
        lambda: any(line["host"] == "lost" and line["phase"] == "begin" for line in journal(fleet)),
        timeout=30,
        what="host lost to begin a body",
    )
    fleet.hosts["lost"].cut()
    cut_at = time.monotonic()
    statuses = wait_final(trace_ids, timeout=55)
    took = time.monotonic() - cut_at
    assert set(statuses.values()) == {"SUCCESS"}, Counter(statuses.values())
    before = snapshot(trace_ids)
    begun = [line for line in journal(fleet) if line["host"] == "lost" and line["phase"] == "begin"]
    print(f"every run ended {took:.1f} s after the cut; host lost had begun {len(begun)} bodies")

    time.sleep(max(0.0, 60 - (time.monotonic() - cut_at)))  # the cut itself lasts 60 s
    mended_at = database_now()
    fleet.hosts["lost"].mend()
    wait_back(lost.name, mended_at, timeout=180)
    assert snapshot(trace_ids) == before, "a stale completion of the host that came back changed a run"
    assert_fleet_sound(fleet, trace_ids, cut_hosts={"lost"})


# --------------------------------------------------------------------------- 2: one link cut, the other kept


def reserved(worker_name: str) -> set[str] | None:
    """The task ids the worker took from the broker and has not started (Celery's `reserved`), None when
    it did not answer."""
    from config.celery import app

    answer = app.control.inspect(destination=[worker_name], timeout=1).reserved()
    if not answer or worker_name not in answer:
        return None
    return {request["id"] for request in answer[worker_name]}


def test_one_host_cut_from_the_database_only_and_another_from_the_broker_only(fleet, api):
    """Host `nodb` loses PostgreSQL but keeps Redis, holding messages it took and has not started (it
    prefetches 4 per pool process); host `nobroker` loses Redis but keeps PostgreSQL (it records
    outcomes whose successors it cannot send). Bound: every run ends while both are still cut, within
    45 s, what they held or could not send sent again by the healthy host; once back, `nodb` is refused
    every message it held (already run elsewhere) and neither changes anything."""
    diamond("cut_one", seconds=1.0)
    nodb = fleet.host("nodb").worker([QUEUE], env=worker_env(fleet), args=["--prefetch-multiplier", "4"])
    nobroker = fleet.host("nobroker").worker([QUEUE], env=worker_env(fleet))
    fleet.host("healthy").worker([QUEUE], env=worker_env(fleet))
    trace_ids = [trigger(api, "cut_one") for _ in range(12)]

    def ready_to_cut() -> set[str] | None:
        began = {line["host"] for line in journal(fleet) if line["phase"] == "begin"}
        return (reserved(nodb.name) or None) if "nobroker" in began else None

    wait_for(ready_to_cut, timeout=30, what="nobroker to begin a body and nodb to hold a message")
    fleet.hosts["nodb"].cut("postgres")
    fleet.hosts["nobroker"].cut("redis")
    cut_at = time.monotonic()
    held = reserved(nodb.name) or set()
    statuses = wait_final(trace_ids, timeout=45)
    print(f"every run ended {time.monotonic() - cut_at:.1f} s after the cuts; nodb held {len(held)} message(s)")
    assert set(statuses.values()) == {"SUCCESS"}, Counter(statuses.values())
    before = snapshot(trace_ids)

    mended_at = database_now()
    fleet.hosts["nodb"].mend("postgres")
    fleet.hosts["nobroker"].mend("redis")
    wait_back(nodb.name, mended_at, timeout=180)
    wait_back(nobroker.name, mended_at, timeout=180)
    wait_for(lambda: reserved(nodb.name) == set(), timeout=60, what="nodb to have tried every message it held")
    assert snapshot(trace_ids) == before, "a host that came back changed a run"
    begun = {(line["event"], line["host"]) for line in journal(fleet) if line["phase"] == "begin"}
    assert not {event for event, host in begun if host == "nodb"} & held, "nodb ran a message it held, late"
    assert held <= {event for event, _ in begun}, "a message nodb held was never run elsewhere"
    assert_fleet_sound(fleet, trace_ids, cut_hosts={"nodb", "nobroker"})


# --------------------------------------------------------------------------- 3: clocks minutes apart


def test_hosts_whose_clocks_are_minutes_ahead_and_behind(fleet, api):
    """Hosts `ahead` (+5 min) and `behind` (-5 min) work beside `true`, whose worker is then killed mid-run.
    Bound: no live attempt is ever taken over (no host reads another's lease as lapsed), and the killed
    host's attempts are taken over by the skewed ones within the lease bound, every run ending within
    30 s of the kill."""
    diamond("skewed", seconds=1.0)
    fleet.host("ahead").worker([QUEUE], env=worker_env(fleet), clock_offset=300)
    fleet.host("behind").worker([QUEUE], env=worker_env(fleet), clock_offset=-300)
    true = fleet.host("true").worker([QUEUE], env=worker_env(fleet))
    trace_ids = [trigger(api, "skewed") for _ in range(12)]
    wait_for(
        lambda: sum(line["host"] == "true" and line["phase"] == "begin" for line in journal(fleet)) >= 3,
        timeout=30,
        what="host true to begin bodies",
    )
    true.kill()
    killed_at = time.monotonic()
    try:
        statuses = wait_final(trace_ids, timeout=30)
    except AssertionError as late:
        statuses = {"late": str(late)}
    print(f"every run ended {time.monotonic() - killed_at:.1f} s after the kill")

    lost = Event.objects.filter(trace_id__in=trace_ids, result__error__startswith="worker lost")
    lost_hosts = Counter(str(e.result["error"]).split("worker lost: ")[1].split("@")[0] for e in lost)
    print(f"attempts taken over, by the host that ran them: {dict(lost_hosts)}")
    # Only the killed host's attempts were taken over; every skewed host's were left alone.
    assert set(lost_hosts) <= {"true"}, f"live attempts of skewed hosts were taken over: {lost_hosts}"
    assert set(statuses.values()) == {"SUCCESS"}, statuses
    assert_fleet_sound(fleet, trace_ids, cut_hosts={"true"})


# --------------------------------------------------------------------------- 4: far away, and lossy


def journal_pipeline(name: str) -> None:
    """The product pipeline with every node a journal task (of its own seconds, 0.05 for the echoes)."""
    spec = factories.product_pipeline_spec()
    spec["name"] = name
    for node in spec["nodes"]:
        seconds = (node.get("params") or {}).get("seconds", 0.05)
        node.update(task=JOURNAL_TASK, params={"seconds": seconds}, max_retries=5, retry_delay=0.2)
    factories.workflow(spec)


# Each node of the pipeline has its event type, so its queue.
PIPELINE_QUEUES = list(factories.product_pipeline_spec()["event_types"])


def test_the_pipeline_under_load_2_ms_from_its_services_with_a_lossy_host(fleet, api):
    """Three worker hosts with PostgreSQL and Redis 2 ms away (every round trip), one of them dropping
    5% of its packets, run 60 product pipelines started at once. Bound: all end within 120 s."""
    journal_pipeline("far_pipeline")
    for name in ("far1", "far2", "lossy"):
        fleet.host(name, delay_ms=2).worker(PIPELINE_QUEUES, concurrency=3, env=worker_env(fleet))
    fleet.hosts["lossy"].lose(0.05)
    started = time.monotonic()
    trace_ids = [trigger(api, "far_pipeline", {"n": i}) for i in range(60)]
    statuses = wait_final(trace_ids, timeout=120)
    print(f"60 pipelines ended {time.monotonic() - started:.1f} s after the first trigger")
    assert set(statuses.values()) == {"SUCCESS"}, Counter(statuses.values())
    by_host = Counter(line["host"] for line in journal(fleet) if line["phase"] == "end")
    print(f"bodies ended per host: {dict(by_host)}")
    assert by_host["lossy"] > 0, "the lossy host ran nothing: the scenario tested no loss"
    assert_fleet_sound(fleet, trace_ids)


# --------------------------------------------------------------------------- 5: the web app cut from the broker


def test_triggers_while_the_web_app_is_cut_from_the_broker(fleet, trigger_user):
    """The web app on host `web` loses Redis while triggers arrive. Each trigger is answered within 30 s:
    accepted (201, the run written) or refused cleanly (an error, nothing written). Bound: every
    accepted run ends within 60 s of the link's return, its first task sent again by the reconciler."""
    import requests
    from rest_framework.authtoken.models import Token

    bound = 30
    diamond("web_cut", seconds=0.2)
    token = Token.objects.create(user=trigger_user).key
    web = fleet.host("web")
    url = web.web(env=worker_env(fleet))
    fleet.host("work").worker([QUEUE], env=worker_env(fleet))
    headers = {"Authorization": f"Token {token}"}

    def post(i: int) -> tuple[int, float, dict]:
        """A trigger's status, seconds to its answer, and body; 0 when none came within the bound."""
        began = time.monotonic()
        try:
            response = requests.post(
                f"{url}/api/workflows/web_cut/runs/", json={"payload": {"i": i}}, headers=headers, timeout=bound
            )
        except requests.Timeout:
            return 0, time.monotonic() - began, {}
        return response.status_code, time.monotonic() - began, response.json()

    assert post(0)[0] == 201  # in reach: accepted and run
    web.cut("redis")
    answers = [post(i) for i in range(1, 7)]
    print("while cut: " + ", ".join(f"{code} in {took:.1f} s" for code, took, _ in answers))
    unanswered = [answer for answer in answers if not answer[0] or answer[1] >= bound]
    assert not unanswered, f"a trigger not answered within {bound} s: {answers}"
    accepted = [body["trace_id"] for code, _, body in answers if code == 201]
    refused = [(code, body) for code, _, body in answers if code != 201]
    assert all(code in (503, 504) and "detail" in body for code, body in refused), refused
    assert WorkflowRun.objects.count() == 1 + len(accepted), "a refused trigger left a run behind"

    web.mend("redis")
    statuses = wait_final(accepted, timeout=60)
    assert set(statuses.values()) <= {"SUCCESS"}, Counter(statuses.values())
    trace_ids = list(WorkflowRun.objects.values_list("trace_id", flat=True))
    assert_fleet_sound(fleet, [str(t) for t in trace_ids])
