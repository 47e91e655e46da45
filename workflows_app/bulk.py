"""Bulk cancel and retry: every run a filter matches, or those named, through the engine's one-run services."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from django.db import connection

from . import engine, selectors
from .engine import EngineError
from .models import WorkflowRun
from .selectors import RunFilter

logger = logging.getLogger(__name__)

# Runs read per batch. Each run is then changed by its own engine call, in its own short transaction, so
# the bulk never holds more than one run's locks; the batch only bounds what is read at once.
BATCH_SIZE = 100
CANCELABLE = (WorkflowRun.Status.RUNNING,)
RETRYABLE = (WorkflowRun.Status.FAILED, WorkflowRun.Status.CANCELED)


@dataclass
class BulkResult:
    """What a bulk action matched (runs the filter named when it began) and changed (runs it moved)."""

    matched: int = 0
    changed: int = 0
    batches: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"matched": self.matched, "changed": self.changed}


def _database_now() -> datetime:
    with connection.cursor() as cursor:
        cursor.execute("SELECT now()")
        return cursor.fetchone()[0]


def _walk(filters: RunFilter, *, eligible: tuple[str, ...], act: Callable[[str], bool], batch_size: int) -> BulkResult:
    """Apply `act` to every run the filters match, newest first, a batch at a time.

    The set is what matched when the call began: runs created after it (started while the bulk works)
    are left alone, and the keyset walk never meets a run twice, even one whose status it changed. A run
    not `eligible` (already canceled, not retryable) counts as matched but is not touched, which makes a
    repeated call change nothing. Each engine call commits on its own, so no lock outlives its run; the
    views call this outside any transaction (ATOMIC_REQUESTS is off), and a caller inside one would hold
    every run's locks until it commits.
    """
    if filters.is_empty():
        raise ValueError("a bulk action needs trace ids or a filter")
    result = BulkResult()
    cursor = (_database_now(), "ffffffff-ffff-ffff-ffff-ffffffffffff")
    while True:
        batch = selectors.run_match_batch(filters, before=cursor, limit=batch_size)
        if not batch:
            return result
        result.batches += 1
        result.matched += len(batch)
        for _, trace_id, status in batch:
            if status in eligible and act(trace_id):
                result.changed += 1
        if len(batch) < batch_size:
            return result
        created_at, trace_id, _ = batch[-1]
        cursor = (created_at, trace_id)


def _cancel(trace_id: str) -> bool:
    try:
        run = engine.workflow_run_cancel(trace_id=trace_id)
    except (EngineError, WorkflowRun.DoesNotExist) as exc:
        logger.info("bulk cancel: %s left as it is: %s", trace_id, exc)
        return False
    # A run that ended on its own between the read and the call is final but not CANCELED: unchanged.
    return run.status == WorkflowRun.Status.CANCELED


def _retry(trace_id: str) -> bool:
    try:
        engine.workflow_run_retry(trace_id=trace_id)
    except (EngineError, WorkflowRun.DoesNotExist) as exc:
        # Retried by someone else since the read (now RUNNING: a 409), or purged.
        logger.info("bulk retry: %s left as it is: %s", trace_id, exc)
        return False
    return True


def workflow_runs_cancel(*, filters: RunFilter, batch_size: int = BATCH_SIZE) -> BulkResult:
    """Cancel every running run the filters match (`engine.workflow_run_cancel`, one run per transaction)."""
    return _walk(filters, eligible=CANCELABLE, act=_cancel, batch_size=batch_size)


def workflow_runs_retry(*, filters: RunFilter, batch_size: int = BATCH_SIZE) -> BulkResult:
    """Retry every failed or canceled run the filters match (`engine.workflow_run_retry`, one run per
    transaction): their failed, upstream-failed and revoked tasks run again, successes stay."""
    return _walk(filters, eligible=RETRYABLE, act=_retry, batch_size=batch_size)


ACTIONS = {"cancel": (workflow_runs_cancel, CANCELABLE), "retry": (workflow_runs_retry, RETRYABLE)}


def bulk_preview(*, action: str, filters: RunFilter) -> tuple[int, int]:
    """(matched, would change): what a bulk action would do now, for its confirmation; one query."""
    counts = selectors.run_match_counts(filters)
    eligible = ACTIONS[action][1]
    return sum(counts.values()), sum(counts[s] for s in eligible)
