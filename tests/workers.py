"""Start and stop real `celery worker` processes against the test database and broker."""

from __future__ import annotations

import glob
import json
import os
import socket
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path

import kombu.exceptions
import redis
from django.conf import settings

from tests.e2e import wait_for
from tests.processes import ROOT, Process

__all__ = ["ROOT", "Worker", "clock_env", "purge_broker", "reset_broker_connections", "worker_env"]

# Where Debian's package `faketime` (through its dependency `libfaketime`) puts the preload library.
LIBFAKETIME = (
    "/usr/lib/*/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
    "/usr/local/lib/faketime/libfaketime.so.1",
)


def database_url() -> str:
    """The URL of the database this test process uses now (the test database, once set up)."""
    db = settings.DATABASES["default"]
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def worker_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="config.settings.test",
        DATABASE_URL=database_url(),
        CELERY_BROKER_URL=settings.CELERY_BROKER_URL,
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def libfaketime() -> str:
    """The path of libfaketime's preload library; fails saying how to install it when it is missing."""
    for pattern in LIBFAKETIME:
        if found := sorted(glob.glob(pattern)):
            return found[0]
    raise AssertionError(
        "a worker with a clock offset runs under libfaketime, which is not installed: "
        "`apt-get install faketime` (Debian's package, as .ci/run installs it), looked for " + ", ".join(LIBFAKETIME)
    )


def clock_env(offset: float) -> dict[str, str]:
    """The environment of a process whose wall clock reads `offset` seconds from the true time.

    libfaketime (0.9.10) moves the monotonic clock by a constant too, so timers and time limits
    still measure true intervals. Its DONT_FAKE_MONOTONIC=1 would leave that clock alone, but then
    Python's `time.sleep` fails with EINVAL (it sleeps to an absolute monotonic deadline), so it is
    not set. A forked pool process inherits the preloaded library and its offset.
    """
    preload = " ".join(filter(None, [libfaketime(), os.environ.get("LD_PRELOAD", "")]))
    return {"LD_PRELOAD": preload, "FAKETIME": f"{offset:+.3f}"}


class Worker(Process):
    """One `celery worker` process consuming some queues, its clock `clock_offset` seconds off when given,
    in the network namespace `netns` when given (a host of `tests.hosts`), with `args` added to its command."""

    def __init__(
        self,
        name: str,
        queues: Iterable[str],
        *,
        concurrency: int,
        log_dir: Path,
        env: dict[str, str] | None = None,
        clock_offset: float | None = None,
        netns: str | None = None,
        args: Iterable[str] = (),
    ):
        self.name = f"{name}@{socket.gethostname()}"
        self.queues = list(queues)
        self.clock_offset = clock_offset
        env = {**(env or {}), **(clock_env(clock_offset) if clock_offset is not None else {})}
        cmd = [
            *(("ip", "netns", "exec", netns) if netns else ()),
            *(sys.executable, "-m", "celery", "-A", "config", "worker"),
            *("-Q", ",".join(self.queues), "-c", str(concurrency), "-n", self.name, "--pool", "prefork"),
            *("--include", "tests.e2e_tasks", "--without-gossip", "--without-mingle", "-l", "INFO"),
            *args,
        ]
        super().__init__(cmd, log_path=log_dir / f"{name}.log", env=worker_env(**env))

    def wait_ready(self, timeout: float = 60) -> None:
        from config.celery import app

        if self.clock_offset is not None:
            self.check_clock(timeout)
            return

        def ready() -> bool:
            if why := self.exited():
                raise AssertionError(why)
            try:
                return bool(app.control.ping(destination=[self.name], timeout=0.5))
            except (ConnectionError, OSError, kombu.exceptions.OperationalError, redis.exceptions.ConnectionError):
                # A pooled connection from before a broker restart: drop the pool and ask again.
                reset_broker_connections()
                return False

        wait_for(ready, timeout=timeout, interval=0.2, what=f"worker {self.name} to answer a ping")

    def check_clock(self, timeout: float = 60) -> dict[str, float]:
        """Wait for a pool process to answer a clock probe sent through the first queue; check that
        its wall clock (`time.time`, `datetime.now`, Django's `timezone.now`) reads `clock_offset`
        seconds from the database's, that its monotonic clock runs at the true rate, and that it
        reached PostgreSQL and Redis. Returns the readings.

        It is also how such a worker is known to be ready: one whose clock is ahead drops Celery's
        control messages, `ping` among them, which expire at the sender's time plus the reply
        timeout. A task message carries no expiry.
        """
        from config.celery import app
        from tests.e2e_tasks import _redis

        key = uuid.uuid4().hex
        app.send_task("tests.e2e_tasks.clock", args=[key], queue=self.queues[0])

        def answered() -> bytes | None:
            if why := self.exited():
                raise AssertionError(why)
            return _redis().get(f"clock:{key}")

        readings = json.loads(wait_for(answered, timeout=timeout, interval=0.2, what=f"{self.name}'s clock probe"))
        offset = self.clock_offset or 0.0
        off = {name: round(readings[name] - readings["database"], 3) for name in ("time", "datetime", "django")}
        assert all(abs(value - offset) < 1 for value in off.values()), f"{self.name} is to run {offset:+g} s off: {off}"
        drift = readings["monotonic_elapsed"] - readings["wall_elapsed"]
        assert abs(drift) < 0.05, f"{self.name}'s monotonic clock does not keep time: {readings}"
        return readings


def reset_broker_connections() -> None:
    """Forget every pooled broker connection, e.g. after the broker restarted under them."""
    from kombu import pools

    from config.celery import app

    pools.reset()
    app._after_fork()  # drops the app's own references, as Celery does in a forked child


def purge_broker() -> None:
    """Drop messages left in the test broker by earlier runs, so they cannot reach these workers."""
    import redis

    if settings.CELERY_BROKER_URL.startswith("redis"):
        redis.Redis.from_url(settings.CELERY_BROKER_URL).flushdb()
    else:
        from config.celery import app

        with app.connection_for_write() as conn:
            channel = conn.default_channel
            for queue in _all_queue_names():
                try:
                    channel.queue_purge(queue)
                except Exception:  # noqa: BLE001 - a queue that was never declared has nothing to purge
                    channel = conn.channel()


def _all_queue_names() -> list[str]:
    from events_app.models import EventType

    return ["celery", *EventType.objects.values_list("name", flat=True)]
