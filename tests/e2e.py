"""Helpers of the tests that drive real processes: start a run through the API, and wait, with a
deadline, on a condition or for runs to end."""

from __future__ import annotations

import time
from collections.abc import Callable

from django.db import close_old_connections


def wait_for(condition: Callable[[], object], *, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll until `condition()` is truthy and return its value; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        close_old_connections()
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def trigger(api, workflow: str, payload: dict | None = None) -> str:
    """Start a run of `workflow` through the API; its trace id."""
    response = api.post(f"/api/workflows/{workflow}/runs/", {"payload": payload or {}}, format="json")
    assert response.status_code == 201, response.content
    return response.json()["trace_id"]


def wait_final(trace_ids: list[str], timeout: float = 90) -> dict[str, str]:
    """Wait until every one of these runs has ended; trace id -> final status."""
    from workflows_app.models import WorkflowRun  # here: the bench imports this module before Django is set up

    def finished() -> dict[str, str] | None:
        statuses = dict(WorkflowRun.objects.filter(trace_id__in=trace_ids).values_list("trace_id", "status"))
        done = len(statuses) == len(set(trace_ids)) and all(s != WorkflowRun.Status.RUNNING for s in statuses.values())
        return statuses if done else None

    found = wait_for(finished, timeout=timeout, what=f"{len(trace_ids)} runs to finish")
    return {str(k): v for k, v in found.items()}
