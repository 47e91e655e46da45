"""End to end: /workers/ with two real workers; one killed with SIGKILL is marked silent within the lease bound,
and the attempts it held show their fate (retried on the other worker, failed)."""

from __future__ import annotations

import re
import time

import pytest

from tests import factories
from tests.e2e import trigger, wait_for
from workflows_app.models import TaskRun, Worker

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SLEEP = "workflows_app.tasks.sleep"
# Short leases, so a lost worker is noticed in seconds: the workers and this process read the same values.
LEASE, RECONCILE = 3, 1
FAST = {"EVENTFLOW_LEASE_SECONDS": str(LEASE), "EVENTFLOW_RECONCILE_SECONDS": str(RECONCILE)}


def row(html: str, worker: str) -> str:
    """The table row of one worker on /workers/ ('' when it is not listed)."""
    found = re.search(rf'<tr id="worker-[^"]*" data-worker="{re.escape(worker)}".*?</tr>', html, re.S)
    return found.group(0) if found else ""


def started_on(trace_id: str, worker: str) -> TaskRun | None:
    return TaskRun.objects.filter(run_id=trace_id, status="STARTED", worker=worker).first()


def test_workers_page_shows_live_workers_and_the_fate_of_a_killed_ones_attempts(workers, api, client, settings):
    settings.EVENTFLOW = {**settings.EVENTFLOW, "LEASE_SECONDS": LEASE, "RECONCILE_SECONDS": RECONCILE}
    bound = LEASE + RECONCILE
    for name, retries, event_type in (("wk_retry", 1, "wk_a"), ("wk_fail", 0, "wk_a"), ("wk_other", 0, "wk_b")):
        factories.workflow(
            factories.spec(
                name,
                [{"key": "hold", "task": SLEEP, "params": {"seconds": 20}, "max_retries": retries, "retry_delay": 0.1}],
                event_type=event_type,
                event_types={event_type: {"concurrency": 4}},
            )
        )
    client.force_login(factories_user())

    victim = workers(["wk_a"], concurrency=2, name="wa", env=FAST)
    retried, failed = trigger(api, "wk_retry"), trigger(api, "wk_fail")
    wait_for(lambda: started_on(retried, victim.name) and started_on(failed, victim.name), timeout=30, what="wa busy")
    # The survivor also serves wk_a, so it can take the lost attempt's retry.
    survivor = workers(["wk_a", "wk_b"], concurrency=2, name="wb", env=FAST)
    other = trigger(api, "wk_other")
    wait_for(lambda: started_on(other, survivor.name), timeout=30, what="wb busy")

    def both_live_and_busy() -> str | None:
        html = client.get("/workers/").content.decode()
        a, b = row(html, victim.name), row(html, survivor.name)
        ok = 'data-state="live" data-running="2"' in a and 'data-state="live" data-running="1"' in b
        return html if ok else None

    html = wait_for(both_live_and_busy, timeout=20, what="both workers listed live with what they run")
    a, b = row(html, victim.name), row(html, survivor.name)
    assert f'data-run="{retried}"' in a and f'data-run="{failed}"' in a and f'data-run="{other}"' in b
    assert f'href="/runs/{retried}/"' in a
    assert "<code>wk_a</code>" in a and "<code>wk_b</code>" not in a
    assert "<code>wk_a</code>" in b and "<code>wk_b</code>" in b
    assert re.search(r'<td class="num">2</td>', a), "pool size"
    assert Worker.objects.get(name=victim.name).pid == victim.pid

    # The attempts it runs, read before the kill: a retry gives its task a new current attempt.
    retried_event = str(TaskRun.objects.get(run_id=retried).current_event_id)
    failed_event = str(TaskRun.objects.get(run_id=failed).current_event_id)
    victim.kill()
    killed = time.monotonic()

    def victim_silent() -> bool:
        return 'data-state="silent"' in row(client.get("/workers/").content.decode(), victim.name)

    wait_for(victim_silent, timeout=bound + 5, interval=0.2, what="the killed worker to be marked silent")
    # Its last heartbeat came at most one tick (1 s here) before the kill; a little slack for the page.
    assert time.monotonic() - killed <= bound + 2

    seen = {}

    def fates_shown() -> str | None:
        html = seen["row"] = row(client.get("/workers/").content.decode(), victim.name)
        done = (
            re.search(rf'data-attempt="{failed_event}" data-fate="failed"', html)
            and re.search(rf'data-attempt="{retried_event}" data-fate="retried"', html)
            and f"on {survivor.name}" in html
        )
        return html if done else None

    try:
        html = wait_for(fates_shown, timeout=40, interval=0.3, what="the killed worker's attempts to show their fate")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; its row: {seen.get('row')}") from None
    assert "worker lost" in html and "retried elsewhere: attempt 2" in html
    assert TaskRun.objects.get(run_id=retried).worker == survivor.name
    assert TaskRun.objects.get(run_id=failed).status == "FAILURE"
    survivor_row = row(client.get("/workers/").content.decode(), survivor.name)
    assert 'data-state="live"' in survivor_row and f'data-run="{retried}"' in survivor_row

    # The sleeps would hold the workers' shutdown: cancel what still runs.
    assert api.post("/api/runs/cancel/", {"status": "RUNNING"}, format="json").status_code == 200


def factories_user():
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_user(username="viewer", password="pw-viewer-123")
