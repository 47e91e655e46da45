"""End to end: branches and fan-out on real worker processes, driven through the public API."""

from __future__ import annotations

import uuid

import pytest

import tests.e2e_tasks  # noqa: F401 - registers the test tasks here as the workers' --include does there
from tests import factories
from tests.e2e import trigger, wait_final
from tests.e2e_tasks import _redis
from workflows_app.models import TaskRun

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

ECHO, ITEM = "workflows_app.tasks.echo", "tests.e2e_tasks.item"


def nodes_of(trace_id: str) -> dict[str, TaskRun]:
    return {t.node_key: t for t in TaskRun.objects.filter(run_id=trace_id, map_index=None)}


def instances_of(trace_id: str, key: str) -> list[TaskRun]:
    found = TaskRun.objects.filter(run_id=trace_id, node_key=key, map_index__isnull=False)
    return list(found.select_related("current_event").order_by("map_index"))


def fan(*, concurrency: int) -> None:
    """each (one instance per element of the payload's items) -> collect, on the `e2e` type."""
    factories.workflow(
        factories.spec(
            "fan",
            [{"key": "each", "task": ITEM, "map_over": "payload.items"}, {"key": "collect", "task": ECHO}],
            [["each", "collect"]],
            event_type="e2e",
            event_types={"e2e": {"concurrency": concurrency}},
        )
    )


def most_at_once(tasks: list[TaskRun]) -> int:
    """The most tasks running at one instant, from their stored start and end times."""
    edges = sorted([(t.started_at, 1) for t in tasks] + [(t.finished_at, -1) for t in tasks])
    running = peak = 0
    for _, change in edges:  # at equal times an end (-1) sorts before a start
        running += change
        peak = max(peak, running)
    return peak


def test_a_false_condition_skips_its_branch_and_a_failing_one_fails_its_target(workers, api):
    # check -> ship (when result.payload.ship), ship -> notify; check -> archive; {notify, archive} -> done
    edges = [
        {"from": "check", "to": "ship", "when": "result.payload.ship"},
        ["ship", "notify"],
        ["check", "archive"],
        ["notify", "done"],
        ["archive", "done"],
    ]
    nodes = [(k, ECHO) for k in ("check", "ship", "notify", "archive")]
    nodes.append({"key": "done", "task": ECHO, "trigger_rule": "none_failed_min_one_success"})
    factories.workflow(factories.spec("branch", nodes, edges, event_type="e2e"))
    bad = [{"from": "check", "to": "ship", "when": "result.payload.missing"}, *edges[1:]]
    factories.workflow(factories.spec("badbranch", nodes, bad, event_type="e2e"))
    workers(["e2e"], concurrency=2)

    skipped, taken, failing = (
        trigger(api, "branch", {"ship": False}),
        trigger(api, "branch", {"ship": True}),
        trigger(api, "badbranch", {"ship": True}),
    )
    assert wait_final([skipped, taken, failing]) == {skipped: "SUCCESS", taken: "SUCCESS", failing: "FAILED"}

    statuses = {k: t.status for k, t in nodes_of(skipped).items()}
    assert statuses == {
        "check": "SUCCESS",
        "ship": "SKIPPED",
        "notify": "SKIPPED",
        "archive": "SUCCESS",
        "done": "SUCCESS",
    }
    assert "`result.payload.ship`" in nodes_of(skipped)["ship"].error
    assert {t.status for t in nodes_of(taken).values()} == {"SUCCESS"}
    failed = nodes_of(failing)["ship"]
    assert failed.status == "FAILURE" and failed.attempts == 0
    assert "edge check -> ship: when `result.payload.missing` failed" in failed.error
    detail = api.get(f"/api/runs/{failing}/").json()
    assert any("result.payload.missing" in t["error"] for t in detail["tasks"] if t["node"] == "ship")


def test_a_map_of_200_holds_its_types_concurrency_and_hands_the_results_on_in_order(workers, api):
    # each (map_over payload.items, concurrency 3) -> collect
    fan(concurrency=3)
    workers(["e2e"], concurrency=4)
    workers(["e2e"], concurrency=4)
    items = [f"img-{i}" for i in range(200)]
    trace_id = trigger(api, "fan", {"items": items})
    assert wait_final([trace_id], timeout=120) == {trace_id: "SUCCESS"}

    rows = instances_of(trace_id, "each")
    assert [t.map_index for t in rows] == list(range(200))
    assert all(t.status == "SUCCESS" and t.attempts == 1 for t in rows)
    assert most_at_once(rows) <= 3
    assert len({t.current_event_id for t in rows}) == 200
    contexts = [t.current_event.context for t in rows]
    assert [(c["map_index"], c["item"]) for c in contexts] == list(enumerate(items))
    expected = [{"index": i, "item": item} for i, item in enumerate(items)]
    assert nodes_of(trace_id)["each"].result == expected
    assert nodes_of(trace_id)["collect"].result["upstream"] == {"each": expected}

    detail = api.get(f"/api/runs/{trace_id}/").json()
    indexes = [t["map_index"] for t in detail["tasks"] if t["node"] == "each"]
    assert indexes == [None, *range(200)]
    assert not TaskRun.objects.filter(holds_slot=True).exists()


def test_an_empty_map_skips_its_node_and_too_many_elements_fail_it(workers, api):
    fan(concurrency=1)
    workers(["e2e"], concurrency=2)
    empty, huge = trigger(api, "fan", {"items": []}), trigger(api, "fan", {"items": list(range(10_001))})
    assert wait_final([empty, huge]) == {empty: "SUCCESS", huge: "FAILED"}
    assert {k: t.status for k, t in nodes_of(empty).items()} == {"each": "SKIPPED", "collect": "SKIPPED"}
    failed = nodes_of(huge)["each"]
    assert failed.status == "FAILURE"
    assert "10001 elements, more than the 10000 allowed" in failed.error
    assert not TaskRun.objects.filter(map_index__isnull=False).exists()


def test_a_failed_instance_retried_through_the_api_runs_again_alone(workers, api):
    fan(concurrency=4)
    workers(["e2e"], concurrency=4)
    flag = str(uuid.uuid4())
    _redis().set(f"broken:{flag}", 1, ex=300)
    trace_id = trigger(api, "fan", {"items": list(range(6)), "bad": 3, "flag": flag})
    assert wait_final([trace_id]) == {trace_id: "FAILED"}
    before = {t.map_index: (t.status, t.current_event_id, t.finished_at) for t in instances_of(trace_id, "each")}
    assert [before[i][0] for i in range(6)] == ["SUCCESS"] * 3 + ["FAILURE"] + ["SUCCESS"] * 2
    assert nodes_of(trace_id)["each"].error == "1 of 6 instances did not succeed"
    assert nodes_of(trace_id)["collect"].status == "UPSTREAM_FAILED"

    _redis().delete(f"broken:{flag}")
    response = api.post(f"/api/runs/{trace_id}/retry/")
    assert response.status_code == 200, response.content
    assert wait_final([trace_id]) == {trace_id: "SUCCESS"}
    after = {t.map_index: (t.status, t.current_event_id, t.finished_at) for t in instances_of(trace_id, "each")}
    assert after[3][0] == "SUCCESS" and after[3][1] != before[3][1]
    assert all(after[i] == before[i] for i in (0, 1, 2, 4, 5))  # the others did not run again
    assert nodes_of(trace_id)["collect"].result["upstream"]["each"][3] == {"index": 3, "item": 3}
