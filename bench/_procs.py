"""Processes the benchmarks start and stop: Celery workers, gunicorn, and their memory and CPU read from /proc."""

from __future__ import annotations

import http.client
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import _setup  # noqa: F401 - puts the project on the path

from tests.e2e import wait_for
from tests.processes import Process, free_port


def bench_env(**extra: str) -> dict[str, str]:
    """The environment of every process the bench starts: its own database and broker, test settings."""
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="bench.settings",
        DATABASE_URL=os.environ["DATABASE_URL"],
        CELERY_BROKER_URL=os.environ["CELERY_BROKER_URL"],
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class Worker(Process):
    """`celery worker`, prefork, on the bench queue: the one worker setup Eventflow and canvas both run on."""

    def __init__(self, name: str, *, queue: str, concurrency: int, log_dir: Path, env: dict[str, str]):
        self.name = f"{name}@{socket.gethostname()}"
        self.queue = queue
        cmd = [
            *(sys.executable, "-m", "celery", "-A", "config", "worker"),
            *("-Q", queue, "-c", str(concurrency), "-n", self.name, "--pool", "prefork"),
            *("--include", "bench.tasks", "--without-gossip", "--without-mingle"),
            # Two log lines per task at INFO would be measured on both sides; warnings still show.
            *("-l", "WARNING"),
        ]
        super().__init__(cmd, log_path=log_dir / f"{name}.log", env=env)

    def wait_ready(self, timeout: float = 60) -> None:
        from config.celery import app

        def ready() -> bool:
            if why := self.exited():
                raise RuntimeError(why)
            return bool(app.control.ping(destination=[self.name], timeout=0.5))

        wait_for(ready, timeout=timeout, interval=0.2, what=f"worker {self.name} to answer a ping")

    def pool_pids(self) -> list[int]:
        """The prefork pool processes: the children of the worker's main process."""
        return children_of(self.pid)


class Gunicorn(Process):
    """`gunicorn config.wsgi:application` on a free loopback port with sync workers."""

    def __init__(self, *, workers: int, log_dir: Path, env: dict[str, str]):
        self.port = free_port()
        cmd = [
            *(sys.executable, "-m", "gunicorn", "config.wsgi:application"),
            *("--workers", str(workers), "--bind", f"127.0.0.1:{self.port}", "--no-control-socket"),
        ]
        super().__init__(cmd, log_path=log_dir / "gunicorn.log", env=env)

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            if why := self.exited():
                raise RuntimeError(why)
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/api/")
                status = conn.getresponse().status
                conn.close()
            except OSError:
                return False
            return status in (200, 401, 403)

        wait_for(ready, timeout=timeout, interval=0.2, what="gunicorn to answer")


def process_stats() -> Iterator[tuple[int, str, list[str]]]:
    """Every process's pid, command name and the fields of its /proc stat(5) line from the third on."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # ended while we looked
        # The command name in parentheses may hold spaces and parentheses.
        yield int(entry.name), stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 1 :].split()


def children_of(pid: int) -> list[int]:
    return sorted(child for child, _, fields in process_stats() if int(fields[1]) == pid)


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak resident) of a process, in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """Every process's command name and the CPU seconds used by it and by its children that ended
    (user plus system): a PostgreSQL backend that exits adds its time to the postmaster's."""
    # utime, stime, cutime and cstime are fields 14 to 17 of stat(5).
    return {pid: (name, sum(int(f) for f in fields[11:15]) / CLOCK_TICKS) for pid, name, fields in process_stats()}
