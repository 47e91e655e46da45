"""manage.py demo: the quickstart on embedded defaults: database, an example workflow, workers, web server, runs."""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import OperationalError, close_old_connections
from django.db.models import Count, Q
from django.test import Client
from django.urls import reverse
from kombu.exceptions import OperationalError as BrokerError
from kombu.utils.url import maybe_sanitize_url

from workflows_app import engine
from workflows_app.definitions import DefinitionError, workflow_definition_save
from workflows_app.models import TaskRun, WorkflowDefinition, WorkflowRun

from ._helpers import definitions_load, error_summary, table_format
from .run_workers import worker_command, worker_plan

ADMIN_USERNAME = "demo"  # its own superuser, so a real admin account is never touched
DEFAULT_WORKFLOW = "product_pipeline"
# An example's name is its file's stem in examples/: a slug, so it cannot name a path elsewhere.
EXAMPLE_NAME = re.compile(r"^[-a-zA-Z0-9_]{1,100}$")
# Seconds between two reads of the demo's runs: live enough for a terminal, and two grouped
# counts per read cost the database next to nothing.
POLL_INTERVAL = 0.2
# Starting eight Django processes at once on a small machine takes a while; a worker that
# crashes is noticed at once anyway, since its process exits.
READY_TIMEOUT = 120.0
# Celery's warm shutdown lets running tasks finish; the demo's tasks take well under a second,
# so a child still alive after this is stuck and gets SIGKILL.
STOP_GRACE = 15.0
BAR_WIDTH = 30


@dataclass
class Child:
    """A process the demo started, in its own process group, writing to its own log file."""

    name: str
    process: subprocess.Popen
    log_path: Path
    log_file: IO[bytes] = field(repr=False)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# No proxies: an http_proxy in the user's environment must not carry a request for 127.0.0.1 away.
_local_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_answers(url: str) -> bool:
    """True once anything answers HTTP at `url`, whatever the status (a redirect to login counts)."""
    try:
        with _local_opener.open(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def worker_ready(log: bytes, node: str) -> bool:
    """Whether a worker's log has Celery's `<node>@<host> ready.` line, written once it consumes."""
    return re.search(rb"^" + re.escape(node.encode()) + rb"@\S+ ready\.$", log, re.MULTILINE) is not None


def progress_line(*, task_counts: dict[str, int], run_counts: dict[str, int]) -> str:
    """`[#####-----] 21/35 tasks (2 running, 3 queued)  runs: 1 SUCCESS, 2 RUNNING`."""
    total = sum(task_counts.values())
    done = sum(n for status, n in task_counts.items() if status in TaskRun.FINAL)
    running = task_counts.get(TaskRun.Status.STARTED, 0) + task_counts.get(TaskRun.Status.RETRY, 0)
    queued = task_counts.get(TaskRun.Status.QUEUED, 0)
    filled = round(BAR_WIDTH * done / total) if total else 0
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    runs = ", ".join(f"{run_counts[s]} {s}" for s in WorkflowRun.Status.values if run_counts.get(s))
    return f"[{bar}] {done}/{total} tasks ({running} running, {queued} queued)  runs: {runs}"


def examples_dir() -> Path:
    return Path(settings.BASE_DIR) / "examples"


def example_path(name: str) -> Path:
    """examples/NAME.yaml, or a CommandError naming the examples there are."""
    path = examples_dir() / f"{name}.yaml"
    if not EXAMPLE_NAME.match(name) or not path.is_file():
        known = ", ".join(sorted(p.stem for p in examples_dir().glob("*.yaml"))) or "none"
        raise CommandError(f"no example workflow {name!r} (examples/{name}.yaml); the examples: {known}")
    return path


def node_outcomes_table(*, workflow: WorkflowDefinition, trace_ids: list[str]) -> str:
    """One line per node of the workflow, in definition order: how its tasks ended across the runs, a
    mapped node's instances per run and how they ended, and why a node did not succeed (from one run)."""
    runs = len(trace_ids)
    ended: dict[str, list[str]] = {}
    instances: dict[str, list[str]] = {}
    per_run: dict[str, int] = {}
    rows = (
        TaskRun.objects.filter(run_id__in=trace_ids)
        .order_by()
        .values("node_key", "status")
        .annotate(
            own=Count("pk", filter=Q(map_index__isnull=True)), mapped=Count("pk", filter=Q(map_index__isnull=False))
        )
    )
    for row in rows:
        key, status = row["node_key"], row["status"]
        if row["own"]:
            ended.setdefault(key, []).append(f"{row['own']} {status}")
        if row["mapped"]:
            instances.setdefault(key, []).append(f"{row['mapped']} {status}")
            per_run[key] = per_run.get(key, 0) + row["mapped"]
    why = dict(
        TaskRun.objects.filter(run_id__in=trace_ids, map_index__isnull=True)
        .exclude(status=TaskRun.Status.SUCCESS)
        .exclude(error="")
        .order_by("node_key", "run_id")
        .distinct("node_key")
        .values_list("node_key", "error")
    )
    keys = list(workflow.nodes.order_by("id").values_list("key", flat=True))
    table = []
    for key in keys:
        mapped = f"{per_run[key] / runs:g} per run: {', '.join(sorted(instances[key]))}" if key in instances else "-"
        table.append([key, ", ".join(sorted(ended.get(key, []))) or "-", mapped, error_summary(why.get(key, ""))])
    return f"Nodes of the {runs} run{'s' if runs > 1 else ''}:\n" + table_format(
        ["node", "ended", "mapped instances", "why not SUCCESS"], table
    )


class Command(BaseCommand):
    help = (
        "The quickstart: migrate the database (a PostgreSQL embedded under var/pgdata unless DATABASE_URL "
        "is set), load an example workflow (examples/product_pipeline.yaml unless --workflow names "
        "another), create the admin user, start one Celery worker per event-type queue on the broker (an "
        "embedded file broker under var/broker unless CELERY_BROKER_URL is set) "
        "and the web server, trigger a few runs and show their progress. Without --no-serve it keeps "
        "serving until Ctrl-C; with --no-serve it exits when the runs end, 0 only if all succeeded."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--runs", type=int, default=3, metavar="N", help="Runs to trigger (default 3).")
        parser.add_argument(
            "--workflow",
            default=DEFAULT_WORKFLOW,
            metavar="NAME",
            help=(
                f"The example to load and run: examples/NAME.yaml (default {DEFAULT_WORKFLOW}; "
                "product_pipeline_v2 adds a moderation branch and one upload per image)."
            ),
        )
        parser.add_argument("--port", type=int, default=8000, help="Port of the web server (default 8000).")
        parser.add_argument(
            "--no-serve",
            action="store_true",
            help="Start no web server; exit when the runs end (status 0 only if all succeeded).",
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=180.0,
            metavar="SECONDS",
            help="Give up waiting for the runs after this long (default 180).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        runs, port, serve, timeout = options["runs"], options["port"], not options["no_serve"], options["timeout"]
        if runs < 1:
            raise CommandError("--runs must be at least 1")
        if not 0 < port < 65536:
            raise CommandError("--port must be between 1 and 65535")
        if not timeout > 0:
            raise CommandError("--timeout must be a positive number of seconds")
        example = example_path(options["workflow"])
        # Checked first, so a busy port fails in a second rather than after the workers started.
        if serve and not _port_free(port):
            raise CommandError(f"port {port} on 127.0.0.1 is in use: pass --port with a free one")
        self.base_url = f"http://127.0.0.1:{port}"
        self.children: list[Child] = []
        previous_sigterm = self._sigterm_as_interrupt()
        interrupted = False
        try:
            self._run(example=example, runs=runs, serve=serve, timeout=timeout)
        except KeyboardInterrupt:
            interrupted = True
            self._say("\nStopping ...")
        finally:
            self._stop_children()
            if previous_sigterm is not None:
                signal.signal(signal.SIGTERM, previous_sigterm)
        # Ctrl-C is how a serving demo ends; a --no-serve demo cut short has not shown its runs' outcome.
        if interrupted and not serve:
            raise CommandError("interrupted before the runs ended", returncode=130)

    # ------------------------------------------------------------------ the steps

    def _run(self, *, example: Path, runs: int, serve: bool, timeout: float) -> None:
        self._say("Eventflow demo")
        self._prepare_storage()
        self._say("Migrating the database ...")
        try:
            call_command("migrate", interactive=False, verbosity=0)
        except OperationalError as exc:
            raise CommandError(f"cannot use the database: {exc}") from None
        self._check_broker()
        workflow = self._load_example(example)
        password = self._admin_reset()
        self._say(f"Admin login: user {ADMIN_USERNAME!r}, password {password!r}  ({self.base_url}/admin/)")
        self._start_workers()
        if serve:
            self._start_web()
        trace_ids = self._trigger(workflow, runs)
        finished = self._follow(trace_ids, timeout=timeout)
        succeeded = self._report(trace_ids)
        self._report_nodes(workflow, trace_ids)
        pages_ok = self._check_pages(trace_ids)
        if not serve:
            if not finished:
                raise CommandError(f"the runs did not end within {timeout:g}s", returncode=1)
            if not succeeded:
                raise CommandError("not every run succeeded", returncode=1)
            if not pages_ok:
                raise CommandError("a status page did not answer 200", returncode=1)
            self._say(f"All runs succeeded. To browse them: python manage.py runserver {self.base_url[7:]}")
            return
        self._say(
            f"\nServing {self.base_url}/  (runs: {self.base_url}/runs/, queues: {self.base_url}/queues/, "
            f"admin: {self.base_url}/admin/ as {ADMIN_USERNAME!r} / {password!r})\nPress Ctrl-C to stop."
        )
        while True:
            self._check_children()
            time.sleep(0.5)

    def _prepare_storage(self) -> None:
        db = settings.DATABASES["default"]
        if not os.environ.get("DATABASE_URL"):
            self._say(f"  database  PostgreSQL embedded, files under {db['HOST']} (no server needed)")
        else:
            where = f"{db.get('HOST') or 'localhost'}{':' + str(db['PORT']) if db.get('PORT') else ''}"
            self._say(f"  database  PostgreSQL {where}/{db.get('NAME')}")
        broker = settings.CELERY_BROKER_URL
        if self._embedded_broker():
            # The file transport expects its folders to exist: it writes messages into them
            # without creating them.
            options = settings.CELERY_BROKER_TRANSPORT_OPTIONS
            folders = {options.get(k) for k in ("data_folder_in", "data_folder_out", "control_folder")}
            if options.get("store_processed"):
                folders.add(options.get("processed_folder"))
            for folder in filter(None, folders):
                Path(folder).mkdir(parents=True, exist_ok=True)
            where = Path(options.get("data_folder_in", ".")).parent
            self._say(f"  broker    embedded, files under {where} (no server needed)")
        else:
            self._say(f"  broker    {maybe_sanitize_url(broker)}")

    @staticmethod
    def _check_broker() -> None:
        """Fail in a second on an unreachable broker, rather than with workers that never get ready."""
        from config.celery import app

        try:
            with app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=2, interval_start=0.2, interval_step=0.2)
        except (BrokerError, OSError) as exc:
            url = maybe_sanitize_url(settings.CELERY_BROKER_URL)
            raise CommandError(f"cannot reach the broker {url}: {exc}") from None

    @staticmethod
    def _embedded_broker() -> bool:
        return settings.CELERY_BROKER_URL.startswith("filesystem://")

    def _load_example(self, path: Path) -> WorkflowDefinition:
        workflow = None
        for data in definitions_load(str(path)):
            try:
                workflow = workflow_definition_save(data=data)
            except DefinitionError as exc:
                raise CommandError(f"{path}: {exc}") from None
        if workflow is None:
            raise CommandError(f"{path}: holds no workflow definition")
        self._say(
            f"Loaded workflow {workflow.name!r} (version {workflow.version}: "
            f"{workflow.nodes.count()} nodes, {workflow.edges.count()} edges) from {path.name}"
        )
        return workflow

    def _admin_reset(self) -> str:
        """Create the demo superuser, or give it a new password; returns the password."""
        password = secrets.token_urlsafe(12)
        user_model = get_user_model()
        user = user_model.objects.filter(**{user_model.USERNAME_FIELD: ADMIN_USERNAME}).first()
        if user is None:
            user_model.objects.create_superuser(ADMIN_USERNAME, email="admin@example.com", password=password)
        else:
            user.is_active = user.is_staff = user.is_superuser = True
            user.set_password(password)
            user.save()
        return password

    # ------------------------------------------------------------------ children

    def _log_dir(self) -> Path:
        path = Path(getattr(settings, "VAR_DIR", Path(settings.BASE_DIR) / "var")) / "log" / "demo"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _spawn(self, name: str, argv: list[str]) -> Child:
        log_path = self._log_dir() / f"{name}.log"
        log_file = open(log_path, "wb")  # noqa: SIM115 - closed in _stop_children
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # A session of its own: a Ctrl-C in the terminal reaches the children once, through
        # here, rather than twice (which Celery takes as a request for an immediate cold shutdown).
        process = subprocess.Popen(
            argv,
            cwd=settings.BASE_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        child = Child(name=name, process=process, log_path=log_path, log_file=log_file)
        self.children.append(child)
        return child

    def _start_workers(self) -> None:
        plan = worker_plan()
        self._say(f"Starting {len(plan)} workers, one per queue (logs in {self._log_dir()}):")
        started = time.monotonic()
        for i, (queue, concurrency) in enumerate(plan.items()):
            argv = worker_command(
                queue=queue,
                concurrency=concurrency,
                node=self._node(queue),
                # Threads, not prefork: the demo's tasks sleep or echo, so threads run them just as
                # well, and a thread pool keeps it to one process per queue (8, not 29) on a laptop
                # or a 2-core CI runner, each process being a full Django import. The engine's
                # admission control, not the pool, bounds each type's parallelism anyway.
                # Per-node timeouts need prefork (threads cannot be killed): none in this pipeline.
                # Mingle, gossip and heartbeats are worker-to-worker chatter the demo does not
                # use; on the file broker they only add start-up delay and files to poll.
                options=("--pool", "threads", "--without-mingle", "--without-gossip", "--without-heartbeat"),
            )
            self._spawn(f"worker-{queue}", argv)
            self._say(f"  {queue:<24} {concurrency} thread{'s' if concurrency > 1 else ''}")
            if i == 0:
                # The file broker creates an exchange's file unlocked, then writes it: a worker
                # binding the same exchange (every worker binds the remote-control one) in between
                # reads an empty file and dies. Once the first worker is ready, those files exist,
                # and the others bind under the file's lock.
                self._wait_ready([(self.children[-1], self._node(queue))])
        # The file broker has no remote control to ping, so readiness is the worker's own
        # "<name> ready." log line, which Celery writes once it consumes its queue.
        self._wait_ready([(w, self._node(q)) for w, q in zip(self.children, plan, strict=True)])
        self._say(f"Workers ready in {time.monotonic() - started:.1f}s")

    def _wait_ready(self, workers: list[tuple[Child, str]]) -> None:
        self._wait_for(
            lambda: all(worker_ready(w.log_path.read_bytes(), node) for w, node in workers),
            timeout=READY_TIMEOUT,
            what="the workers to be ready",
        )

    @staticmethod
    def _node(queue: str) -> str:
        return f"demo-{queue}"

    def _start_web(self) -> None:
        port = self.base_url.rsplit(":", 1)[1]
        manage = str(Path(settings.BASE_DIR) / "manage.py")
        # --noreload: the autoreloader would run the server in a grandchild, out of our reach.
        # --insecure: static files (the admin's styles) are served even with DEBUG=False; the
        # server only listens on 127.0.0.1.
        argv = [sys.executable, manage, "runserver", f"127.0.0.1:{port}", "--noreload", "--insecure"]
        web = self._spawn("web", argv)
        self._wait_for(
            lambda: _http_answers(f"{self.base_url}/admin/login/"), timeout=READY_TIMEOUT, what="the web server"
        )
        self._say(f"Web server on {self.base_url}/ (log: {web.log_path})")

    def _wait_for(self, condition: Callable[[], bool], *, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            self._check_children()
            if time.monotonic() > deadline:
                raise CommandError(f"timed out after {timeout:g}s waiting for {what}; logs in {self._log_dir()}")
            time.sleep(0.1)

    def _check_children(self) -> None:
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                raise CommandError(
                    f"{child.name} exited with code {code}; the end of {child.log_path}:\n{child.log_tail()}"
                )

    def _stop_children(self) -> None:
        """SIGTERM every child's process group, wait, SIGKILL what is left after STOP_GRACE seconds."""
        running = [c for c in self.children if c.alive()]
        for child in running:
            # Only a child not yet reaped: its pid, hence its group id, cannot have been reused.
            try:
                os.killpg(child.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_GRACE
        try:
            while any(c.alive() for c in running) and time.monotonic() < deadline:
                time.sleep(0.1)
        except KeyboardInterrupt:
            pass  # a second Ctrl-C: no more waiting
        for child in running:
            if child.alive():
                try:
                    os.killpg(child.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                child.process.wait()
        for child in self.children:
            child.log_file.close()
        if running:
            self._say(f"Stopped {len(running)} child process(es).")

    @staticmethod
    def _sigterm_as_interrupt() -> Any:
        """Handle SIGTERM like Ctrl-C, so `kill` also stops the children; returns the old handler."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def interrupt(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        return signal.signal(signal.SIGTERM, interrupt)

    # ------------------------------------------------------------------ runs

    def _run_url(self, trace_id: str) -> str:
        return f"{self.base_url}{reverse('workflows_app:run-detail', args=[trace_id])}"

    def _trigger(self, workflow: WorkflowDefinition, runs: int) -> list[str]:
        trace_ids = []
        for number in range(1, runs + 1):
            run, _ = engine.workflow_run_start(
                workflow=workflow, payload={"product": f"demo-product-{number}"}, source="demo"
            )
            trace_ids.append(str(run.trace_id))
        self._say(f"Triggered {runs} run{'s' if runs > 1 else ''} of {workflow.name}; status pages:")
        for trace_id in trace_ids:
            self._say(f"  {self._run_url(trace_id)}")
        return trace_ids

    def _follow(self, trace_ids: list[str], *, timeout: float) -> bool:
        """Print a progress line whenever it changes; True once every run is final, False on timeout."""
        started = time.monotonic()
        deadline = started + timeout
        last = ""
        while True:
            close_old_connections()
            task_counts = dict(
                TaskRun.objects.filter(run_id__in=trace_ids)
                .order_by()
                .values_list("status")
                .annotate(n=Count("pk"))
                .values_list("status", "n")
            )
            run_counts = dict(
                WorkflowRun.objects.filter(trace_id__in=trace_ids)
                .order_by()
                .values_list("status")
                .annotate(n=Count("pk"))
                .values_list("status", "n")
            )
            line = progress_line(task_counts=task_counts, run_counts=run_counts)
            if line != last:
                self._say(f"{time.monotonic() - started:6.1f}s {line}")
                last = line
            if not run_counts.get(WorkflowRun.Status.RUNNING):
                return True
            if time.monotonic() > deadline:
                self.stderr.write(f"timed out after {timeout:g}s with runs still RUNNING; logs in {self._log_dir()}")
                return False
            self._check_children()
            time.sleep(POLL_INTERVAL)

    def _report(self, trace_ids: list[str]) -> bool:
        """A table of the runs and the errors of failed tasks; True when every run succeeded."""
        runs = {str(r.trace_id): r for r in WorkflowRun.objects.filter(trace_id__in=trace_ids)}
        rows = []
        for trace_id in trace_ids:
            run = runs[trace_id]
            took = f"{(run.finished_at - run.created_at).total_seconds():.1f}s" if run.finished_at else "-"
            rows.append([trace_id, run.status, took, self._run_url(trace_id)])
        self._say("\n" + table_format(["trace_id", "status", "took", "status page"], rows))
        failed = TaskRun.objects.filter(
            run_id__in=trace_ids, status__in=[TaskRun.Status.FAILURE, TaskRun.Status.UPSTREAM_FAILED]
        )
        for task in sorted(failed, key=lambda t: (trace_ids.index(str(t.run_id)), t.node_key)):
            summary = error_summary(task.error)
            self.stderr.write(f"  {task.run_id} {task.node_key}: {task.status}{': ' + summary if summary else ''}")
        return all(r.status == WorkflowRun.Status.SUCCESS for r in runs.values())

    def _report_nodes(self, workflow: WorkflowDefinition, trace_ids: list[str]) -> None:
        """How each node ended across the runs: a mapped node's instances, and the nodes skipped."""
        close_old_connections()
        self._say("\n" + node_outcomes_table(workflow=workflow, trace_ids=trace_ids))

    def _check_pages(self, trace_ids: list[str]) -> bool:
        """Render each status page in-process as the admin, proving it answers without a server."""
        admin = get_user_model().objects.get(**{get_user_model().USERNAME_FIELD: ADMIN_USERNAME})
        client = Client(raise_request_exception=False)
        client.force_login(admin)
        host = self.base_url.removeprefix("http://")
        ok = True
        for trace_id in trace_ids:
            path = reverse("workflows_app:run-detail", args=[trace_id])
            status = client.get(path, HTTP_HOST=host).status_code
            ok = ok and status == 200
            self._say(f"GET {path} as {ADMIN_USERNAME} -> {status}")
        return ok

    def _say(self, line: str) -> None:
        self.stdout.write(line)
        self.stdout.flush()
