"""Eventflow against hand-wired Celery canvas on one broker and one worker setup: `python bench/run.py [--quick]`.

Scenarios (numbered as in the README): 1 a chain of 20 no-op tasks, latency per hop; 2 concurrent diamonds
(a -> b, c -> d), runs/s and tasks/s; 3 the chain with finished runs already stored; 4 the trigger API
under gunicorn, requests/s and p95; 5 the memory of a worker's pool processes as tasks accumulate; 6 one node
mapped over 1,000 items and one collecting their results, against a chord.
Canvas and Eventflow samples alternate, so load from elsewhere on the machine hits both alike.
With `--db-latency 1ms`, scenarios 1 and 2 run again with PostgreSQL that far away from every process.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import http.server
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from _procs import Gunicorn, Worker, bench_env, children_of, cpu_seconds, memory_kib, wait_for
from _setup import print_table, setup_django, summary

from tests.processes import Process, free_port

DB_NAME = os.environ.get("BENCH_DB_NAME", "eventflow_bench_main")
BROKER_URL = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/7")
QUEUE = "bench"
API_QUEUE = "bench_api"
CANVAS = "canvas (django-db results)"
CANVAS_REDIS = "canvas (Redis results)"
EVENTFLOW = "Eventflow"
VARIANT = "Eventflow, variant"
OPERATORS = "Eventflow, with operators"
# Settings of the optional variant's worker (--variant), e.g. {"CELERY_DB_REUSE_MAX": "0"}.
VARIANT_ENV: dict[str, str] = {}
HOPS = 20
# Above any number of tasks in flight here, so admission never holds a task back; bench/admission.py
# measures the waiting line on its own.
CONCURRENCY = 100_000


@dataclass(frozen=True)
class Sizes:
    chain_samples: int
    diamond_runs: int
    diamond_repeats: int
    history: tuple[int, ...]
    history_samples: int
    api_requests: int
    api_seconds: float
    api_repeats: int
    memory_checkpoints: tuple[int, ...]
    map_items: int
    map_samples: int


FULL = Sizes(
    chain_samples=25,
    diamond_runs=500,
    diamond_repeats=2,
    history=(0, 10_000, 100_000),
    history_samples=8,
    api_requests=3000,
    api_seconds=30,
    api_repeats=3,
    memory_checkpoints=(1000, 10_000),
    map_items=1000,
    map_samples=9,
)
QUICK = Sizes(
    chain_samples=4,
    diamond_runs=100,
    diamond_repeats=2,
    history=(0, 1000, 5000),
    history_samples=3,
    api_requests=300,
    api_seconds=10,
    api_repeats=2,
    memory_checkpoints=(200, 1000),
    map_items=200,
    map_samples=2,
)


@dataclass
class Row:
    scenario: str
    measure: str
    system: str
    samples: list[float]
    baseline: Row | None = None
    target: str = ""

    def ratio(self) -> float:
        """The median over the baseline's median (1 without a baseline)."""
        if self.baseline is None:
            return 1.0
        return statistics.median(self.samples) / statistics.median(self.baseline.samples)

    def cells(self) -> list[str]:
        med, lo, hi = summary(self.samples)
        ratio = f"{self.ratio():.2f}"
        return [self.scenario, self.measure, self.system, _fmt(med), _fmt(lo), _fmt(hi), ratio, self.target]


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


# --------------------------------------------------------------------------- definitions


def define_workflows(queue: str, suffix: str = "") -> dict[str, Any]:
    """The chain of 20, the diamond and the fan-out (one node mapped over `payload.items`, then one that
    receives their results), on their own event type (`queue`, the Celery queue they go to)."""
    from workflows_app.definitions import workflow_definition_save

    keys = [f"n{i:02d}" for i in range(1, HOPS + 1)]

    def node(key: str) -> dict:
        return {"key": key, "task": "bench.noop", "event_type": queue}

    def save(name: str, nodes: list[str | dict], edges: list[list[str]]) -> Any:
        data = {
            "name": name + suffix,
            "event_types": {queue: {"concurrency": CONCURRENCY}},
            "nodes": [node(k) if isinstance(k, str) else k for k in nodes],
            "edges": edges,
        }
        return workflow_definition_save(data=data, known_tasks={"bench.noop"})

    return {
        "chain": save("bench_chain", keys, [[a, b] for a, b in zip(keys, keys[1:], strict=False)]),
        "diamond": save("bench_diamond", list("abcd"), [["a", "b"], ["a", "c"], ["b", "d"], ["c", "d"]]),
        "map": save("bench_map", [{**node("fan"), "map_over": "payload.items"}, "collect"], [["fan", "collect"]]),
        "chain_keys": keys,
    }


# --------------------------------------------------------------------------- the systems compared


class _Sink(http.server.BaseHTTPRequestHandler):
    """Answers every POST with 200 and counts it: an OTLP/HTTP collector and a webhook receiver."""

    received: Counter = Counter()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        _Sink.received[self.path] += 1
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


class Operators:
    """What operators plug in, on while its system's samples run: every process's spans exported to
    a collector (OTLP/HTTP), a webhook subscribed to every run's success, and Prometheus scraping
    /metrics once a second. Off for the others: the webhook inactive, tracing unset in this process
    (its worker has it always), the scrapes paused."""

    def __init__(self) -> None:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.endpoint = base
        self.env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": base,
            "EVENTFLOW_WEBHOOK_ALLOW_PRIVATE": "true",
        }
        from webhooks_app import services
        from webhooks_app.models import Webhook

        self.webhook = Webhook.objects.create(
            url=f"{base}/hook", notifications=["run.succeeded"], secret=services.secret_new(), is_active=False
        )
        self.scraping = threading.Event()
        threading.Thread(target=self._scrape, daemon=True).start()

    def _scrape(self) -> None:
        from django.db import connection
        from django.test import Client

        client = Client()
        while True:
            if self.scraping.wait():
                response = client.get("/metrics")
                assert response.status_code == 200
                _Sink.received["/metrics scraped"] += 1
                connection.close()
                time.sleep(1.0)

    @contextlib.contextmanager
    def on(self) -> Any:
        from webhooks_app.models import Webhook

        Webhook.objects.filter(pk=self.webhook.pk).update(is_active=True)
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = self.endpoint
        self.scraping.set()
        try:
            yield
        finally:
            self.scraping.clear()
            del os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"]
            Webhook.objects.filter(pk=self.webhook.pk).update(is_active=False)


@dataclass
class System:
    """One side of a comparison: how to run a chain and N diamonds on it, timed as described below."""

    label: str
    queue: str
    flows: dict | None = None  # Eventflow definitions; None for canvas
    redis_results: bool = False  # canvas whose worker stores results in Redis
    operators: Operators | None = None  # Eventflow with tracing, a webhook and scrapes of /metrics

    def chain(self) -> float:
        if self.operators:
            with self.operators.on():
                return self._eventflow_chain()
        return self._eventflow_chain() if self.flows else self._canvas_chain()

    def diamonds(self, count: int) -> float:
        return self._eventflow_diamonds(count) if self.flows else self._canvas_diamonds(count)

    def fan_out(self, count: int) -> dict[str, float]:
        return self._eventflow_fan_out(count) if self.flows else self._canvas_fan_out(count)

    def _eventflow_chain(self) -> float:
        """Milliseconds per hop: from the trigger to the run's end as the engine recorded it."""
        from workflows_app import engine
        from workflows_app.models import WorkflowRun

        started = time.time()
        run, _ = engine.workflow_run_start(workflow=self.flows["chain"], payload={}, source="bench")
        status, finished = wait_for(
            lambda: (
                WorkflowRun.objects.filter(pk=run.pk, finished_at__isnull=False)
                .values_list("status", "finished_at")
                .first()
            ),
            timeout=120,
            interval=0.005,
            what="an Eventflow chain",
        )
        assert status == WorkflowRun.Status.SUCCESS, status
        return (finished.timestamp() - started) / HOPS * 1000

    def _canvas_chain(self) -> float:
        """Milliseconds per hop: from sending the chain to its last task's result, as the worker stored it."""
        from celery import chain

        from bench.tasks import noop

        started = time.time()
        result = chain(*(noop.s().set(queue=self.queue) for _ in range(HOPS))).apply_async()
        finished = wait_for(
            lambda: self._done([result.id]).get(result.id), timeout=120, interval=0.005, what="a canvas chain"
        )
        return (finished - started) / HOPS * 1000

    def _eventflow_diamonds(self, count: int) -> float:
        """Seconds from the first trigger to the last run's end, for `count` diamonds started at once."""
        from django.db.models import Max

        from workflows_app import engine
        from workflows_app.models import WorkflowRun

        started = time.time()
        workflow = self.flows["diamond"]
        ids = [engine.workflow_run_start(workflow=workflow, payload={}, source="bench")[0].pk for _ in range(count)]
        runs = WorkflowRun.objects.filter(pk__in=ids)
        wait_for(
            lambda: runs.filter(finished_at__isnull=False).count() == count,
            timeout=120 + count,
            interval=0.1,
            what=f"{count} Eventflow diamonds",
        )
        assert not runs.exclude(status=WorkflowRun.Status.SUCCESS).exists()
        return runs.aggregate(end=Max("finished_at"))["end"].timestamp() - started

    def _canvas_diamonds(self, count: int) -> float:
        """The same for canvas `chain(a, chord([b, c], d))`, ending at the last stored result of a `d`."""
        from celery import chain, chord

        from bench.tasks import noop

        def sig() -> Any:
            return noop.s().set(queue=self.queue)

        started = time.time()
        # A chain's result is its last task's: here the chord's body, d.
        ids = [chain(sig(), chord([sig(), sig()], sig())).apply_async().id for _ in range(count)]
        done = wait_for(
            lambda: (found := self._done(ids)) and len(found) == count and found,
            timeout=120 + count,
            interval=0.1,
            what=f"{count} canvas diamonds",
        )
        return max(done.values()) - started

    def _eventflow_fan_out(self, count: int) -> dict[str, float]:
        """Seconds from the trigger to each phase's end, for one run of `fan` mapped over `count` items
        and `collect`: the trigger returned, the last instance finished, the run finished."""
        from django.db.models import Count, Max, Min

        from workflows_app import engine
        from workflows_app.models import TaskRun, WorkflowRun

        started = time.time()
        run, _ = engine.workflow_run_start(
            workflow=self.flows["map"], payload={"items": list(range(count))}, source="bench"
        )
        triggered = time.time()
        status, finished = wait_for(
            lambda: (
                WorkflowRun.objects.filter(pk=run.pk, finished_at__isnull=False)
                .values_list("status", "finished_at")
                .first()
            ),
            timeout=120 + count / 10,
            interval=0.02,
            what="an Eventflow fan-out",
        )
        assert status == WorkflowRun.Status.SUCCESS, status
        instances = TaskRun.objects.filter(run=run, node_key="fan", map_index__isnull=False)
        seen = instances.aggregate(n=Count("pk"), first=Min("started_at"), last=Max("finished_at"))
        assert seen["n"] == count, f"{seen['n']} instances of fan for {count} items"
        return {
            "start": triggered - started,
            "first": seen["first"].timestamp() - started,
            "mapped": seen["last"].timestamp() - started,
            "total": finished.timestamp() - started,
        }

    def _canvas_fan_out(self, count: int) -> dict[str, float]:
        """The same for `chord([noop.s(i) for i in range(count)], noop.s())`: sent, the last header
        task's result stored, the body's result stored."""
        from celery import chord
        from django.db.models import Max

        # The sender's result backend counts the chord's header (Redis' or django-celery-results'
        # ChordCounter), so it must be the worker's: Redis for the Redis reference.
        app = redis_results_app() if self.redis_results else None
        noop = (app or celery_app()).signature("bench.noop", queue=self.queue)

        started = time.time()
        result = chord([noop.clone(args=(i,)) for i in range(count)], noop.clone(), app=app)()
        sent = time.time()
        finished = wait_for(
            lambda: self._done([result.id]).get(result.id),
            timeout=120 + count / 10,
            interval=0.02,
            what="a canvas chord",
        )
        header = [r.id for r in result.parent.results]
        if self.redis_results:
            last = max(self._done(header).values())
        else:
            from django_celery_results.models import TaskResult

            last = TaskResult.objects.filter(task_id__in=header).aggregate(last=Max("date_done"))["last"].timestamp()
        # No "first" phase: Celery records no start here (task_track_started is off), only each end.
        return {"start": sent - started, "mapped": last - started, "total": finished - started}

    def _done(self, task_ids: list[str]) -> dict[str, float]:
        """When each of these canvas tasks finished successfully (epoch seconds), from the result backend."""
        if self.redis_results:
            import redis

            raw = redis.Redis.from_url(BROKER_URL).mget([f"celery-task-meta-{i}" for i in task_ids])
            metas = [json.loads(r) for r in raw if r]
            return {
                m["task_id"]: datetime.fromisoformat(m["date_done"]).timestamp()
                for m in metas
                if m["status"] == "SUCCESS"
            }
        from django_celery_results.models import TaskResult

        rows = TaskResult.objects.filter(task_id__in=task_ids, status="SUCCESS").values_list("task_id", "date_done")
        return {task_id: done.timestamp() for task_id, done in rows}


def celery_app() -> Any:
    from config.celery import app

    return app


@functools.cache
def redis_results_app() -> Any:
    """A Celery app configured as the project's, but with its results in Redis, as the reference worker's."""
    from celery import Celery

    app = Celery("bench_redis_results")
    app.config_from_object("django.conf:settings", namespace="CELERY")
    app.conf.update(result_backend=BROKER_URL)
    return app


ENGINE_TABLES = (
    "workflows_app_workflowrun",
    "workflows_app_taskrun",
    "events_app_event",
    "events_app_eventtype",
    "django_celery_results_taskresult",
)


@functools.cache
def autovacuum_is_off() -> bool:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SHOW autovacuum")
        return cursor.fetchone()[0] == "off"


def as_autovacuum_would() -> None:
    """VACUUM ANALYZE the tables the engine writes, when the server's autovacuum is off.

    A server with autovacuum on (PostgreSQL's default) keeps planner statistics current as tables
    grow, and each new statistic makes every connection plan its prepared statements again. With it
    off, a statement prepared while a table was nearly empty keeps the plan made for that (a
    sequential scan of it) for the connection's life, and costs more with every row added: the
    bench would measure a server nobody runs.
    """
    from django.db import connection

    if autovacuum_is_off():
        with connection.cursor() as cursor:
            cursor.execute(f"VACUUM ANALYZE {', '.join(ENGINE_TABLES)}")


def rounds(systems: list[System], count: int, measure: Any) -> dict[str, list[float]]:
    """`count` samples of every system, each round starting with the next one, so drift hits all alike."""
    samples: dict[str, list[float]] = {s.label: [] for s in systems}
    for i in range(count):
        as_autovacuum_would()
        shift = i % len(systems)
        for system in systems[shift:] + systems[:shift]:
            samples[system.label].append(measure(system))
    return samples


# --------------------------------------------------------------------------- scenarios 1 to 3


def rows_against(
    scenario: str, measure: str, systems: list[System], samples: dict[str, list[float]], targets: dict[str, str]
) -> list[Row]:
    """Rows for each system, the first one being the baseline of the ratios."""
    base = Row(scenario, measure, systems[0].label, samples[systems[0].label])
    rows = [base]
    for system in systems[1:]:
        rows.append(Row(scenario, measure, system.label, samples[system.label], base, targets.get(system.label, "")))
    return rows


def scenario_chain(systems: list[System], sizes: Sizes, where: str = "") -> list[Row]:
    """Scenario 1; `where` tells the database's place in its name when it is not on loopback."""
    name = f"1 chain of 20{where}"
    samples = rounds(systems, sizes.chain_samples, lambda s: s.chain())
    rows = rows_against(name, "ms per hop", systems, samples, {EVENTFLOW: "<= 1.5"})
    if OPERATORS in samples:
        # With tracing, a webhook and scrapes, over the same hop without them, round by round.
        per_round = [o / e for o, e in zip(samples[OPERATORS], samples[EVENTFLOW], strict=True)]
        one = Row("", "", "", [1.0])
        rows.append(Row(name, "hop with operators / hop without", OPERATORS, per_round, one, "<= 1.1"))
        print(f"  operators: {dict(_Sink.received)}", flush=True)
    # Each round's hop over the baseline's hop of the same round, as in scenario 3: the machine's
    # drift within the scenario moves both alike. Its ratio column is that median itself.
    canvas, eventflow = samples[systems[0].label], samples[EVENTFLOW]
    per_round = [e / c for e, c in zip(eventflow, canvas, strict=True)]
    one = Row("", "", "", [1.0])
    rows.append(Row(name, "hop / canvas hop, same round", EVENTFLOW, per_round, one, "<= 1.5, drift taken out"))
    # Against canvas whose results go to Redis instead: the same hop, over that reference's hop.
    redis = next((row for row in rows if row.system == CANVAS_REDIS), None)
    if redis is not None:
        rows.append(Row(name, "ms per hop, ratio to canvas (Redis results)", EVENTFLOW, eventflow, redis))
    return rows


def scenario_diamonds(systems: list[System], sizes: Sizes, where: str = "") -> list[Row]:
    """Scenario 2; `where` as in scenario 1."""
    n = sizes.diamond_runs

    def measure(system: System) -> float:
        seconds = system.diamonds(n)
        print(f"  diamonds: {system.label}: {n / seconds:.1f} runs/s", flush=True)
        return seconds

    seconds = rounds(systems, sizes.diamond_repeats, measure)
    rows = []
    for measure_name, per_run in (("runs/s", 1), ("tasks/s", 4)):
        rates = {label: [n * per_run / s for s in values] for label, values in seconds.items()}
        rows += rows_against(f"2 {n} diamonds{where}", measure_name, systems, rates, {EVENTFLOW: ">= 0.7"})
    return rows


def clear_history() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE workflows_app_taskrun, workflows_app_workflowrun, events_app_event,"
            " django_celery_results_taskresult, django_celery_results_groupresult,"
            " django_celery_results_chordcounter"
        )


def add_history(workflow: Any, keys: list[str], count: int) -> float:
    """Store `count` finished runs of the chain (one Event and one TaskRun per node each); returns seconds."""
    from django.db import connection

    version = workflow.versions.get(version=workflow.version)
    batch = f"history:{uuid.uuid4()}"
    started = time.monotonic()
    with connection.cursor() as cursor:
        # Oldest first, one second apart, each lasting one second.
        cursor.execute(
            """
            INSERT INTO workflows_app_workflowrun
                (trace_id, workflow_id, version_id, workflow_version, status, payload, source, created_at, finished_at)
            SELECT gen_random_uuid(), %s, %s, %s, 'SUCCESS', '{}'::jsonb, %s,
                   now() - make_interval(secs => g + 1), now() - make_interval(secs => g)
            FROM generate_series(1, %s) AS g
            """,
            [workflow.pk, version.pk, version.version, batch, count],
        )
        # Event ids derive from (trace id, node) so the task rows below can point at their event.
        cursor.execute(
            """
            INSERT INTO events_app_event
                (event_id, trace_id, event_type, task_name, payload, result, context, status, timestamp, updated_at)
            SELECT md5(r.trace_id::text || n.key)::uuid, r.trace_id, %s, 'bench.noop', '{}'::jsonb, 'null'::jsonb,
                   jsonb_build_object('workflow', 'bench_chain', 'workflow_version', %s, 'node', n.key,
                                      'attempt', 1, 'upstream', '{}'::jsonb),
                   'SUCCESS', r.created_at, r.finished_at
            FROM workflows_app_workflowrun r CROSS JOIN unnest(%s::text[]) AS n(key)
            WHERE r.source = %s
            """,
            [QUEUE, version.version, keys, batch],
        )
        cursor.execute(
            """
            INSERT INTO workflows_app_taskrun
                (run_id, node_key, event_type_id, task_name, status, attempts, holds_slot, current_event_id,
                 queued_at, started_at, finished_at, result, error, worker)
            SELECT r.trace_id, n.key, %s, 'bench.noop', 'SUCCESS', 1, false, md5(r.trace_id::text || n.key)::uuid,
                   r.created_at, r.created_at, r.finished_at, 'null'::jsonb, '', 'history'
            FROM workflows_app_workflowrun r CROSS JOIN unnest(%s::text[]) AS n(key)
            WHERE r.source = %s
            """,
            [QUEUE, keys, batch],
        )
    # As autovacuum would by then: planner statistics and the visibility map are current. The
    # checkpoint writes the bulk insert's pages now: otherwise the checkpointer writes them during
    # the next measurements, and every commit's flush waits behind it.
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE workflows_app_workflowrun, workflows_app_taskrun, events_app_event")
        cursor.execute("CHECKPOINT")
    return time.monotonic() - started


def scenario_history(systems: list[System], sizes: Sizes) -> list[Row]:
    """The chain on a canvas reference and on Eventflow (the last system given) as stored history grows."""
    eventflow = systems[-1]
    clear_history()
    rows: list[Row] = []
    base: Row | None = None
    base_relative: Row | None = None
    stored = 0
    for level in sizes.history:
        if level > stored:
            seconds = add_history(eventflow.flows["chain"], eventflow.flows["chain_keys"], level - stored)
            print(f"  history: stored {level - stored:,} more finished runs in {seconds:.0f}s", flush=True)
            stored = level
        samples = rounds(systems, sizes.history_samples, lambda s: s.chain())
        name = f"3 chain, {level:,} runs stored"
        rows.append(Row(name, "ms per hop", f"{systems[0].label} (reference)", samples[systems[0].label]))
        row = Row(name, "ms per hop", eventflow.label, samples[eventflow.label], base, "<= 1.15" if base else "")
        # The machine drifts between levels (the bulk insert's writes, the page cache), and the
        # canvas reference, which reads none of the history, drifts with it. Each round's hop
        # divided by the canvas hop of the same round takes that drift out.
        relative = Row(
            name,
            "hop / canvas hop, same round",
            eventflow.label,
            [e / c for e, c in zip(samples[eventflow.label], samples[systems[0].label], strict=True)],
            base_relative,
            "<= 1.15, drift taken out" if base_relative else "",
        )
        rows.extend([row, relative])
        base, base_relative = base or row, base_relative or relative
    return rows


# --------------------------------------------------------------------------- scenario 4


def define_api_workflow() -> Any:
    """The diamond on a queue no worker consumes: the server has both cores, and runs stay queued."""
    return define_workflows(API_QUEUE, "_api")["diamond"]


def free_api_slots() -> None:
    """End the runs the previous measurement started, and take their slots off the type's count.
    Nothing consumes their queue, so each would keep its root's slot: in operation a type holds at
    most its concurrency, and the slot index and the count stay that small."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE workflows_app_taskrun SET holds_slot = false, status = 'REVOKED'"
            " WHERE event_type_id = %s AND holds_slot",
            [API_QUEUE],
        )
        cursor.execute("UPDATE events_app_eventtype SET held = 0 WHERE name = %s", [API_QUEUE])
    as_autovacuum_would()


def api_token() -> str:
    from django.contrib.auth.models import Permission, User
    from rest_framework.authtoken.models import Token

    user, _ = User.objects.get_or_create(username="bench")
    user.user_permissions.add(
        Permission.objects.get(codename="add_workflowrun", content_type__app_label="workflows_app")
    )
    return Token.objects.get_or_create(user=user)[0].key


def load(
    port: int, method: str, path: str, *, body: bytes | None, headers: dict, total: int, clients: int, seconds: float
) -> tuple[float, list[float], Counter]:
    """Send `total` requests from `clients` threads (stopping early after `seconds`); one connection each."""
    lock = threading.Lock()
    sent = 0
    latencies: list[float] = []
    statuses: Counter = Counter()
    deadline = time.monotonic() + seconds

    def client() -> None:
        nonlocal sent
        while True:
            with lock:
                if sent >= total or time.monotonic() > deadline:
                    return
                sent += 1
            begun = time.perf_counter()
            try:
                # gunicorn's sync workers close the connection after every response.
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                conn.close()
                status: int | str = response.status
            except OSError as exc:
                status = type(exc).__name__
            elapsed = time.perf_counter() - begun
            with lock:
                latencies.append(elapsed)
                statuses[status] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    begun = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - begun, latencies, statuses


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def cpu_by_role(before: dict, after: dict, roles: dict[int, str]) -> Counter:
    """CPU seconds spent between two `cpu_seconds()` readings, by role: those in `roles` by pid, the
    rest by command name. A process that ended in between passed all of its time to its parent's
    count (a PostgreSQL backend closed when its connection reached CONN_MAX_AGE), so what it had
    spent before the first reading is taken off again."""

    def role_of(pid: int, name: str) -> str:
        return roles.get(pid) or (
            "PostgreSQL" if name.startswith("postgres") else "Redis" if name.startswith("redis") else "other"
        )

    spent: Counter = Counter()
    for pid, (name, seconds) in after.items():
        spent[role_of(pid, name)] += seconds - before.get(pid, (name, 0.0))[1]
    for pid, (name, seconds) in before.items():
        if pid not in after:
            spent[role_of(pid, name)] -= seconds
    return spent


CPU_ROLES = ("gunicorn", "PostgreSQL", "load generator")


def scenario_api(workflow: Any, sizes: Sizes, log_dir: Path, *, workers: int, clients: int) -> list[Row]:
    token = api_token()
    server = Gunicorn(workers=workers, log_dir=log_dir, env=bench_env())
    try:
        server.wait_ready()
        headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}
        trigger = ("POST", f"/api/workflows/{workflow.name}/runs/", json.dumps({"payload": {"bench": True}}).encode())
        floor = ("GET", "/api/", None)
        # Every gunicorn worker loads its code and connects; the triggers also grow the tables past
        # the size at which PostgreSQL plans index scans, as a database in operation is, before the
        # statistics are taken (`free_api_slots`): a plan made for a nearly empty table scans it all.
        for method, path, body, total in (*floor, 8 * workers), (*trigger, sizes.api_requests // 3):
            load(server.port, method, path, body=body, headers=headers, total=total, clients=workers, seconds=60)
        roles = {pid: "gunicorn" for pid in [server.pid, *children_of(server.pid)]} | {os.getpid(): "load generator"}
        results: dict[str, tuple[list[float], list[float]]] = {"floor": ([], []), "trigger": ([], [])}
        cpu: dict[tuple[str, str], list[float]] = {}
        for i in range(sizes.api_repeats):
            order = [("floor", floor), ("trigger", trigger)]
            for name, (method, path, body) in order if i % 2 == 0 else order[::-1]:
                free_api_slots()
                before = cpu_seconds()
                elapsed, latencies, statuses = load(
                    server.port,
                    method,
                    path,
                    body=body,
                    headers=headers,
                    total=sizes.api_requests,
                    clients=clients,
                    seconds=sizes.api_seconds,
                )
                spent = cpu_by_role(before, cpu_seconds(), roles)
                expected = 201 if name == "trigger" else 200
                if set(statuses) != {expected}:
                    raise RuntimeError(f"{name}: unexpected answers {dict(statuses)}; see {server.log_path}")
                results[name][0].append(len(latencies) / elapsed)
                results[name][1].append(p95(latencies) * 1000)
                for role in CPU_ROLES:
                    cpu.setdefault((name, role), []).append(spent[role] * 1000 / len(latencies))
                per_request = ", ".join(f"{role} {spent[role] * 1000 / len(latencies):.2f}" for role in CPU_ROLES)
                print(
                    f"  api: {name} {len(latencies) / elapsed:.0f} req/s, p95 {p95(latencies) * 1000:.1f} ms,"
                    f" CPU ms per request: {per_request}"
                )
    finally:
        server.stop()
    label = f"4 API, gunicorn -w {workers}, {clients} clients"
    floor_rate = Row(label, "requests/s", "GET /api/ (DRF floor)", results["floor"][0])
    floor_p95 = Row(label, "p95 ms", "GET /api/ (DRF floor)", results["floor"][1])
    rows = [
        floor_rate,
        Row(label, "requests/s", "POST .../runs/ (trigger)", results["trigger"][0], floor_rate, ">= 300/s"),
        floor_p95,
        Row(label, "p95 ms", "POST .../runs/ (trigger)", results["trigger"][1], floor_p95, "< 50 ms"),
    ]
    # Where the 2 cores go: CPU per request of each process group (all of PostgreSQL's processes).
    for role in CPU_ROLES:
        floor_cpu = Row(label, "CPU ms per request", f"{role}, floor", cpu[("floor", role)])
        rows += [floor_cpu, Row(label, "CPU ms per request", f"{role}, trigger", cpu[("trigger", role)], floor_cpu)]
    return rows


# --------------------------------------------------------------------------- scenario 5


def scenario_memory(systems: list[System], sizes: Sizes, log_dir: Path) -> list[Row]:
    """Memory of a fresh worker's pool processes at each checkpoint of tasks run, for each system."""
    wave = 25  # chains in flight at once: 500 tasks

    def run_wave(system: System, runs: int) -> None:
        from celery import chain

        from bench.tasks import noop
        from workflows_app import engine
        from workflows_app.models import WorkflowRun

        if system.flows:
            workflow = system.flows["chain"]
            ids = [engine.workflow_run_start(workflow=workflow, payload={}, source="bench")[0].pk for _ in range(runs)]
            done = WorkflowRun.objects.filter(pk__in=ids, finished_at__isnull=False)
            wait_for(lambda: done.count() == runs, timeout=300, interval=0.05, what="a wave of Eventflow chains")
        else:
            ids = [
                chain(*(noop.s().set(queue=system.queue) for _ in range(HOPS))).apply_async().id for _ in range(runs)
            ]
            wait_for(lambda: len(system._done(ids)) == runs, timeout=300, interval=0.05, what="a wave of canvas chains")

    rows: list[Row] = []
    for system in systems:
        name = f"bench-mem-{len(rows)}"
        worker = Worker(name, queue=system.queue, concurrency=2, log_dir=log_dir, env=bench_env(**system_env(system)))
        try:
            worker.wait_ready()
            done, base = 0, None
            for checkpoint in sizes.memory_checkpoints:
                while done < checkpoint:
                    runs = min(wave, (checkpoint - done) // HOPS)
                    run_wave(system, runs)
                    done += runs * HOPS
                peaks = [memory_kib(pid)["VmHWM"] / 1024 for pid in worker.pool_pids()]
                print(f"  memory: {system.label} after {done:,} tasks: pool peaks {peaks} MiB", flush=True)
                target = "<= 1.10" if base and system.label == EVENTFLOW else ""
                row = Row("5 worker memory", f"pool peak MiB after {done:,} tasks", system.label, peaks, base, target)
                rows.append(row)
                base = base or row
        finally:
            worker.stop()
    return rows


# --------------------------------------------------------------------------- scenario 6


# PostgreSQL's share is left out: Celery closes a worker's connection every CELERY_DB_REUSE_MAX tasks,
# and a backend that exits hands its CPU time to the postmaster, mixed with every other database's.
FAN_OUT_CPU_ROLES = ("worker", "bench process")


def scenario_fan_out(systems: list[System], sizes: Sizes, workers: dict[str, Worker]) -> list[Row]:
    """One node mapped over N no-op items, then one receiving their N results, against a chord."""
    n = sizes.map_items
    phases: dict[str, list[dict[str, float]]] = {s.label: [] for s in systems}
    cpu: dict[str, dict[str, list[float]]] = {role: {s.label: [] for s in systems} for role in FAN_OUT_CPU_ROLES}

    def measure(system: System) -> float:
        worker = workers[system.queue]
        before = cpu_seconds()
        seen = system.fan_out(n)
        roles = dict.fromkeys([worker.pid, *children_of(worker.pid)], "worker") | {os.getpid(): "bench process"}
        spent = cpu_by_role(before, cpu_seconds(), roles)
        for role in FAN_OUT_CPU_ROLES:
            cpu[role][system.label].append(spent[role] / n * 1000)
        phases[system.label].append(seen)
        parts = ", ".join(f"{phase} {seconds:.2f}" for phase, seconds in seen.items())
        per_item = ", ".join(f"{role} {spent[role] / n * 1000:.2f}" for role in FAN_OUT_CPU_ROLES)
        print(
            f"  fan-out: {system.label}: {seen['total']:.2f} s (at the end of each phase: {parts};"
            f" CPU ms per item: {per_item})",
            flush=True,
        )
        return seen["total"]

    totals = rounds(systems, sizes.map_samples, measure)
    name = f"6 map over {n:,} + collect"
    rows = rows_against(name, "s per run", systems, totals, {EVENTFLOW: "<= 1.2"})
    # Each round's run over the baseline's run of that round, as in scenario 1.
    per_round = [e / c for e, c in zip(totals[EVENTFLOW], totals[systems[0].label], strict=True)]
    rows.append(Row(name, "run / canvas run, same round", EVENTFLOW, per_round, Row("", "", "", [1.0]), "<= 1.2"))
    # Where the time goes: sending (the trigger, which creates the instances, or the chord's send),
    # the items (up to the last one's stored end), then the collecting node (or the chord's body).
    spans = {
        "s to send (trigger returned, chord sent)": lambda p: p["start"],
        "s to the last item's end": lambda p: p["mapped"],
        "s from the last item's end to the run's": lambda p: p["total"] - p["mapped"],
    }
    for measure_name, span in spans.items():
        values = {label: [span(p) for p in seen] for label, seen in phases.items()}
        rows += rows_against(name, measure_name, systems, values, {})
    # CPU per item of each process group, which waits for a core on a busy machine do not inflate.
    for role in FAN_OUT_CPU_ROLES:
        rows += rows_against(name, f"CPU ms per item, {role}", systems, cpu[role], {})
    return rows


# --------------------------------------------------------------------------- PostgreSQL far away


def db_latency(text: str) -> float:
    """`--db-latency`: milliseconds written with their unit, "1ms" or "0.5ms"; the number."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)ms", text)
    if match is None or not 0 < float(match[1]) <= 100:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a delay: give milliseconds with their unit, above 0 and at most 100, e.g. 1ms, 0.5ms, 2ms"
        )
    return float(match[1])


class DatabaseProxy(Process):
    """tests/netproxy.py between the bench's processes and PostgreSQL: a connection made through `url`
    waits `delay_ms` more on every round trip, as from a host that far from the database."""

    def __init__(self, *, database_url: str, delay_ms: float, log_dir: Path):
        parts = urlsplit(database_url)
        self.port = free_port()
        user = parts.netloc.rpartition("@")[0]
        self.url = parts._replace(netloc=f"{user}@127.0.0.1:{self.port}" if user else f"127.0.0.1:{self.port}").geturl()
        route = f"127.0.0.1:{self.port}={parts.hostname}:{parts.port or 5432}"
        cmd = [sys.executable, "-m", "tests.netproxy", "--delay-ms", f"{delay_ms:g}", route]
        super().__init__(cmd, log_path=log_dir / "netproxy.log", env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            if why := self.exited():
                raise RuntimeError(why)
            return "listening on" in self.log()

        wait_for(ready, timeout=timeout, interval=0.1, what="tests/netproxy.py to listen")

    def upstream_ports(self) -> set[int]:
        """The local ports of the proxy's sockets, among them every connection it opened to PostgreSQL."""
        inodes = set()
        for fd in Path(f"/proc/{self.pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if (link := os.readlink(fd)).startswith("socket:["):
                    inodes.add(link[8:-1])
        ports = set()
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rpartition(":")[2], 16))
        return ports


def select_one_ms(url: str, count: int = 300) -> float:
    """The median round trip of `SELECT 1` on one connection to `url`, in milliseconds."""
    import psycopg

    times = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT 1")
        for _ in range(count):
            begun = time.perf_counter()
            conn.execute("SELECT 1").fetchone()
            times.append(time.perf_counter() - begun)
    return statistics.median(times) * 1000


def connect_through(url: str) -> None:
    """From now on this process (the ORM, django-celery-results' backend) and the workers started
    after (their DATABASE_URL) reach PostgreSQL at `url`."""
    from django.db import connection

    parts = urlsplit(url)
    connection.close()
    # The connection's settings are the dict every thread's connection is made from.
    connection.settings_dict.update(HOST=parts.hostname, PORT=str(parts.port))
    os.environ["DATABASE_URL"] = url


def connections_around(proxy: DatabaseProxy, since: datetime) -> list[str]:
    """The bench database's connections opened after `since` that do not come through the proxy, as
    "pid application" (one of a process stopped before may still be ending)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid, application_name, client_port FROM pg_stat_activity"
            " WHERE datname = current_database() AND backend_type = 'client backend' AND backend_start >= %s",
            [since],
        )
        found = cursor.fetchall()
    # Read after the query, whose own connection may have just been opened.
    ports = proxy.upstream_ports()
    return [f"{pid} {app}".strip() for pid, app, port in found if port not in ports]


def latency_table(phases: list[tuple[str, float | None, list[Row]]]) -> None:
    """Eventflow over canvas (django-db results) for each place of the database, side by side."""

    def ratio(rows: list[Row], measure: str) -> str:
        found = [r for r in rows if r.measure == measure and r.system == EVENTFLOW]
        return f"{found[0].ratio():.2f}" if found else "-"

    print()
    print_table(
        [
            "PostgreSQL",
            "SELECT 1 ms",
            "ms per hop (canvas, Eventflow)",
            "hop, Eventflow / canvas",
            "same round",
            "diamond runs/s, Eventflow / canvas",
        ],
        [
            [
                where,
                "-" if select_ms is None else f"{select_ms:.3f}",
                ", ".join(
                    _fmt(statistics.median(r.samples))
                    for r in rows
                    if r.measure == "ms per hop" and r.system in (CANVAS, EVENTFLOW)
                )
                or "-",
                ratio(rows, "ms per hop"),
                ratio(rows, "hop / canvas hop, same round"),
                ratio(rows, "runs/s"),
            ]
            for where, select_ms, rows in phases
        ],
    )


# --------------------------------------------------------------------------- main


def system_env(system: System) -> dict[str, str]:
    """Settings switches for the worker of `system` (see bench/settings.py)."""
    if system.redis_results:
        return {"BENCH_RESULT_BACKEND": BROKER_URL}
    if system.label.startswith(VARIANT):
        return VARIANT_ENV
    if system.operators:
        return system.operators.env
    return {}


def scenarios_on_workers(
    systems: list[System], sizes: Sizes, log_dir: Path, only: list[int], *, where: str = "", check: Any = None
) -> list[Row]:
    """Scenarios 1, 2, 3 and 6 of `only`, on one worker per queue started for them and stopped after;
    `check` is called once they have warmed up."""
    canvas = systems[0]
    eventflow = next(s for s in systems if s.label == EVENTFLOW)
    rows: list[Row] = []
    workers: list[Worker] = []
    try:
        # One worker per queue, all with the same options; canvas and Eventflow share the first.
        for system in systems[1:]:
            env = bench_env(**system_env(system))
            workers.append(Worker(f"bench-{system.queue}", queue=system.queue, concurrency=2, log_dir=log_dir, env=env))
        if systems[-1].operators:
            # Webhooks go out from the engine's own queue, on a worker of its own as `run_workers` runs it.
            env = bench_env(**system_env(systems[-1]))
            workers.append(Worker("bench-celery", queue="celery", concurrency=2, log_dir=log_dir, env=env))
        for worker in workers:
            worker.wait_ready()
        rounds(systems, 3, lambda s: s.chain())  # warm every side: imports, connections, caches
        if check:
            check()
        if 1 in only:
            print(f"scenario 1{where}", flush=True)
            rows += scenario_chain(systems, sizes, where)
        if 2 in only:
            print(f"scenario 2{where}", flush=True)
            rows += scenario_diamonds(systems, sizes, where)
        if 3 in only:
            print("scenario 3", flush=True)
            rows += scenario_history([canvas, eventflow], sizes)
        if 6 in only:
            print("scenario 6", flush=True)
            # One unmeasured round: the first fan-out grows the tables past their first plans.
            rounds(systems, 1, lambda s: s.fan_out(sizes.map_items))
            rows += scenario_fan_out(systems, sizes, {worker.queue: worker for worker in workers})
    finally:
        for worker in workers:
            worker.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke check, not figures")
    parser.add_argument(
        "--only", type=int, nargs="+", help="scenario numbers to run (default: all, or 1 2 with --db-latency)"
    )
    parser.add_argument("--api-workers", type=int, default=4, help="gunicorn sync workers (scenario 4)")
    parser.add_argument("--api-clients", type=int, default=4, help="concurrent load generator threads (scenario 4)")
    parser.add_argument(
        "--variant",
        metavar="SETTINGS",
        default="",
        help='also run Eventflow on a worker with these environment settings, e.g. "CELERY_DB_REUSE_MAX=0"',
    )
    parser.add_argument(
        "--operators",
        action="store_true",
        help="also run Eventflow with tracing to a collector, a webhook on every run and /metrics scraped (scenario 1)",
    )
    parser.add_argument(
        "--db-latency",
        metavar="DELAY",
        type=db_latency,
        help="after the loopback figures, run scenarios 1 and 2 again with every process (workers and"
        " this one) reaching PostgreSQL through tests/netproxy.py, DELAY (e.g. 1ms) added per round trip",
    )
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    only = args.only or ([1, 2] if args.db_latency else [1, 2, 3, 4, 5, 6])
    far = [n for n in only if n in (1, 2)]
    if args.db_latency and not far:
        parser.error("--db-latency measures scenarios 1 and 2: give --only with 1 or 2")

    os.environ["CELERY_BROKER_URL"] = BROKER_URL
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.settings"
    # The trigger throttle (6000/minute per user by default) would cap scenario 4 at 100 requests/s.
    os.environ["EVENTFLOW_TRIGGER_RATE"] = "10000000/minute"
    setup_django(DB_NAME)
    import redis

    log_dir = Path(tempfile.mkdtemp(prefix="eventflow-bench-"))
    print(f"database {DB_NAME}, broker {BROKER_URL}, logs in {log_dir}", flush=True)
    if autovacuum_is_off():
        print("PostgreSQL's autovacuum is off here: each round starts with VACUUM ANALYZE, as it would", flush=True)
    broker = redis.Redis.from_url(BROKER_URL)
    broker.flushdb()  # the bench's own Redis database: messages left by an interrupted run
    canvas = System(CANVAS, QUEUE)
    eventflow = System(EVENTFLOW, QUEUE, define_workflows(QUEUE))
    systems = [canvas, System(CANVAS_REDIS, "bench_r", redis_results=True), eventflow]
    if args.variant:
        VARIANT_ENV.update(item.split("=", 1) for item in args.variant.split())
        systems.append(System(f"{VARIANT} ({args.variant})", "bench_p", define_workflows("bench_p", "_p")))
    if args.operators:
        systems.append(System(OPERATORS, "bench_o", define_workflows("bench_o", "_o"), operators=Operators()))
    rows: list[Row] = []
    far_rows: list[Row] = []
    proxy: DatabaseProxy | None = None
    try:
        if {1, 2, 3, 6} & set(only):
            rows += scenarios_on_workers(systems, sizes, log_dir, only)
        if 5 in only:
            print("scenario 5", flush=True)
            rows += scenario_memory([eventflow], sizes, log_dir)
        if 4 in only:
            print("scenario 4", flush=True)
            api = define_api_workflow()
            rows += scenario_api(api, sizes, log_dir, workers=args.api_workers, clients=args.api_clients)
        if args.db_latency:
            # Last, so every scenario before had PostgreSQL on loopback. The broker stays on loopback.
            direct_url = os.environ["DATABASE_URL"]
            proxy = DatabaseProxy(database_url=direct_url, delay_ms=args.db_latency, log_dir=log_dir)
            proxy.wait_ready()
            direct_ms, far_ms = select_one_ms(direct_url), select_one_ms(proxy.url)
            print(
                f"SELECT 1 round trip, median of 300: {direct_ms:.3f} ms direct, {far_ms:.3f} ms through"
                f" tests/netproxy.py --delay-ms {args.db_latency:g}",
                flush=True,
            )
            switched = datetime.now(tz=UTC)
            connect_through(proxy.url)

            def check() -> None:
                # Every process's connections were opened after the switch; a worker that kept
                # reaching PostgreSQL directly would not pay the delay.
                if around := connections_around(proxy, switched):
                    raise RuntimeError(f"connections to {DB_NAME} not through the proxy: {around}")
                print("every connection to the bench database goes through the proxy", flush=True)

            cpu_before = cpu_seconds().get(proxy.pid, ("", 0.0))[1]
            where = f", PostgreSQL {args.db_latency:g} ms away"
            far_rows = scenarios_on_workers(systems, sizes, log_dir, far, where=where, check=check)
            print(f"tests/netproxy.py used {cpu_seconds()[proxy.pid][1] - cpu_before:.1f} s of CPU", flush=True)
    finally:
        if proxy is not None:
            proxy.stop()
        broker.flushdb()
    print()
    print_table(
        ["scenario", "measure", "system", "median", "min", "max", "ratio", "target"],
        [row.cells() for row in sorted(rows + far_rows, key=lambda r: r.scenario[0])],
    )
    if args.db_latency:
        far_label = f"{args.db_latency:g} ms away (tests/netproxy.py)"
        near = [r for r in rows if r.scenario[0] in "12"]
        latency_table([("loopback", direct_ms, near), (far_label, far_ms, far_rows)])


if __name__ == "__main__":
    main()
