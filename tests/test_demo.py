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
    import redis

    project = tmp_path / "eventflow"
    shutil.copytree(
        ROOT,
        project,
        ignore=shutil.ignore_patterns(".venv", "var", ".git", "__pycache__", ".pytest_cache", ".ruff_cache"),
    )
    database = "eventflow_demo_check"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{database}"')
    broker = "redis://127.0.0.1:6379/12"
    redis.Redis.from_url(broker).flushdb()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "PYTHONUNBUFFERED": "1",
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{database}",
        "CELERY_BROKER_URL": broker,
    }
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
