"""manage.py run_workers: one Celery worker per event-type queue (plus the engine's queue), supervised."""

from __future__ import annotations

import logging
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from events_app.models import EventType, queue_name_validator

logger = logging.getLogger(__name__)

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def engine_queue() -> str:
    """The queue of the engine's own maintenance tasks (Celery's default queue)."""
    return getattr(settings, "CELERY_TASK_DEFAULT_QUEUE", None) or "celery"


def worker_plan(*, queues: list[str] | None = None, concurrency: int | None = None) -> dict[str, int]:
    """Queue name -> worker processes: every event type at its concurrency, plus the engine's queue.

    With `queues`, exactly those (in that order); a name with no EventType row is still served, with
    one process, so a worker can be started before the first workflow that uses the type is imported.
    """
    types = dict(EventType.objects.order_by("name").values_list("name", "concurrency"))
    if queues is None:
        plan = {engine_queue(): 1, **types}
    else:
        plan = {queue: types.get(queue, 1) for queue in queues}
    if concurrency is not None:
        plan = dict.fromkeys(plan, concurrency)
    return plan


def worker_command(
    *, queue: str, concurrency: int, loglevel: str = "INFO", node: str | None = None, options: tuple[str, ...] = ()
) -> list[str]:
    """The command line of the worker serving one queue (named `node`, default the queue's name)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "config",
        "worker",
        "-Q",
        queue,
        "-c",
        str(concurrency),
        "-n",
        f"{node or queue}@%h",
        # One message at a time and fair scheduling: a worker never holds a task another idle
        # process could start, so the engine's first-in first-out admission order is kept.
        "--prefetch-multiplier",
        "1",
        "-O",
        "fair",
        *options,
        "-l",
        loglevel,
    ]


@dataclass
class _Child:
    name: str
    argv: list[str]
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float = 0.0


class Supervisor:
    """Runs one process per name; restarts one that dies, with backoff; passes stop signals on to all.

    Children get their own process group so that a Ctrl-C in a terminal reaches them once, through
    here, rather than twice (which Celery would take as a request for an immediate cold shutdown).
    """

    def __init__(
        self,
        commands: dict[str, list[str]],
        *,
        cwd: str | Path | None = None,
        poll_interval: float = 0.2,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        stable_after: float = 60.0,
    ):
        self.children = [_Child(name=name, argv=argv) for name, argv in commands.items()]
        self.cwd = cwd
        self.poll_interval = poll_interval
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.stable_after = stable_after
        self.stopping = False
        self._pending: list[int] = []

    def run(self) -> None:
        """Supervise until a stop signal arrives and every child has exited."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in FORWARDED_SIGNALS}
        try:
            for child in self.children:
                self._start(child)
            while True:
                self._forward_pending()
                if self.stopping:
                    if all(not self._alive(child) for child in self.children):
                        break
                else:
                    self._reap_and_restart()
                time.sleep(self.poll_interval)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        for child in self.children:
            if child.process is not None:
                logger.info("worker %s stopped (exit code %s)", child.name, child.process.returncode)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only record it: forwarding happens in the loop, so a child being started at this very
        # moment is not missed and no child gets the same signal twice.
        self.stopping = True
        self._pending.append(signum)

    def _forward_pending(self) -> None:
        while self._pending:
            signum = self._pending.pop(0)
            logger.info("received %s: passing it on to %d worker(s)", signal.Signals(signum).name, len(self.children))
            for child in self.children:
                if self._alive(child):
                    child.process.send_signal(signum)

    @staticmethod
    def _alive(child: _Child) -> bool:
        return child.process is not None and child.process.poll() is None

    def _start(self, child: _Child) -> None:
        child.started_at = time.monotonic()
        try:
            child.process = subprocess.Popen(child.argv, cwd=self.cwd, process_group=0)
        except OSError as exc:
            child.process = None
            self._schedule_restart(child, f"could not start: {exc}")
            return
        logger.info("worker %s started (pid %s): %s", child.name, child.process.pid, shlex.join(child.argv))

    def _reap_and_restart(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.process is not None:
                code = child.process.poll()
                if code is None:
                    continue
                child.process = None
                self._schedule_restart(child, f"exited unexpectedly with code {code}")
            elif now >= child.restart_at:
                self._start(child)

    def _schedule_restart(self, child: _Child, reason: str) -> None:
        now = time.monotonic()
        # A child that ran a while before dying starts over at the short delay; one that keeps
        # dying at once (bad broker URL, import error) backs off so it does not spin.
        if now - child.started_at >= self.stable_after:
            child.failures = 0
        delay = min(self.max_backoff, self.backoff * 2**child.failures)
        child.failures += 1
        child.restart_at = now + delay
        logger.error("worker %s %s; restarting in %.1fs", child.name, reason, delay)


def _queue_list(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


class Command(BaseCommand):
    help = (
        "Start one Celery worker per event-type queue (each with -c set to the type's concurrency), plus "
        "one for the engine's own queue 'celery', and supervise them: a worker that dies is restarted, "
        "SIGTERM/SIGINT are passed on to all. -c only bounds each worker process's pool: the cluster-wide "
        "limit of an event type, over every worker and host, is enforced by the engine's admission "
        "control, so running several copies of this command (on several hosts) stays within it. A type's "
        "concurrency raised above its worker's processes uses the extra slots once the worker is restarted "
        "(or started with a larger --concurrency)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "-Q",
            "--queues",
            action="append",
            type=_queue_list,
            metavar="QUEUE[,QUEUE...]",
            help="Serve only these queues (repeatable). 'celery' is served only when listed here; "
            "without -Q every event type and 'celery' are served.",
        )
        parser.add_argument(
            "--concurrency",
            type=int,
            metavar="N",
            help="Processes per worker, instead of each event type's concurrency.",
        )
        parser.add_argument(
            "--loglevel", "-l", default="INFO", type=str.upper, choices=LOG_LEVELS, help="The workers' log level."
        )
        parser.add_argument("--dry-run", action="store_true", help="Print the worker command lines and exit.")

    def handle(self, *args: Any, **options: Any) -> None:
        queues = None
        if options["queues"] is not None:
            queues = list(dict.fromkeys(name for group in options["queues"] for name in group))
            if not queues:
                raise CommandError("-Q needs at least one queue name")
            for name in queues:
                try:
                    queue_name_validator(name)
                except ValidationError:
                    raise CommandError(f"bad queue name '{name}': use letters, digits, '.', '_' or '-'") from None
        concurrency = options["concurrency"]
        if concurrency is not None and concurrency < 1:
            raise CommandError("--concurrency must be at least 1")
        plan = worker_plan(queues=queues, concurrency=concurrency)
        if not plan:
            raise CommandError("no queue to serve")
        commands = {
            queue: worker_command(queue=queue, concurrency=processes, loglevel=options["loglevel"])
            for queue, processes in plan.items()
        }
        if options["dry_run"]:
            for argv in commands.values():
                self.stdout.write(shlex.join(argv))
            return
        # The children inherit this environment (DJANGO_SETTINGS_MODULE included) and run from the
        # project directory so that `-A config` imports this project's Celery app.
        Supervisor(commands, cwd=settings.BASE_DIR).run()
