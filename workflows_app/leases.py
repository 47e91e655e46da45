"""A worker bootstep that renews the leases of running attempts and settles lapsed ones."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import bootsteps
from celery.worker import state

logger = logging.getLogger(__name__)


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
            engine.task_runs_renew(event_ids=[request.id for request in list(state.active_requests)])
            if time.monotonic() - self.last_reconcile >= self.reconcile_every:
                self.last_reconcile = time.monotonic()
                settled = engine.task_runs_reconcile()
                if settled:
                    logger.warning("brought %d overdue task(s) to a definite state", settled)
        except Exception:
            # A database outage must not stop the worker; the next tick tries again.
            logger.exception("lease renewal failed")
