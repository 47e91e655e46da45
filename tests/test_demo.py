"""The quickstart: `manage.py demo --no-serve` on embedded defaults, in a fresh copy, with no environment."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN_URL = re.compile(r"http://127\.0\.0\.1:\d+/runs/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/")


def processes_in(folder: Path) -> dict[int, str]:
    """Pid -> command line of the live processes whose working directory is `folder` or within it, as
    the embedded PostgreSQL's is (Linux /proc)."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if Path(os.readlink(proc / "cwd")).is_relative_to(folder):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile, or not ours to inspect
    return found


def project_on_servers(tmp_path: Path, database: str, broker: str) -> tuple[Path, dict[str, str]]:
    """A copy of the project, and the environment that points it at a fresh PostgreSQL database and an
    emptied Redis database."""
    import psycopg
    import redis

    project = tmp_path / "eventflow"
    shutil.copytree(
        ROOT,
        project,
        ignore=shutil.ignore_patterns(".venv", "var", ".git", "__pycache__", ".pytest_cache", ".ruff_cache"),
    )
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{database}"')
    redis.Redis.from_url(broker).flushdb()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "PYTHONUNBUFFERED": "1",
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{database}",
        "CELERY_BROKER_URL": broker,
    }
    return project, env


def run_demo(project: Path, env: dict[str, str], *args: str, timeout: float) -> subprocess.CompletedProcess:
    """Run the demo; past `timeout`, SIGTERM it so that it stops its workers, as a user's `kill` would."""
    cmd = [sys.executable, "manage.py", "demo", *args]
    process = subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        pytest.fail(f"demo still running after {timeout}s:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


@pytest.mark.e2e
def test_demo_runs_the_product_pipeline_on_embedded_defaults(tmp_path: Path) -> None:
    # A copy of the working tree, so the embedded database and the broker folders land in it and the
    # run starts from nothing, as in a fresh clone (untracked new files included, hence no git).
    project = tmp_path / "eventflow"
    shutil.copytree(
        ROOT,
        project,
        ignore=shutil.ignore_patterns(".venv", "var", ".git", "__pycache__", ".pytest_cache", ".ruff_cache"),
    )
    home = tmp_path / "home"
    home.mkdir()
    # Nothing but PATH: no DATABASE_URL, CELERY_BROKER_URL or DJANGO_SETTINGS_MODULE, so the
    # defaults alone must bring it up, whether or not PostgreSQL and Redis are running.
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    try:
        result = run_demo(project, env, "--no-serve", "--runs", "2", timeout=240)
        left = processes_in(project)
    finally:
        # Its workers live in sessions of their own; none may outlive the test, whatever failed.
        for pid in processes_in(project):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    output = result.stdout + result.stderr
    print(f"demo took {time.monotonic() - started:.1f}s\n{output}")

    assert result.returncode == 0, output
    assert len(set(RUN_URL.findall(result.stdout))) == 2, output
    assert "SUCCESS" in result.stdout
    assert "All runs succeeded." in result.stdout
    assert len(re.findall(r"GET /runs/\S+ as demo -> 200", result.stdout)) == 2, output
    assert (project / "var" / "pgdata" / "PG_VERSION").exists()
    assert (project / "var" / "broker" / "queue").is_dir()
    for log in (project / "var" / "log" / "demo").glob("worker-*.log"):
        assert "Traceback" not in log.read_text(), f"{log.name}:\n{log.read_text()[-3000:]}"
    # Every process it started, the embedded PostgreSQL's included, was gone by the time it returned.
    assert left == {}


@pytest.mark.e2e
def test_demo_uses_postgresql_and_redis_when_told(tmp_path: Path) -> None:
    import psycopg

    project, env = project_on_servers(tmp_path, "eventflow_demo_check", "redis://127.0.0.1:6379/12")
    database = "eventflow_demo_check"
    try:
        result = run_demo(project, env, "--no-serve", "--runs", "1", timeout=240)
    finally:
        for pid in processes_in(project):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    trace_id = RUN_URL.findall(result.stdout)[0].rstrip("/").rsplit("/", 1)[1]
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{database}") as conn:
        status = conn.execute("SELECT status FROM workflows_app_workflowrun WHERE trace_id = %s", [trace_id]).fetchone()
    assert status == ("SUCCESS",)
    assert not (project / "var" / "pgdata").exists()
    assert not (project / "var" / "broker" / "queue").exists()
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.mark.e2e
def test_demo_runs_the_grown_pipeline_with_a_barred_branch_and_one_upload_per_image(tmp_path: Path) -> None:
    import psycopg
    import yaml

    project, env = project_on_servers(tmp_path, "eventflow_demo_v2_check", "redis://127.0.0.1:6379/13")
    database = "eventflow_demo_v2_check"
    example = yaml.safe_load((ROOT / "examples" / "product_pipeline_v2.yaml").read_text())
    images = next(n for n in example["nodes"] if n["key"] == "image")["params"]["images"]
    try:
        result = run_demo(project, env, "--no-serve", "--runs", "2", "--workflow", "product_pipeline_v2", timeout=240)
    finally:
        for pid in processes_in(project):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    output = result.stdout + result.stderr
    print(output)
    assert result.returncode == 0, output
    assert "Loaded workflow 'product_pipeline_v2'" in result.stdout
    assert "All runs succeeded." in result.stdout
    # The node table: each mapped upload's instances, and the barred marketplace's branch skipped.
    table = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith(("upload_", "publish_"))}
    assert f"{len(images)} per run: {2 * len(images)} SUCCESS" in table["upload_ali"], output
    assert "2 SKIPPED" in table["upload_1688"] and "2 SKIPPED" in table["publish_1688"], output
    assert "2 SUCCESS" in table["publish_ali"], output

    trace_ids = sorted({url.rstrip("/").rsplit("/", 1)[1] for url in RUN_URL.findall(result.stdout)})
    assert len(trace_ids) == 2
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{database}") as conn:
        runs = conn.execute(
            "SELECT status FROM workflows_app_workflowrun WHERE trace_id = ANY(%s::uuid[])", [trace_ids]
        ).fetchall()
        tasks = conn.execute(
            "SELECT t.run_id::text, t.node_key, t.map_index, t.status, e.context"
            " FROM workflows_app_taskrun t LEFT JOIN events_app_event e ON e.event_id = t.current_event_id"
            " WHERE t.run_id = ANY(%s::uuid[]) ORDER BY t.run_id, t.node_key, t.map_index NULLS FIRST",
            [trace_ids],
        ).fetchall()
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    assert runs == [("SUCCESS",), ("SUCCESS",)]
    for trace_id in trace_ids:
        mine = [t for t in tasks if t[0] == trace_id]
        status = {key: s for _, key, index, s, _ in mine if index is None}
        # The moderation bars 1688: its edge is not taken, so its upload and publish never run.
        assert status["upload_1688"] == status["publish_1688"] == "SKIPPED"
        assert not [t for t in mine if t[1] == "upload_1688" and t[2] is not None]
        assert {key: s for key, s in status.items() if key not in ("upload_1688", "publish_1688")} == dict.fromkeys(
            ["intake", "listing", "image", "moderate", "upload_ali", "publish_ali"], "SUCCESS"
        )
        # One upload instance per image, each holding its image, in order.
        uploads = [
            (index, s, context["item"])
            for _, key, index, s, context in mine
            if key == "upload_ali" and index is not None
        ]
        assert uploads == [(i, "SUCCESS", image) for i, image in enumerate(images)]
        publish = next(context for _, key, index, _, context in mine if key == "publish_ali")
        assert len(publish["upstream"]["upload_ali"]) == len(images)
