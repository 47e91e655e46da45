"""The engine's decisions, without a database: trigger rules, settling, retries, a run's end,
admission, and random DAGs played to their end through the same functions the engine calls."""

from __future__ import annotations

import random
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tests.kinds  # noqa: F401 - registers the `noop` kind
from workflows_app.definitions import DefinitionError, definition_validate, find_cycle
from workflows_app.engine import kinds, rules
from workflows_app.engine.graph import graph_from_spec
from workflows_app.engine.rules import FINAL, NodeState, RunContext, S
from workflows_app.models import TriggerRule

KNOWN = {"t.echo"}


# Per rule, predecessors' statuses (letters: Success, Failure, Upstream failed, sKipped, Revoked) and
# what the rule makes of the node once they are final, case by case as Airflow documents them:
# https://airflow.apache.org/docs/apache-airflow/stable/core-concepts/dags.html#trigger-rules (what each
# rule needs) and #concepts-branching / "Trigger Rules" ("all_success ... skipped tasks will cascade
# through"; a rule not met by a failure makes the node upstream_failed, else skipped), as Airflow's
# `TriggerRuleDep._evaluate_direct_relatives` decides it. UPSTREAM_FAILED counts as failed (Airflow:
# "failed or upstream_failed"); REVOKED, which Airflow has not, counts as failed too.
TRIGGER_CASES = {
    # "All upstream tasks have succeeded"; a failure upstream_fails it, a skip skips it (cascade).
    "all_success": {
        "": "run",
        "SS": "run",
        "SF": "UPSTREAM_FAILED",
        "SU": "UPSTREAM_FAILED",
        "SK": "SKIPPED",
        "KF": "UPSTREAM_FAILED",
        "SR": "UPSTREAM_FAILED",
    },
    # "All upstream tasks are in a failed or upstream_failed state"; a success or a skip skips it.
    "all_failed": {"FU": "run", "FF": "run", "FS": "SKIPPED", "KF": "SKIPPED", "SS": "SKIPPED"},
    # "All upstream tasks are done with their execution."
    "all_done": {"FK": "run", "R": "run", "SS": "run", "UK": "run"},
    # "All upstream tasks are in a skipped state"; anything else skips it.
    "all_skipped": {"KK": "run", "KF": "SKIPPED", "KS": "SKIPPED", "U": "SKIPPED"},
    # "At least one upstream task has succeeded"; none did: skipped if all were skipped, else upstream_failed.
    "one_success": {"FS": "run", "KS": "run", "FF": "UPSTREAM_FAILED", "FK": "UPSTREAM_FAILED", "KK": "SKIPPED"},
    # "At least one upstream task has failed"; none did: skipped.
    "one_failed": {"SU": "run", "R": "run", "KF": "run", "SK": "SKIPPED", "SS": "SKIPPED", "KK": "SKIPPED"},
    # "At least one upstream task succeeded or failed"; none did (all skipped): skipped.
    "one_done": {"KF": "run", "KS": "run", "U": "run", "KK": "SKIPPED"},
    # "All upstream tasks have not failed or upstream_failed - that is, all ... succeeded or been skipped".
    "none_failed": {"SK": "run", "KK": "run", "SS": "run", "SF": "UPSTREAM_FAILED", "KU": "UPSTREAM_FAILED"},
    # As none_failed, "and at least one upstream task has succeeded"; all skipped: skipped.
    "none_failed_min_one_success": {
        "KS": "run",
        "SS": "run",
        "KK": "SKIPPED",
        "SU": "UPSTREAM_FAILED",
        "KF": "UPSTREAM_FAILED",
    },
    # "No upstream task is in a skipped state - that is, all ... in a success, failed, or upstream_failed state".
    "none_skipped": {"SF": "run", "SU": "run", "SS": "run", "SK": "SKIPPED", "FK": "SKIPPED"},
    # "No dependencies at all, run this task at any time" (here: once its predecessors are final).
    "always": {"U": "run", "KKK": "run", "F": "run", "S": "run"},
}
LETTERS = {"S": "SUCCESS", "F": "FAILURE", "U": "UPSTREAM_FAILED", "K": "SKIPPED", "R": "REVOKED"}


@pytest.mark.parametrize(
    ("rule", "upstream", "expected"),
    [
        (rule, [LETTERS[c] for c in statuses], expected)
        for rule, cases in TRIGGER_CASES.items()
        for statuses, expected in cases.items()
    ],
)
def test_trigger(rule, upstream, expected):
    assert rules.trigger(rule, upstream) == expected


def test_every_trigger_rule_a_definition_accepts_has_a_meaning():
    assert set(TriggerRule.values) == set(rules.TRIGGER_RULES)


def test_retry_delay_doubles_until_the_retries_are_spent():
    graph = graph_from_spec(
        {"name": "r", "nodes": [{"key": "a", "max_retries": 2, "retry_delay": 1.5}], "edges": []}, version=1
    )
    node = graph.nodes["a"]
    assert [rules.retry_delay(node, attempt) for attempt in (1, 2, 3)] == [1.5, 3.0, None]
    assert rules.attempt_outcome(node, attempt=3, succeeded=False, error="x") == rules.Outcome("FAILURE", error="x")


def test_run_outcome():
    assert rules.run_outcome(["SUCCESS", "SKIPPED"]) == "SUCCESS"
    assert rules.run_outcome(["SUCCESS", "UPSTREAM_FAILED"]) == "FAILED"
    assert rules.run_outcome(["SUCCESS", "QUEUED"]) is None


def test_admission_counts_the_slots_free_and_held():
    assert rules.free_slots(concurrency=3, held=3, released=1) == 1
    assert rules.free_slots(concurrency=5, held=1, released=0, room=2) == 2
    assert rules.free_slots(concurrency=1, held=4, released=1) == 0
    assert rules.free_slots(concurrency=4, held=0, released=0, room=-1) == 0
    assert rules.held_after(held=1, released=2, admitted=0) == 0


def graph_of(nodes: list[dict], edges: list[list[str]]):
    return graph_from_spec(
        {"name": "g", "nodes": [{"event_type": "q", "task": "t.echo", **n} for n in nodes], "edges": edges}, version=1
    )


def test_a_success_settles_a_successor_by_its_trigger_rule():
    """A node that needs a failure is skipped after a success: the decision is the rule's, even when
    the successor waits on this node alone."""
    graph = graph_of(
        [
            {"key": "a"},
            {"key": "b", "trigger_rule": "one_failed"},
            {"key": "c"},
            {"key": "d", "trigger_rule": "all_done"},
        ],
        [["a", "b"], ["b", "c"], ["b", "d"]],
    )
    run = RunContext("t", {"p": 1}, graph)
    plan = rules.plan_finish(run, "a", rules.Outcome("SUCCESS", result=7), {})
    assert [(s.node, s.status) for s in plan.steps] == [("b", "SKIPPED"), ("c", "SKIPPED"), ("d", "QUEUED")]
    assert plan.steps[2].event["context"]["upstream"] == {"b": None}
    assert plan.expect == {"b": "WAITING", "c": "WAITING", "d": "WAITING"} and not plan.may_end


def test_a_join_needs_its_other_predecessors_then_expects_what_it_read():
    graph = graph_of([{"key": k} for k in "abcd"], [["a", "c"], ["b", "c"], ["c", "d"]])
    run = RunContext("t", {}, graph)
    assert rules.plan_finish(run, "a", rules.Outcome("SUCCESS"), {}) == {"b"}
    plan = rules.plan_finish(run, "a", rules.Outcome("SUCCESS", result=1), {"b": NodeState("SUCCESS", 2)})
    assert [(s.node, s.status) for s in plan.steps] == [("c", "QUEUED")]
    assert plan.steps[0].event["context"]["upstream"] == {"a": 1, "b": 2}
    assert plan.expect == {"b": "SUCCESS", "c": "WAITING"} and plan.types == ["q"]


def test_a_kind_that_needs_no_worker_ends_at_once_and_its_successors_follow():
    graph = graph_of([{"key": "a"}, {"key": "n", "kind": "noop"}, {"key": "b"}], [["a", "n"], ["n", "b"]])
    plan = rules.plan_finish(RunContext("t", {}, graph), "a", rules.Outcome("SUCCESS"), {})
    assert [(s.node, s.status) for s in plan.steps] == [("n", "SUCCESS"), ("b", "QUEUED")]
    assert plan.steps[1].event["context"]["upstream"] == {"n": {"upstream": ["a"]}}


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
        "kind": "task",
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
                    {"key": "c", "kind": "teleport"},
                ],
                "edges": [["a", "b"], ["b", "a"]],
            },
            known_tasks=KNOWN,
        )
    messages = " | ".join(caught.value.errors)
    for needle in (
        "name must be a slug",
        "unknown task 'nope'",
        "timeout must be",
        "cycle: ",
        "unknown kind 'teleport'",
    ):
        assert needle in messages


def test_the_reconciler_is_installed_as_a_beat_schedule():
    from config.celery import app
    from workflows_app import tasks

    entry = app.conf.beat_schedule["eventflow-reconcile"]
    assert entry["task"] == tasks.reconcile.name == "workflows_app.tasks.reconcile" and entry["schedule"] > 0
    assert app.conf.task_acks_late is True and app.conf.worker_prefetch_multiplier == 1


# --------------------------------------------------------------------------- random DAGs, played out


@st.composite
def dags(draw):
    """A random DAG (edges go from lower to higher index), each node with a random trigger rule and
    kind, some task nodes mapped over a list of the payload, some edges (from unmapped nodes) with a
    condition on their source's result, and a random outcome for each attempt it may make."""
    size = draw(st.integers(1, 9))
    keys = [f"n{i}" for i in range(size)]
    nodes = [
        {
            "key": key,
            "kind": draw(st.sampled_from(["task", "task", "task", "noop", "delay", "approval"])),
            "trigger_rule": draw(st.sampled_from(sorted(rules.TRIGGER_RULES))),
            "max_retries": draw(st.integers(0, 2)),
            "event_type": draw(st.sampled_from(["q1", "q2"])),
        }
        for key in keys
    ]
    for node in nodes:
        if node["kind"] in ("delay", "approval"):  # they wait without a worker, and are not retried
            node.update(event_type=None, max_retries=0, **({"seconds": 1} if node["kind"] == "delay" else {}))
    payload = {}
    for node in nodes:
        if node["kind"] == "task" and draw(st.integers(0, 3)) == 0:
            node["map_over"] = f"payload.{node['key']}"
            payload[node["key"]] = list(range(draw(st.integers(0, 3))))
    edges = []
    for i in range(size):
        for j in range(i + 1, size):
            if draw(st.booleans()):
                # On the result of a task that is not mapped: `{"go": bool}`.
                plain = nodes[i]["kind"] == "task" and "map_over" not in nodes[i]
                conditional = plain and draw(st.integers(0, 2)) == 0
                edges.append(
                    {"from": keys[i], "to": keys[j], "when": "result.go"} if conditional else [keys[i], keys[j]]
                )
    go = {key: draw(st.booleans()) for key in keys}
    outcomes = {key: draw(st.lists(st.booleans(), min_size=3, max_size=3)) for key in keys}
    order = draw(st.randoms(use_true_random=False))
    return graph_of(nodes, edges), payload, go, outcomes, order


class Simulated:
    """A run's rows, kept in memory, changed only by applying the plans `rules` makes, as the
    database does (checking `expect`, and `open` for a mapped node's instance, first)."""

    def __init__(self, graph, payload=None):
        self.graph = graph
        self.run = RunContext("trace", payload or {"in": 1}, graph)
        self.states: dict[str, NodeState] = dict.fromkeys(graph.nodes, rules.WAITING)
        self.attempts: dict[str | tuple[str, int], int] = dict.fromkeys(graph.nodes, 0)
        self.instances: dict[str, list[NodeState]] = {}
        self.decided: list[str] = []

    def apply(self, plan, ending: tuple[str, int] | None = None) -> bool:
        """Carry `plan` out, or answer False (STALE) when a mapped node is taken to go on while no
        instance but the one `ending` is unfinished."""
        for node, status in plan.expect.items():
            assert self.states[node].status == status, f"{node}: expected {status}, is {self.states[node]}"
        if plan.open:
            node, index = ending
            if all(s.status in FINAL for i, s in enumerate(self.instances[node]) if i != index):
                return False
        for step in plan.steps:
            expected = plan.expect.get(step.node, S.WAITING)
            assert self.states[step.node].status == expected, f"{step.node} decided twice"
            if expected == S.WAITING:
                self.decided.append(step.node)
            self.states[step.node] = NodeState(step.status, step.result)
            if step.status == S.QUEUED:
                self.attempts[step.node] = 1
            if step.instances:
                self.instances[step.node] = [NodeState(S.QUEUED) for _ in step.instances]
                for instance in step.instances:
                    self.attempts[step.node, instance.map_index] = 1
        return True

    def read(self, nodes) -> Mapping[str, NodeState]:
        return {n: self.states[n] for n in nodes}


def _finish(sim: Simulated, key: str, outcome, index: int | None) -> None:
    """What `transitions.task_run_finish` does with an outcome: decide, read what is needed, decide again."""
    read: dict[str, NodeState] = {}
    instances = None
    while True:
        plan = rules.plan_finish(sim.run, key, outcome, read, map_index=index, instances=instances)
        if isinstance(plan, set):
            read.update(sim.read(plan))  # what the engine reads when the Event alone cannot decide
            continue
        if sim.apply(plan, (key, index)):
            return
        instances = list(sim.instances[key])  # STALE: read the instances and decide again


@settings(max_examples=300, deadline=None)
@given(dags())
def test_a_random_dag_with_random_outcomes_ends_with_every_node_final_as_the_rules_say(case):
    graph, payload, go, outcomes, order = case
    sim = Simulated(graph, payload)
    sim.apply(rules.plan_start(sim.run))
    while running := [(k, None) for k, s in sim.states.items() if s.status in (S.QUEUED, S.DEFERRED)] + [
        (k, i) for k, states in sim.instances.items() for i, s in enumerate(states) if s.status == S.QUEUED
    ]:
        key, index = order.choice(running)
        handle = key if index is None else (key, index)
        attempt = sim.attempts[handle]
        succeeded = outcomes[key][attempt - 1]
        result = {"go": go[key]} if index is None else index
        node = graph.nodes[key]
        if node.kind == "delay":  # its wait ends: what its kind makes of that
            outcome = kinds.kind_of("delay").due(node)
        else:  # a task's attempt, or a person's decision on an approval
            outcome = rules.attempt_outcome(node, attempt=max(attempt, 1), succeeded=succeeded, result=result)
        if outcome.status == S.RETRY:
            sim.attempts[handle] += 1
            continue
        if index is None:
            sim.states[key] = NodeState(outcome.status, outcome.result)
        else:
            sim.instances[key][index] = NodeState(outcome.status, outcome.result)
        _finish(sim, key, outcome, index)

    assert all(s.status in FINAL for s in sim.states.values())
    assert all(s.status in FINAL for states in sim.instances.values() for s in states)
    assert sorted(sim.decided) == sorted(graph.nodes)  # every node decided exactly once
    for key, state in sim.states.items():
        preds = [
            S.SKIPPED
            if sim.states[p].status == S.SUCCESS and (p, key) in graph.conditions and not go[p]
            else sim.states[p].status
            for p in graph.preds[key]
        ]
        verdict = rules.trigger(graph.nodes[key].trigger_rule, preds)
        if verdict != rules.RUN:
            assert state.status == verdict
        elif rules.mapped(graph.nodes[key]):
            instances = sim.instances.get(key, [])
            assert len(instances) == len(payload[key])
            if not instances:
                assert state.status == S.SKIPPED
            else:
                ended = rules.map_outcome(instances)
                assert (state.status, state.result) == (ended.status, ended.result)
        else:
            assert state.status in (S.SUCCESS, S.FAILURE)
            assert state.status == S.SUCCESS or graph.nodes[key].kind in ("task", "approval")
    statuses = [s.status for s in sim.states.values()]
    expected = "FAILED" if any(s in ("FAILURE", "UPSTREAM_FAILED") for s in statuses) else "SUCCESS"
    assert rules.run_outcome(statuses) == expected


def test_deciding_from_the_event_alone_and_from_every_row_read_agree():
    """The one-call path takes a node's descendants as WAITING; reading every row gives the same plan."""
    rng = random.Random(7)
    for _ in range(200):
        size = rng.randint(2, 8)
        keys = [f"n{i}" for i in range(size)]
        edges = [[keys[i], keys[j]] for i in range(size) for j in range(i + 1, size) if rng.random() < 0.4]
        graph = graph_of([{"key": k, "trigger_rule": rng.choice(sorted(rules.TRIGGER_RULES))} for k in keys], edges)
        node = keys[0]
        states = {k: rules.WAITING for k in keys}
        outcome = rules.Outcome(rng.choice(["SUCCESS", "FAILURE"]), result=1)
        run = RunContext("t", {}, graph)
        read = {}
        while isinstance(alone := rules.plan_finish(run, node, outcome, read), set):
            read.update({k: states[k] for k in alone})
        every = rules.plan_finish(run, node, outcome, {k: v for k, v in states.items() if k != node})
        strip = lambda plan: [(s.node, s.status) for s in plan.steps]  # noqa: E731
        assert strip(alone) == strip(every)


# --------------------------------------------------------------------------- branches and maps


def test_a_false_condition_counts_its_edge_as_skipped_and_a_failing_one_fails_the_target():
    # a -> b (when result.go), a -> c; b, c -> d (none_failed)
    graph = graph_from_spec(
        {
            "name": "g",
            "nodes": [
                {"key": k, "event_type": "q", "task": "t.echo", **({"trigger_rule": "none_failed"} if k == "d" else {})}
                for k in "abcd"
            ],
            "edges": [{"from": "a", "to": "b", "when": "result.go"}, ["a", "c"], ["b", "d"], ["c", "d"]],
        },
        version=1,
    )
    run = RunContext("t", {}, graph)
    plan = rules.plan_finish(run, "a", rules.Outcome("SUCCESS", result={"go": False}), {})
    assert [(s.node, s.status) for s in plan.steps] == [("b", "SKIPPED"), ("c", "QUEUED")]
    assert (
        plan.steps[0].error == "trigger rule all_success not met: the condition of edge a -> b (`result.go`) was false"
    )
    assert plan.steps[1].event["context"]["upstream"] == {"a": {"go": False}}
    plan = rules.plan_finish(run, "a", rules.Outcome("SUCCESS", result={"go": True}), {})
    assert [(s.node, s.status) for s in plan.steps] == [("b", "QUEUED"), ("c", "QUEUED")]
    plan = rules.plan_finish(run, "a", rules.Outcome("SUCCESS", result={"went": 1}), {})
    assert (plan.steps[0].node, plan.steps[0].status) == ("b", "FAILURE")
    assert "edge a -> b: when `result.go` failed" in plan.steps[0].error
    plan = rules.plan_finish(run, "a", rules.Outcome("SUCCESS", result={"go": "yes"}), {})
    assert "gave a string, not a bool" in plan.steps[0].error
    # A failed source: the condition is not read, the rule decides.
    plan = rules.plan_finish(run, "a", rules.Outcome("FAILURE", error="x"), {})
    assert [(s.node, s.status) for s in plan.steps] == [
        ("b", "UPSTREAM_FAILED"),
        ("c", "UPSTREAM_FAILED"),
        ("d", "UPSTREAM_FAILED"),
    ]


def mapped_graph():
    # m (map_over payload.items) -> after
    return graph_of([{"key": "m", "map_over": "payload.items"}, {"key": "after"}], [["m", "after"]])


def test_an_instance_event_holds_its_element_and_not_the_list_it_maps_over():
    graph = graph_from_spec(
        {
            "name": "g",
            "nodes": [
                {"key": "src", "event_type": "q", "task": "t.echo"},
                {
                    "key": "m",
                    "event_type": "q",
                    "task": "t.echo",
                    "map_over": "upstream.src.images",
                    "params": {"k": 1},
                },
            ],
            "edges": [["src", "m"]],
        },
        version=1,
    )
    run = RunContext("t", {"sku": "A-1"}, graph)
    plan = rules.plan_finish(run, "src", rules.Outcome("SUCCESS", result={"images": ["a", "b"], "n": 2}), {})
    first = plan.instances[0].event
    assert first["payload"] == {"sku": "A-1", "k": 1}
    assert first["context"]["upstream"] == {"src": {"n": 2}}
    assert (first["context"]["map_index"], first["context"]["item"]) == (0, "a")


def test_a_mapped_node_starts_one_queued_instance_per_element_with_its_index_and_item():
    plan = rules.plan_start(RunContext("t", {"items": ["x", "y"]}, mapped_graph()))
    (node,) = plan.steps
    assert (node.node, node.status, node.trim) == ("m", "STARTED", 2)
    assert [(i.map_index, i.status, i.event["context"]["item"]) for i in plan.instances] == [
        (0, "QUEUED", "x"),
        (1, "QUEUED", "y"),
    ]
    assert plan.types == ["q"] and plan.queued == [] and not plan.may_end
    assert len({e["event_id"] for e in plan.events}) == 2


@pytest.mark.parametrize(
    ("payload", "status", "error"),
    [
        ({"items": []}, "SKIPPED", "map_over `payload.items` gave an empty list"),
        ({"items": [1, 2, 3]}, "FAILURE", "map_over `payload.items` gave 3 elements, more than the 2 allowed"),
        ({"items": {"a": 1}}, "FAILURE", "map_over `payload.items` gave a map, not a list"),
        ({}, "FAILURE", 'map_over `payload.items` failed: Key not found in map : "items"'),
    ],
)
def test_a_mapped_node_with_no_element_is_skipped_and_with_too_many_or_a_failing_expression_fails(
    payload, status, error
):
    plan = rules.plan_start(RunContext("t", payload, mapped_graph(), max_map_items=2))
    assert (plan.steps[0].status, plan.steps[0].error, plan.steps[0].trim) == (status, error, 0)
    assert plan.steps[1].node == "after"


def test_an_instance_ends_its_node_only_when_it_is_the_last_and_the_node_takes_their_results():
    run = RunContext("t", {}, mapped_graph())
    done = rules.Outcome("SUCCESS", result="r1")
    # Not read: the node is taken to go on, and the database is asked to confirm it.
    plan = rules.plan_finish(run, "m", done, {}, map_index=1)
    assert (plan.steps, plan.open, plan.types) == ([], "m", ["q"])
    others = [NodeState("SUCCESS", "r0"), NodeState("STARTED"), NodeState("QUEUED")]
    assert rules.plan_finish(run, "m", done, {}, map_index=1, instances=others).open == "m"
    last = [NodeState("SUCCESS", "r0"), NodeState("STARTED"), NodeState("SUCCESS", "r2")]
    plan = rules.plan_finish(run, "m", done, {}, map_index=1, instances=last)
    assert plan.open is None
    assert [(s.node, s.status, s.result) for s in plan.steps][0] == ("m", "SUCCESS", ["r0", "r1", "r2"])
    assert plan.steps[1].event["context"]["upstream"] == {"m": ["r0", "r1", "r2"]}
    assert plan.expect["m"] == "STARTED"
    failed = [NodeState("FAILURE"), NodeState("STARTED"), NodeState("SUCCESS", "r2")]
    plan = rules.plan_finish(run, "m", done, {}, map_index=1, instances=failed)
    assert [(s.node, s.status) for s in plan.steps] == [("m", "FAILURE"), ("after", "UPSTREAM_FAILED")]
    assert plan.steps[0].error == "1 of 3 instances did not succeed"
    assert plan.may_end


def test_a_retry_runs_again_only_the_instances_that_did_not_succeed():
    graph = graph_from_spec(
        {
            "name": "g",
            "nodes": [
                {"key": "src", "event_type": "q", "task": "t.echo"},
                {"key": "m", "event_type": "q", "task": "t.echo", "map_over": "upstream.src"},
                {"key": "after", "event_type": "q", "task": "t.echo"},
            ],
            "edges": [["src", "m"], ["m", "after"]],
        },
        version=1,
    )
    run = RunContext("t", {}, graph)
    states = {"src": NodeState("SUCCESS", ["a", "b", "c"]), "m": rules.WAITING, "after": rules.WAITING}
    instances = {"m": [NodeState("SUCCESS", 1), NodeState("FAILURE"), NodeState("REVOKED")]}
    plan = rules.plan_rerun(run, states, ["m", "after"], instances)
    (node,) = plan.steps
    assert (node.node, node.status, node.trim) == ("m", "STARTED", None)
    assert [(i.map_index, i.event["context"]["item"]) for i in plan.instances] == [(1, "b"), (2, "c")]
    # Its predecessor runs again too: the node waits for it, and will map what it gives then.
    states["src"] = rules.WAITING
    plan = rules.plan_rerun(run, states, ["src", "m", "after"], instances)
    assert [(s.node, s.status) for s in plan.steps] == [("src", "QUEUED")]
