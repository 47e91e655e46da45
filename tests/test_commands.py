"""The manage.py commands, called as a user would, and docker-compose.yml checked against the project."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from django.conf import settings
from django.core.management import CommandError, call_command, get_commands

from events_app.models import EventType
from tests import factories
from tests.e2e import wait_for
from workflows_app import engine
from workflows_app.definitions import definition_spec
from workflows_app.management.commands import trigger_workflow
from workflows_app.models import Edge, Node, TaskRun, WorkflowDefinition, WorkflowRun, WorkflowVersion

ROOT = Path(settings.BASE_DIR)
EXAMPLE = ROOT / "examples" / "product_pipeline.yaml"
ECHO = "workflows_app.tasks.echo"
FAIL = "workflows_app.tasks.fail"


def run_command(name: str, *args: str) -> str:
    out = io.StringIO()
    call_command(name, *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def counts() -> dict[str, int]:
    return {
        model.__name__: model.objects.count()
        for model in (WorkflowDefinition, Node, Edge, WorkflowVersion, EventType, WorkflowRun)
    }


def play(run: WorkflowRun, *, fail: set[str] = frozenset()) -> None:
    """What workers would do between two polls: start and finish every task handed to Celery."""
    for task in TaskRun.objects.filter(run=run, status=TaskRun.Status.QUEUED, holds_slot=True):
        event = task.current_event
        assert engine.task_run_start(event_id=str(event.event_id), attempt=event.context["attempt"])
        engine.task_run_finish(
            trace_id=str(run.trace_id),
            event_id=str(event.event_id),
            succeeded=task.node_key not in fail,
            result={"node": task.node_key},
            error="Traceback (most recent call last):\n  ...\nRuntimeError: boom",
        )


# --------------------------------------------------------------------------- import_workflows


@pytest.mark.django_db
def test_import_the_example_pipeline():
    out = run_command("import_workflows", str(EXAMPLE))

    assert out.strip() == "imported product_pipeline (version 1)"
    workflow = WorkflowDefinition.objects.get(name="product_pipeline")
    assert workflow.nodes.count() == 7 and workflow.edges.count() == 8
    assert EventType.objects.get(name="product_listing").concurrency == 5
    assert EventType.objects.get(name="product_image").concurrency == 2


@pytest.mark.django_db
def test_importing_an_unchanged_definition_keeps_its_version():
    run_command("import_workflows", str(EXAMPLE))
    out = run_command("import_workflows", str(EXAMPLE))

    assert out.strip() == "imported product_pipeline (version 1)"
    assert WorkflowVersion.objects.filter(workflow__name="product_pipeline").count() == 1


@pytest.mark.django_db
def test_import_the_grown_example_with_its_condition_and_its_mapped_uploads():
    out = run_command("import_workflows", str(ROOT / "examples" / "product_pipeline_v2.yaml"))

    assert out.strip() == "imported product_pipeline_v2 (version 1)"
    workflow = WorkflowDefinition.objects.get(name="product_pipeline_v2")
    conditions = {(e.source.key, e.target.key): e.when for e in workflow.edges.select_related("source", "target")}
    assert len(conditions) == 11
    assert conditions[("moderate", "upload_1688")] == '!("1688" in result.payload.barred)'
    assert conditions[("moderate", "upload_ali")] == '!("ali" in result.payload.barred)'
    spec = definition_spec(workflow)
    assert {n["key"]: n["map_over"] for n in spec["nodes"] if "map_over" in n} == {
        "upload_ali": "upstream.image.payload.images",
        "upload_1688": "upstream.image.payload.images",
    }
    # Each node on an event type of its own, as in the first pipeline.
    assert workflow.nodes.values("event_type").distinct().count() == workflow.nodes.count() == 8
    assert EventType.objects.get(name="product_moderate").concurrency == 2


@pytest.mark.django_db
def test_import_of_a_cycle_names_it_and_writes_nothing(tmp_path):
    # a -> b -> c -> a
    path = write(
        tmp_path / "cycle.yaml",
        yaml.safe_dump(
            factories.spec("loop", [(k, ECHO) for k in "abc"], [["a", "b"], ["b", "c"], ["c", "a"]], event_type="q_new")
        ),
    )
    before = counts()

    with pytest.raises(CommandError) as error:
        run_command("import_workflows", path)

    message = str(error.value)
    assert "cycle.yaml" in message
    cycle = re.search(r"cycle: (.+)", message).group(1).split(" -> ")
    assert sorted(cycle[:-1]) == ["a", "b", "c"] and cycle[0] == cycle[-1]
    assert counts() == before


@pytest.mark.django_db
def test_one_invalid_file_among_valid_ones_writes_nothing_and_lists_every_problem(tmp_path):
    good = write(tmp_path / "good.yaml", EXAMPLE.read_text())
    bad = write(
        tmp_path / "bad.json",
        json.dumps(
            factories.spec(
                "broken",
                [("a", "no.such.task"), ("b", ECHO)],
                [["a", "ghost"]],
                event_type="q_bad",
            )
        ),
    )
    before = counts()

    with pytest.raises(CommandError) as error:
        run_command("import_workflows", good, bad)

    message = str(error.value)
    assert "bad.json" in message and "good.yaml" not in message
    assert "unknown task 'no.such.task'" in message
    assert "unknown node 'ghost'" in message
    assert counts() == before
    assert not EventType.objects.filter(name__startswith="product_").exists()


@pytest.mark.django_db
def test_import_reads_lists_and_multi_document_streams(tmp_path):
    stream = write(
        tmp_path / "two.yml",
        yaml.safe_dump(factories.spec("first")) + "---\n" + yaml.safe_dump(factories.spec("second")),
    )
    listed = write(tmp_path / "list.json", json.dumps([factories.spec("third"), factories.spec("fourth")]))

    out = run_command("import_workflows", stream, listed)

    assert out.splitlines() == [f"imported {name} (version 1)" for name in ("first", "second", "third", "fourth")]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("filename", "text", "expected"),
    [
        ("broken.yaml", "name: x\nnodes: [\n  - key: a\n", "invalid YAML"),
        ("broken.json", '{"name": "x", "nodes": [}', "invalid JSON"),
        ("dated.yaml", "name: x\ndescription: ok\nnodes:\n  - {key: a, task: t, params: {on: 2024-01-01}}\n", "JSON"),
        ("empty.yaml", "# nothing here\n", "holds no workflow definition"),
        ("notes.txt", "name: x\n", "unsupported file type"),
    ],
)
def test_unreadable_files_are_refused_with_their_name(tmp_path, filename, text, expected):
    path = write(tmp_path / filename, text)

    with pytest.raises(CommandError, match=expected) as error:
        run_command("import_workflows", path)

    assert filename in str(error.value)
    assert not WorkflowDefinition.objects.exists()


@pytest.mark.django_db
def test_import_of_a_missing_file_is_a_command_error(tmp_path):
    with pytest.raises(CommandError, match="cannot read"):
        run_command("import_workflows", str(tmp_path / "missing.yaml"))


@pytest.mark.django_db
def test_a_workflow_defined_twice_in_one_import_is_refused(tmp_path):
    one = write(tmp_path / "one.yaml", yaml.safe_dump(factories.spec("same")))
    two = write(tmp_path / "two.yaml", yaml.safe_dump(factories.spec("same")))

    with pytest.raises(CommandError, match="also defined in"):
        run_command("import_workflows", one, two)

    assert not WorkflowDefinition.objects.exists()


# --------------------------------------------------------------------------- export_workflows


@pytest.mark.django_db
@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_export_then_import_gives_the_same_definition_back(tmp_path, fmt):
    run_command("import_workflows", str(EXAMPLE))
    exported = run_command("export_workflows", "product_pipeline", "--format", fmt)
    path = write(tmp_path / f"pipeline.{fmt}", exported)

    # Importing its own export changes nothing, not even the version.
    assert run_command("import_workflows", path).strip() == "imported product_pipeline (version 1)"
    assert WorkflowVersion.objects.count() == 1

    WorkflowDefinition.objects.all().delete()
    run_command("import_workflows", path)

    assert run_command("export_workflows", "product_pipeline", "--format", fmt) == exported
    data = json.loads(exported) if fmt == "json" else yaml.safe_load(exported)
    assert data["edges"][0] == ["intake", "listing"]
    assert data["event_types"]["product_image"] == {"concurrency": 2}


@pytest.mark.django_db
def test_export_of_several_definitions_is_a_list_and_to_a_file(tmp_path):
    factories.workflow(factories.spec("alpha"))
    factories.workflow(factories.spec("beta", [("x", ECHO), ("y", ECHO)], [["x", "y"]]))
    target = tmp_path / "all.json"

    call_command("export_workflows", "--output", str(target), stdout=io.StringIO(), stderr=io.StringIO())

    data = json.loads(target.read_text())
    assert [d["name"] for d in data] == ["alpha", "beta"]
    WorkflowDefinition.objects.all().delete()
    assert run_command("import_workflows", str(target)).splitlines() == [
        "imported alpha (version 1)",
        "imported beta (version 1)",
    ]


@pytest.mark.django_db
def test_export_of_an_unknown_workflow_is_a_command_error():
    factories.workflow(factories.spec("known"))

    with pytest.raises(CommandError, match="unknown workflow.*ghost"):
        run_command("export_workflows", "known", "ghost")


# --------------------------------------------------------------------------- trigger_workflow


@pytest.mark.django_db
def test_trigger_prints_the_trace_id_and_starts_a_run(pipeline):
    out = run_command("trigger_workflow", "product_pipeline", "--payload", '{"product": "p-1"}')

    trace_id = out.splitlines()[0]
    assert str(uuid.UUID(trace_id)) == trace_id
    run = WorkflowRun.objects.get(trace_id=trace_id)
    assert run.status == WorkflowRun.Status.RUNNING
    assert run.source == "command"
    assert run.payload == {"product": "p-1"}
    assert TaskRun.objects.get(run=run, node_key="intake").status == TaskRun.Status.QUEUED


@pytest.mark.django_db
def test_trigger_with_an_idempotency_key_returns_the_same_run(pipeline):
    first = run_command("trigger_workflow", "product_pipeline", "--idempotency-key", "k-1").splitlines()[0]
    second = run_command("trigger_workflow", "product_pipeline", "--idempotency-key", "k-1").splitlines()[0]

    assert first == second
    assert WorkflowRun.objects.count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("payload", "expected"),
    [("{not json", "not valid JSON"), ("[1, 2]", "JSON object"), ('"text"', "JSON object")],
)
def test_trigger_refuses_a_bad_payload(pipeline, payload, expected):
    with pytest.raises(CommandError, match=expected):
        run_command("trigger_workflow", "product_pipeline", "--payload", payload)

    assert not WorkflowRun.objects.exists()


@pytest.mark.django_db
def test_trigger_takes_a_priority_and_refuses_one_out_of_range(pipeline):
    trace_id = run_command("trigger_workflow", "product_pipeline", "--priority", "8").splitlines()[0]
    assert WorkflowRun.objects.get(trace_id=trace_id).priority == 8
    assert TaskRun.objects.get(run_id=trace_id, node_key="intake").priority == 8
    with pytest.raises(CommandError, match="priority must be an integer from 0 to 9"):
        run_command("trigger_workflow", "product_pipeline", "--priority", "10")
    assert WorkflowRun.objects.count() == 1


@pytest.mark.django_db
def test_trigger_refuses_an_unknown_or_inactive_workflow(pipeline):
    with pytest.raises(CommandError, match="unknown workflow 'nope'"):
        run_command("trigger_workflow", "nope")

    WorkflowDefinition.objects.filter(pk=pipeline.pk).update(is_active=False)
    with pytest.raises(CommandError, match="inactive"):
        run_command("trigger_workflow", "product_pipeline")
    assert not WorkflowRun.objects.exists()


@pytest.mark.django_db
def test_trigger_wait_reports_progress_and_ends_on_success(pipeline, monkeypatch):
    EventType.objects.update(concurrency=5)

    def between_polls(seconds):
        for run in WorkflowRun.objects.filter(status=WorkflowRun.Status.RUNNING):
            play(run)

    monkeypatch.setattr(trigger_workflow.time, "sleep", between_polls)

    lines = run_command("trigger_workflow", "product_pipeline", "--wait").splitlines()

    assert uuid.UUID(lines[0])
    assert lines[1] == "0/7 tasks finished"
    assert lines[-2:] == ["7/7 tasks finished", "SUCCESS"]
    assert WorkflowRun.objects.get().status == WorkflowRun.Status.SUCCESS


@pytest.mark.django_db
def test_trigger_wait_exits_1_when_the_run_fails(pipeline, monkeypatch):
    def between_polls(seconds):
        for run in WorkflowRun.objects.filter(status=WorkflowRun.Status.RUNNING):
            play(run, fail={"image"})

    monkeypatch.setattr(trigger_workflow.time, "sleep", between_polls)
    out, err = io.StringIO(), io.StringIO()

    with pytest.raises(CommandError, match="ended FAILED") as error:
        call_command("trigger_workflow", "product_pipeline", "--wait", stdout=out, stderr=err)

    assert error.value.returncode == 1
    assert out.getvalue().splitlines()[-1] == "FAILED"
    assert "image: FAILURE: RuntimeError: boom" in err.getvalue()


@pytest.mark.django_db
def test_trigger_wait_gives_up_at_the_timeout_with_exit_1(pipeline):
    started = time.monotonic()

    with pytest.raises(CommandError, match="still RUNNING after 0.3s") as error:
        run_command("trigger_workflow", "product_pipeline", "--wait", "--timeout", "0.3")

    assert error.value.returncode == 1
    assert time.monotonic() - started < 5
    assert WorkflowRun.objects.get().status == WorkflowRun.Status.RUNNING


# --------------------------------------------------------------------------- workflow_status, cancel, retry


@pytest.mark.django_db
def test_workflow_status_shows_every_task(pipeline):
    run, _ = engine.workflow_run_start(workflow=pipeline, payload={})
    play(run)

    out = run_command("workflow_status", str(run.trace_id))

    assert str(run.trace_id) in out and "product_pipeline" in out and "RUNNING" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[-7:]}
    assert set(rows) == {"intake", "listing", "image", "upload_ali", "upload_1688", "publish_ali", "publish_1688"}
    assert rows["intake"][1:4] == ["product_src", "SUCCESS", "1"]
    assert rows["listing"][2] == "QUEUED" and rows["upload_ali"][2] == "WAITING"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("command", "trace_id", "expected"),
    [
        ("workflow_status", "not-a-uuid", "malformed trace id"),
        ("workflow_status", "00000000-0000-0000-0000-000000000000", "unknown run"),
        ("cancel_run", "nope", "malformed trace id"),
        ("retry_run", "00000000-0000-0000-0000-000000000000", "unknown run"),
    ],
)
def test_bad_trace_ids_are_command_errors(command, trace_id, expected):
    with pytest.raises(CommandError, match=expected):
        run_command(command, trace_id)


@pytest.mark.django_db
def test_cancel_run_revokes_every_unfinished_task(pipeline):
    run, _ = engine.workflow_run_start(workflow=pipeline, payload={})

    out = run_command("cancel_run", str(run.trace_id))

    assert out.strip() == f"{run.trace_id} CANCELED"
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.CANCELED
    assert set(TaskRun.objects.filter(run=run).values_list("status", flat=True)) == {TaskRun.Status.REVOKED}


@pytest.mark.django_db
def test_retry_run_reruns_a_failed_run_and_refuses_a_running_one():
    # a -> b
    workflow = factories.workflow(factories.spec("flaky", [("a", ECHO), ("b", FAIL)], [["a", "b"]]))
    run, _ = engine.workflow_run_start(workflow=workflow, payload={})

    with pytest.raises(CommandError, match="only a failed or canceled run can be retried"):
        run_command("retry_run", str(run.trace_id))

    play(run)
    play(run, fail={"b"})
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.FAILED

    out = run_command("retry_run", str(run.trace_id))

    assert out.strip() == f"{run.trace_id} RUNNING"
    assert dict(TaskRun.objects.filter(run=run).values_list("node_key", "status")) == {
        "a": TaskRun.Status.SUCCESS,
        "b": TaskRun.Status.QUEUED,
    }


# --------------------------------------------------------------------------- run_workers


def worker_lines(*args: str) -> dict[str, dict[str, str]]:
    """The dry run's worker command lines, as queue -> {option: value}."""
    workers = {}
    for line in run_command("run_workers", "--dry-run", *args).splitlines():
        argv = shlex.split(line)
        assert argv[:6] == [sys.executable, "-m", "celery", "-A", "config", "worker"]
        options = dict(zip(argv[6::2], argv[7::2], strict=True))
        workers[options["-Q"]] = options
    return workers


@pytest.mark.django_db
def test_run_workers_starts_one_worker_per_event_type_and_the_engine_queue(pipeline):
    workers = worker_lines()

    types = dict(EventType.objects.values_list("name", "concurrency"))
    assert set(workers) == set(types) | {"celery"}
    for queue, concurrency in types.items():
        assert workers[queue]["-c"] == str(concurrency)
        assert workers[queue]["-n"] == f"{queue}@%h"
        assert workers[queue]["--prefetch-multiplier"] == "1"
        assert workers[queue]["-O"] == "fair"
    assert workers["celery"]["-c"] == "1"


@pytest.mark.django_db
def test_run_workers_serves_only_the_queues_asked_for(pipeline):
    assert set(worker_lines("-Q", "product_listing,product_image")) == {"product_listing", "product_image"}

    workers = worker_lines("-Q", "product_src,celery", "-Q", "brand_new")
    assert set(workers) == {"product_src", "celery", "brand_new"}
    assert workers["product_src"]["-c"] == "5"
    assert workers["brand_new"]["-c"] == "1"


@pytest.mark.django_db
def test_run_workers_concurrency_and_loglevel_override(pipeline):
    workers = worker_lines("--concurrency", "3", "--loglevel", "debug")

    assert {w["-c"] for w in workers.values()} == {"3"}
    assert {w["-l"] for w in workers.values()} == {"DEBUG"}


@pytest.mark.django_db
@pytest.mark.parametrize(("args", "expected"), [(["-Q", "bad queue"], "bad queue name"), (["-Q", ","], "-Q needs")])
def test_run_workers_refuses_bad_queue_names(args, expected):
    with pytest.raises(CommandError, match=expected):
        run_command("run_workers", "--dry-run", *args)


@pytest.mark.django_db(transaction=True)  # wait_for refreshes the database connections between polls
def test_supervisor_restarts_a_dying_child_and_passes_sigterm_on(tmp_path):
    starts, stopped, ready = tmp_path / "starts", tmp_path / "stopped", tmp_path / "ready"
    dying = f"import os; open({str(starts)!r}, 'a').write(str(os.getpid()) + '\\n')"
    steady = (
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (open({str(stopped)!r}, 'w').write('SIGTERM'), sys.exit(0)))\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "time.sleep(120)\n"
    )
    script = (
        "import sys, django\n"
        "django.setup()\n"
        "from workflows_app.management.commands.run_workers import Supervisor\n"
        f"commands = {{'dying': [sys.executable, '-c', {dying!r}], 'steady': [sys.executable, '-c', {steady!r}]}}\n"
        "Supervisor(commands, poll_interval=0.05, backoff=0.05, max_backoff=0.2).run()\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test"}
    supervisor = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_for(lambda: ready.exists(), timeout=20, interval=0.05, what="the steady child")
        wait_for(
            lambda: starts.exists() and len(starts.read_text().split()) >= 3,
            timeout=20,
            interval=0.05,
            what="restarts of the dying child",
        )

        supervisor.send_signal(signal.SIGTERM)
        output, _ = supervisor.communicate(timeout=20)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.communicate()

    assert supervisor.returncode == 0, output
    assert stopped.read_text() == "SIGTERM"
    assert "worker dying exited unexpectedly with code 0; restarting" in output


# --------------------------------------------------------------------------- demo


@pytest.mark.parametrize("name", ["product_pipeline_v3", "../product_pipeline", "examples/product_pipeline"])
def test_demo_refuses_a_workflow_that_is_not_an_example_before_starting_anything(name):
    with pytest.raises(CommandError) as caught:
        call_command("demo", "--no-serve", "--workflow", name, stdout=io.StringIO())

    assert f"no example workflow {name!r}" in str(caught.value)
    assert "the examples: product_pipeline, product_pipeline_v2" in str(caught.value)


# --------------------------------------------------------------------------- docker-compose.yml

SETTINGS_ENV_RE = re.compile(
    r"""\benv(?:\.(?:bool|int|float|str|list|tuple|dict|json|url|db|db_url|cache|email))?\(\s*["']([A-Za-z_][A-Za-z0-9_]*)["']"""
)
STANDARD_ENV = {"DJANGO_SETTINGS_MODULE", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"}


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def argv_of(command) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def settings_env_names() -> set[str]:
    names: set[str] = set()
    for source in (ROOT / "config" / "settings").glob("*.py"):
        names |= set(SETTINGS_ENV_RE.findall(source.read_text()))
    return names


def test_compose_has_the_processes_a_deployment_needs():
    services = compose()["services"]

    assert {"postgres", "redis", "migrate", "web", "beat"} <= set(services)
    assert services["postgres"]["image"] == "postgres:15" and "pg_isready" in str(services["postgres"]["healthcheck"])
    assert services["redis"]["image"] == "redis:7" and "ping" in str(services["redis"]["healthcheck"])
    assert services["web"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "healthcheck" in services["web"]
    assert services["flower"]["profiles"] == ["flower"]
    for name, service in services.items():
        if name not in ("migrate", "flower"):
            assert service.get("restart") == "unless-stopped", name


def test_compose_commands_name_real_commands_and_this_celery_app():
    commands = get_commands()
    seen_manage, seen_celery = set(), set()
    for name, service in compose()["services"].items():
        if "command" not in service:
            continue
        argv = argv_of(service["command"])
        if "manage.py" in argv:
            command = argv[argv.index("manage.py") + 1]
            assert command in commands, f"{name}: manage.py {command} does not exist"
            seen_manage.add(command)
        if argv[0] == "celery":
            assert argv[1:3] == ["-A", "config"], f"{name}: not this project's Celery app"
            seen_celery.add(argv[3])
    assert {"migrate", "run_workers"} <= seen_manage
    assert "beat" in seen_celery


def test_compose_workers_serve_every_queue_of_the_example_and_the_engine_queue():
    served = set()
    for service in compose()["services"].values():
        argv = argv_of(service.get("command", []))
        if "run_workers" in argv:
            served |= {q for q in argv[argv.index("-Q") + 1].split(",")}
    example = yaml.safe_load(EXAMPLE.read_text())

    assert {n["event_type"] for n in example["nodes"]} | {"celery"} <= served


def test_compose_sets_only_environment_variables_the_settings_read():
    read = settings_env_names()
    assert {"DATABASE_URL", "CELERY_BROKER_URL", "SECRET_KEY", "ALLOWED_HOSTS", "DEBUG"} <= read
    for name, service in compose()["services"].items():
        environment = service.get("environment") or {}
        keys = environment if isinstance(environment, dict) else [item.split("=", 1)[0] for item in environment]
        for key in keys:
            assert key in read or key in STANDARD_ENV or key.startswith("POSTGRES_"), f"{name}: {key} is never read"
