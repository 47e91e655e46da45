"""A worker bootstep that renews the leases of running attempts, settles lapsed ones, and writes the
worker's heartbeat."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterable
from typing import Any

from celery import bootsteps
from celery.worker import state

logger = logging.getLogger(__name__)

# One statement per tick: the row is created on a worker's first heartbeat and updated in place after,
# `last_seen` on the database's clock so that no worker's clock decides whether it looks silent. A new
# pid under the same name is a restart: its start time is reset.
HEARTBEAT = """
INSERT INTO workflows_app_worker AS w (name, hostname, queues, pool_size, pid, started_at, last_seen, attempts)
VALUES (%s, %s, %s::jsonb, %s, %s, now(), now(), %s::jsonb)
ON CONFLICT (name) DO UPDATE SET
    hostname = EXCLUDED.hostname, queues = EXCLUDED.queues, pool_size = EXCLUDED.pool_size, pid = EXCLUDED.pid,
    started_at = CASE WHEN w.pid = EXCLUDED.pid THEN w.started_at ELSE now() END,
    last_seen = now(), attempts = EXCLUDED.attempts
"""


def worker_heartbeat(*, name: str, queues: Iterable[str], pool_size: int, attempts: Iterable[str]) -> None:
    """Record that the worker `name` (its main process, this one) is alive, with what it consumes and the
    attempts its pool runs now. Called every few seconds by each worker, so it is a single upsert."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            HEARTBEAT,
            [
                name[:200],
                socket.gethostname()[:200],
                json.dumps(sorted(queues)),
                pool_size,
                os.getpid(),
                json.dumps(list(attempts)),
            ],
        )


class LeaseKeeper(bootsteps.StartStopStep):
    """Runs in the worker's main process, which outlives a crashed pool process.

    The main process knows which requests its pool is running (`state.active_requests`); a pool
    process killed mid-task drops out of that set, so its lease stops being renewed and lapses.
    A worker killed outright renews nothing. Every worker also reconciles, so no extra process
    is needed for recovery while any worker is alive.
    """

    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker: Any, **kwargs: Any):
        super().__init__(worker, **kwargs)
        self.tref = None
        self.last_reconcile = 0.0
        self.worker = worker

    def start(self, worker: Any) -> None:
        from django.conf import settings

        config = settings.EVENTFLOW
        self.reconcile_every = config["RECONCILE_SECONDS"]
        interval = min(config["LEASE_SECONDS"] / 3, self.reconcile_every)
        self.tref = worker.timer.call_repeatedly(interval, self.tick, priority=10)

    def stop(self, worker: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def tick(self) -> None:
        from django.db import close_old_connections

        from . import engine

        try:
            close_old_connections()
            running = [request.id for request in list(state.active_requests)]
            engine.task_runs_renew(event_ids=running)
            self.beat(running)
            if time.monotonic() - self.last_reconcile >= self.reconcile_every:
                self.last_reconcile = time.monotonic()
                settled = engine.task_runs_reconcile()
                if settled:
                    logger.warning("brought %d overdue task(s) to a definite state", settled)
        except Exception:
            # A database outage must not stop the worker; the next tick tries again.
            logger.exception("lease renewal failed")

    def beat(self, running: list[str]) -> None:
        """The heartbeat `/workers/` reads. Its failure is logged apart: it must not stop renewals."""
        try:
            worker = self.worker
            queues = getattr(getattr(worker.app.amqp, "queues", None), "consume_from", None) or {}
            worker_heartbeat(
                name=worker.hostname, queues=list(queues), pool_size=worker.concurrency or 0, attempts=running
            )
        except Exception:
            logger.exception("worker heartbeat failed")
