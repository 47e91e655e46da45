"""Start and stop real `celery worker` processes against the test database and broker."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterable
from pathlib import Path

import kombu.exceptions
import redis
from django.conf import settings

from tests.e2e import wait_for
from tests.processes import ROOT, Process

__all__ = ["ROOT", "Worker", "purge_broker", "reset_broker_connections", "worker_env"]


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


class Worker(Process):
    """One `celery worker` process consuming some queues."""

    def __init__(
        self, name: str, queues: Iterable[str], *, concurrency: int, log_dir: Path, env: dict[str, str] | None = None
    ):
        self.name = f"{name}@{socket.gethostname()}"
        self.queues = list(queues)
        cmd = [
            *(sys.executable, "-m", "celery", "-A", "config", "worker"),
            *("-Q", ",".join(self.queues), "-c", str(concurrency), "-n", self.name, "--pool", "prefork"),
            *("--include", "tests.e2e_tasks", "--without-gossip", "--without-mingle", "-l", "INFO"),
        ]
        super().__init__(cmd, log_path=log_dir / f"{name}.log", env=worker_env(**(env or {})))

    def wait_ready(self, timeout: float = 60) -> None:
        from config.celery import app

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
