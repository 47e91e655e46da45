"""manage.py trigger_workflow: start a run, print its trace_id, and optionally wait for its outcome."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from workflows_app import engine, selectors
from workflows_app.models import TaskRun, WorkflowRun

from ._helpers import error_summary, waiting_for

# Seconds between two reads of the run while waiting: short enough to feel live, and one
# indexed read per poll costs the database next to nothing.
POLL_INTERVAL = 0.5


class Command(BaseCommand):
    help = (
        "Start a run of workflow NAME and print its trace_id (alone, on the first line). With --wait, "
        "follow it until it ends: exit status 0 when it succeeded, 1 when it failed, was canceled, or "
        "did not end within --timeout seconds (the run itself goes on)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", metavar="NAME", help="The workflow to run.")
        parser.add_argument("--payload", default="{}", metavar="JSON", help="The run's input, a JSON object.")
        parser.add_argument(
            "--idempotency-key",
            metavar="KEY",
            help="A key already used for this workflow returns that run instead of starting another.",
        )
        parser.add_argument(
            "--priority",
            type=int,
            metavar="0-9",
            help="Its tasks go before those of runs with a lower one in every line (default 5).",
        )
        parser.add_argument("--wait", action="store_true", help="Wait for the run to end, printing progress.")
        parser.add_argument(
            "--timeout",
            type=float,
            default=300.0,
            metavar="SECONDS",
            help="With --wait: give up waiting after this long (default 300).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not options["timeout"] > 0:
            raise CommandError("--timeout must be a positive number of seconds")
        try:
            payload = json.loads(options["payload"])
        except json.JSONDecodeError as exc:
            raise CommandError(f"--payload is not valid JSON: {exc}") from None
        workflow = selectors.workflow_get(name=options["name"])
        if workflow is None:
            raise CommandError(f"unknown workflow '{options['name']}'")
        try:
            run, created = engine.workflow_run_start(
                workflow=workflow,
                payload=payload,
                idempotency_key=options["idempotency_key"] or None,
                source="command",
                priority=options["priority"],
            )
        except engine.EngineError as exc:
            raise CommandError(str(exc)) from None
        self._stdout_gone = False
        self._say(str(run.trace_id))
        if not created:
            self.stderr.write(f"idempotency key already used: this is the existing run, started {run.created_at}")
        if options["wait"]:
            self._wait(run, timeout=options["timeout"])

    def _wait(self, run: WorkflowRun, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_progress = ""
        try:
            while True:
                run = selectors.run_get(trace_id=str(run.trace_id)) or run
                tasks = selectors.run_tasks(run=run)
                finished = sum(1 for t in tasks if t.status in TaskRun.FINAL)
                progress = f"{finished}/{len(tasks)} tasks finished"
                waiting = [t for t in tasks if t.status == TaskRun.Status.DEFERRED]
                if waiting:
                    graph = engine.graph_for_version(run.version_id)
                    progress += "; " + "; ".join(
                        f"{t.node_key} waits for {waiting_for(t, graph.nodes[t.node_key].kind)}" for t in waiting
                    )
                if progress != last_progress:
                    self._say(progress)
                    last_progress = progress
                if run.is_final:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CommandError(
                        f"run {run.trace_id} still {run.status} after {timeout:g}s; it goes on "
                        f"(follow it with: manage.py workflow_status {run.trace_id})",
                        returncode=1,
                    )
                time.sleep(min(POLL_INTERVAL, remaining))
        except KeyboardInterrupt:
            raise CommandError(f"stopped waiting; run {run.trace_id} goes on", returncode=1) from None
        self._say(run.status)
        if run.status != WorkflowRun.Status.SUCCESS:
            for task in tasks:
                if task.status in (TaskRun.Status.FAILURE, TaskRun.Status.UPSTREAM_FAILED):
                    error = error_summary(task.error)
                    name = task.node_key if task.map_index is None else f"{task.node_key}[{task.map_index}]"
                    self.stderr.write(f"  {name}: {task.status}{': ' + error if error else ''}")
            raise CommandError(f"run {run.trace_id} ended {run.status}", returncode=1)

    def _say(self, line: str) -> None:
        """Write a line at once: a script reading the trace_id through a pipe must not wait for the run."""
        if self._stdout_gone:
            return
        try:
            self.stdout.write(line)
            self.stdout.flush()
        except BrokenPipeError:
            # The reader went away (e.g. `| head -1` to take the trace_id): keep waiting quietly,
            # the exit status still tells the outcome; devnull spares the exit-time flush an error.
            self._stdout_gone = True
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
