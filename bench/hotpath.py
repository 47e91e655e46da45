"""Where a worker's time per task goes: `python bench/hotpath.py [--system eventflow|canvas] [--seconds N]`.

Starts a bench worker (prefork -c 2), keeps chains of 20 no-op tasks running for N seconds while
py-spy samples both pool processes (wall-clock, waits included), and prints the functions that
hold the most time inside task execution, plus the database queries each engine transition makes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _procs import Worker, bench_env
from _setup import setup_django
from run import BROKER_URL, CANVAS, DB_NAME, EVENTFLOW, QUEUE, System, define_workflows

# Frames that mark "a task is being executed" in a pool process; samples outside them are idle waits.
TASK_FRAME = "trace_task"


def pyspy(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("py-spy")
    cmd = [str(exe), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "250"]
    cmd += ["--idle", "--format", "raw", "--output", str(out), "--nonblocking"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize(paths: list[Path], top: int) -> None:
    """Inclusive and own (leaf) share of task-execution samples per function, biggest first."""
    inclusive: Counter = Counter()
    own: Counter = Counter()
    total = 0
    for path in paths:
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = stack.split(";")
            inside = [i for i, f in enumerate(frames) if TASK_FRAME in f]
            if not inside:
                continue
            total += int(count)
            keys = [_frame_key(f) for f in frames[inside[0] + 1 :]]
            for key in set(keys):
                inclusive[key] += int(count)
            if keys:
                own[keys[-1]] += int(count)
    print(f"\n{total} samples inside task execution (250 Hz, both pool processes, waits included)")
    for title, counter in (("inclusive", inclusive), ("own", own)):
        print(f"-- {title}")
        for key, count in counter.most_common(top):
            print(f"{100 * count / total:6.1f}%  {key}")


def _frame_key(frame: str) -> str:
    name, _, where = frame.partition(" (")
    return f"{name}  [{'/'.join(Path(where.split(':')[0]).parts[-2:])}]"


def count_queries(flows: dict) -> None:
    """Statements per engine transition for one hop of the chain, run in this process (nothing
    published): a success as a worker records it (with its Event and the run's payload from its
    start: one call of `eventflow_advance`) and as one reported by its ids alone records it (a read
    of the run first). Each statement is sent alone, in autocommit: one round trip, its own
    transaction."""
    from django.db import connection

    from workflows_app import engine, pgsql
    from workflows_app.engine import outbox
    from workflows_app.models import TaskRun

    statements: list[str] = []
    original = pgsql.execute, outbox.publish

    def recorded(sql, params):
        statements.append(" ".join(sql.split()))
        return original[0](sql, params)

    def orm(execute, sql, params, many, context):
        statements.append(sql)
        return execute(sql, params, many, context)

    outbox.publish = lambda messages, revokes: None
    pgsql.execute = recorded
    try:
        for how, with_event in (("with its Event, as a worker sends it", True), ("by its ids alone", False)):
            run, _ = engine.workflow_run_start(workflow=flows["chain"], payload={}, source="bench")
            with connection.execute_wrapper(orm):
                for _ in range(3):
                    row = TaskRun.objects.select_related("current_event").get(run=run, status=TaskRun.Status.QUEUED)
                    event_id, message = str(row.current_event_id), row.current_event.as_message()
                    statements.clear()
                    started = engine.task_run_start(event_id=event_id, attempt=1, worker="profile")
                    start_statements = len(statements)
                    statements.clear()
                    engine.task_run_finish(
                        trace_id=str(run.pk),
                        event_id=event_id,
                        succeeded=True,
                        result=None,
                        event=message if with_event else None,
                        run_payload=started.run_payload if with_event else None,
                    )
            print(
                f"\ntask_run_start: {start_statements} statement (autocommit); task_run_finish {how}:"
                f" {len(statements)} statement(s), each its own round trip:"
            )
            for sql in statements:
                print(f"   {sql[:150]}")
    finally:
        pgsql.execute, outbox.publish = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", choices=["eventflow", "canvas"], default="eventflow")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    os.environ["CELERY_BROKER_URL"] = BROKER_URL
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.settings"
    setup_django(DB_NAME)
    import redis

    redis.Redis.from_url(BROKER_URL).flushdb()
    flows = define_workflows(QUEUE)
    log_dir = Path(tempfile.mkdtemp(prefix="eventflow-profile-"))
    worker = Worker("bench-profile", queue=QUEUE, concurrency=2, log_dir=log_dir, env=bench_env())
    try:
        worker.wait_ready()
        system = System(CANVAS, QUEUE) if args.system == "canvas" else System(EVENTFLOW, QUEUE, flows)
        sample = system.chain
        for _ in range(3):
            sample()
        outs = [log_dir / f"pool-{pid}.txt" for pid in worker.pool_pids()]
        spies = [pyspy(pid, args.seconds, out) for pid, out in zip(worker.pool_pids(), outs, strict=True)]
        hops: list[float] = []
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            hops.append(sample())
        for spy in spies:
            spy.wait(args.seconds + 30)
        print(f"{args.system}: {len(hops)} chains, median {sorted(hops)[len(hops) // 2]:.2f} ms per hop")
        summarize([o for o in outs if o.exists()], args.top)
    finally:
        worker.stop()
        redis.Redis.from_url(BROKER_URL).flushdb()
    if args.system == "eventflow":
        count_queries(flows)


if __name__ == "__main__":
    main()
