"""Pure rules of the engine: trigger decisions, graph snapshots, definition validation."""

import pytest

from workflows_app.definitions import DefinitionError, definition_validate, find_cycle
from workflows_app.engine import graph_from_spec, trigger_decision

KNOWN = {"t.echo"}


@pytest.mark.parametrize(
    ("rule", "upstream", "expected"),
    [
        ("all_success", [], "QUEUED"),
        ("all_success", ["SUCCESS", "SUCCESS"], "QUEUED"),
        ("all_success", ["SUCCESS", "FAILURE"], "UPSTREAM_FAILED"),
        ("all_success", ["SUCCESS", "UPSTREAM_FAILED"], "UPSTREAM_FAILED"),
        ("all_success", ["SUCCESS", "SKIPPED"], "SKIPPED"),
        ("all_success", ["SKIPPED", "FAILURE"], "UPSTREAM_FAILED"),
        ("one_success", ["FAILURE", "SUCCESS"], "QUEUED"),
        ("one_success", ["FAILURE", "FAILURE"], "UPSTREAM_FAILED"),
        ("one_success", ["SKIPPED", "SKIPPED"], "SKIPPED"),
        ("all_done", ["FAILURE", "SKIPPED"], "QUEUED"),
        ("all_done", ["REVOKED"], "QUEUED"),
    ],
)
def test_trigger_decision(rule, upstream, expected):
    assert trigger_decision(rule, upstream) == expected


def test_graph_from_spec_maps_both_directions():
    graph = graph_from_spec(
        {
            "name": "d",
            "nodes": [{"key": k, "task": "t.echo", "event_type": "q"} for k in "abcd"],
            "edges": [["a", "b"], ["a", "c"], ["b", "d"], ["c", "d"]],
        },
        version=3,
    )
    assert graph.roots == ["a"]
    assert graph.preds["d"] == ("b", "c") and graph.succs["a"] == ("b", "c")
    assert graph.nodes["d"].trigger_rule == "all_success" and graph.version == 3


def test_find_cycle_names_the_cycle_in_order():
    assert find_cycle("abc", [["a", "b"], ["b", "c"], ["c", "a"]]) == ["a", "b", "c", "a"]
    assert find_cycle("abc", [["a", "b"], ["b", "c"]]) is None


def test_validate_fills_defaults_and_collects_every_error():
    spec = definition_validate(
        {"name": "ok", "nodes": [{"key": "a", "task": "t.echo", "event_type": "q"}]}, known_tasks=KNOWN
    )
    assert spec["nodes"][0] == {
        "key": "a",
        "event_type": "q",
        "max_retries": 0,
        "params": {},
        "retry_delay": 1.0,
        "task": "t.echo",
        "timeout": None,
        "trigger_rule": "all_success",
    }
    with pytest.raises(DefinitionError) as caught:
        definition_validate(
            {
                "name": "bad name!",
                "nodes": [
                    {"key": "a", "task": "nope", "event_type": "q"},
                    {"key": "b", "task": "t.echo", "event_type": "q", "timeout": 0},
                ],
                "edges": [["a", "b"], ["b", "a"]],
            },
            known_tasks=KNOWN,
        )
    messages = " | ".join(caught.value.errors)
    for needle in ("name must be a slug", "unknown task 'nope'", "timeout must be", "cycle: "):
        assert needle in messages


def test_the_reconciler_is_installed_as_a_beat_schedule():
    from config.celery import app
    from workflows_app import tasks

    entry = app.conf.beat_schedule["eventflow-reconcile"]
    assert entry["task"] == tasks.reconcile.name == "workflows_app.tasks.reconcile" and entry["schedule"] > 0
    assert app.conf.task_acks_late is True and app.conf.worker_prefetch_multiplier == 1
