"""The engine's decisions, as plain functions of what they decide on: no database, no clock, no broker.

Which successors become ready and what becomes of them (trigger rules, node kinds), whether a failed
attempt is retried and after how long, who is admitted from an event type's line, and when a run ends.
`transitions` gathers the inputs, asks these functions, and has the database carry the answers out
(`sql`); the statements that must decide inside the database for speed (admission, the run's end) are
built from the constants here and checked against these functions by the test suite.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..models import TaskRun, WorkflowRun
from . import kinds
from .graph import Graph, NodeSpec

S = TaskRun.Status
R = WorkflowRun.Status

FINAL = frozenset(TaskRun.FINAL)
# Predecessors' statuses a trigger rule counts as failed.
FAILED = frozenset({S.FAILURE, S.UPSTREAM_FAILED, S.REVOKED})
# A run that ends with a task in one of these is FAILED, else SUCCESS (SKIPPED does not fail a run).
RUN_FAILS_ON = frozenset({S.FAILURE, S.UPSTREAM_FAILED})
# Tasks a retry of a failed or canceled run runs again; successes and their results stay.
RERUN = frozenset({S.FAILURE, S.UPSTREAM_FAILED, S.REVOKED, S.SKIPPED})
# Statuses of an attempt that may still record an outcome.
LIVE = frozenset({S.QUEUED, S.STARTED, S.RETRY})
# The order of an event type's waiting line: first ready, first admitted; `id` breaks ties.
LINE_ORDER = ("queued_at", "id")
# What a node whose trigger rule is met does next: whatever its kind says (`NodeKind.ready`).
RUN = "run"


# --------------------------------------------------------------------------- trigger rules


class Upstream(NamedTuple):
    """Predecessors' final statuses, counted as trigger rules read them."""

    total: int
    success: int
    failed: int
    skipped: int

    @classmethod
    def of(cls, statuses: Sequence[str]) -> Upstream:
        return cls(
            total=len(statuses),
            success=sum(s == S.SUCCESS for s in statuses),
            failed=sum(s in FAILED for s in statuses),
            skipped=sum(s == S.SKIPPED for s in statuses),
        )


class TriggerRule(NamedTuple):
    met: Callable[[Upstream], bool]
    # When not met: a failed predecessor makes the node UPSTREAM_FAILED if failures are what the
    # rule could not have (all_success), and SKIPPED if they were what it waited for (one_failed).
    broken_by_failure: bool


# Airflow's trigger rules, with Airflow's meaning, evaluated once every predecessor is final.
TRIGGER_RULES: Mapping[str, TriggerRule] = {
    "all_success": TriggerRule(lambda u: u.success == u.total, True),
    "all_failed": TriggerRule(lambda u: u.failed == u.total, False),
    "all_done": TriggerRule(lambda u: True, False),
    "all_skipped": TriggerRule(lambda u: u.skipped == u.total, False),
    "one_success": TriggerRule(lambda u: u.success >= 1, True),
    "one_failed": TriggerRule(lambda u: u.failed >= 1, False),
    "one_done": TriggerRule(lambda u: u.success + u.failed >= 1, False),
    "none_failed": TriggerRule(lambda u: u.failed == 0, True),
    "none_failed_min_one_success": TriggerRule(lambda u: u.failed == 0 and u.success >= 1, True),
    "none_skipped": TriggerRule(lambda u: u.skipped == 0, False),
    "always": TriggerRule(lambda u: True, False),
}


def trigger(rule: str, upstream: Sequence[str]) -> str:
    """What becomes of a node whose predecessors are all final: RUN, SKIPPED or UPSTREAM_FAILED.
    A root always runs."""
    if not upstream:
        return RUN
    counted = Upstream.of(upstream)
    spec = TRIGGER_RULES[rule]
    if spec.met(counted):
        return RUN
    if spec.broken_by_failure and counted.failed:
        return S.UPSTREAM_FAILED
    return S.SKIPPED


# --------------------------------------------------------------------------- settling nodes


@dataclass(frozen=True)
class NodeState:
    """A node's status, and its result for its successors (a success's return value)."""

    status: str
    result: Any = None


WAITING = NodeState(S.WAITING)


@dataclass(frozen=True)
class RunContext:
    """What a node's kind may read when the node becomes ready."""

    trace_id: str
    payload: Mapping[str, Any]
    graph: Graph


@dataclass
class Step:
    """A decided change of a WAITING node: QUEUED with the Event of its first attempt (it needs a
    worker and a slot), or final at once (SKIPPED, UPSTREAM_FAILED, or a kind that needs no worker)."""

    node: str
    status: str
    result: Any = None
    error: str = ""
    event: dict | None = None

    @property
    def event_type(self) -> str | None:
        """The event type whose slot a QUEUED step waits for: its Event's."""
        return self.event["event_type"] if self.event else None


@dataclass
class Settled:
    steps: list[Step] = field(default_factory=list)
    # Nodes whose state a decision needed and was not given: read them, then settle again.
    needs: set[str] = field(default_factory=set)


def settle(run: RunContext, view: Mapping[str, NodeState], frontier: Iterable[str]) -> Settled:
    """Settle each WAITING node of `frontier` whose predecessors are all final, and onward through
    the nodes that end at once: its trigger rule says whether it runs, and its kind what running is.

    `view` holds the states known; a node missing from it that a decision needs goes to `needs`.
    """
    graph = run.graph
    known = dict(view)
    settled = Settled()
    queue = deque(frontier)
    done: set[str] = set()
    while queue:
        key = queue.popleft()
        if key in done:
            continue
        state = known.get(key)
        preds = graph.preds[key]
        missing = [k for k in (key, *preds) if k not in known]
        if missing:
            settled.needs.update(missing)
            continue
        if state.status != S.WAITING or any(known[p].status not in FINAL for p in preds):
            continue
        done.add(key)
        node = graph.nodes[key]
        decision = trigger(node.trigger_rule, [known[p].status for p in preds])
        if decision == RUN:
            upstream = {p: known[p].result if known[p].status == S.SUCCESS else None for p in preds}
            step = kinds.kind_of(node.kind).ready(node, run, upstream)
        else:
            step = Step(key, decision)
        settled.steps.append(step)
        known[key] = NodeState(step.status, step.result)
        if step.status in FINAL:
            queue.extend(graph.succs[key])
    return settled


# --------------------------------------------------------------------------- attempts


def retry_delay(node: NodeSpec, attempt: int) -> float | None:
    """Seconds before the next attempt of a node whose attempt number `attempt` failed: `retry_delay`,
    doubling each time; None once `max_retries` are spent."""
    if attempt > node.max_retries:
        return None
    return node.retry_delay * 2 ** (attempt - 1)


@dataclass(frozen=True)
class Outcome:
    """What an attempt's end makes of its task: SUCCESS, FAILURE, or RETRY after `retry_in` seconds."""

    status: str
    result: Any = None
    error: str = ""
    retry_in: float | None = None

    @property
    def event_result(self) -> Any:
        """The attempt's Event's `result`: the return value, or the error."""
        return self.result if self.status == S.SUCCESS else {"error": self.error}


def attempt_outcome(node: NodeSpec, *, attempt: int, succeeded: bool, result: Any = None, error: str = "") -> Outcome:
    if succeeded:
        return Outcome(S.SUCCESS, result=result)
    delay = retry_delay(node, attempt)
    if delay is not None:
        return Outcome(S.RETRY, error=error, retry_in=delay)
    return Outcome(S.FAILURE, error=error)


# --------------------------------------------------------------------------- plans


@dataclass
class Plan:
    """A transition decided: the database carries it out only while `expect` still holds."""

    steps: list[Step] = field(default_factory=list)
    # node -> status the decisions were made on; steps' nodes must still be WAITING.
    expect: dict[str, str] = field(default_factory=dict)
    # Event types whose line to admit from (slots freed, tasks queued), in name order (lock order).
    types: list[str] = field(default_factory=list)
    # Whether the run may have ended with it (nothing it made is left to finish).
    may_end: bool = False

    @property
    def queued(self) -> list[Step]:
        return [step for step in self.steps if step.status == S.QUEUED]


def _plan(settled: Settled, read: Mapping[str, NodeState], freed: Iterable[str | None]) -> Plan:
    steps = settled.steps
    types = {t for t in freed if t} | {step.event_type for step in steps if step.status == S.QUEUED}
    return Plan(
        steps=steps,
        expect={**{key: state.status for key, state in read.items()}, **{step.node: S.WAITING for step in steps}},
        types=sorted(t for t in types if t),
        may_end=all(step.status in FINAL for step in steps),
    )


def plan_start(run: RunContext) -> Plan:
    """A new run: every node WAITING, its roots settled."""
    graph = run.graph
    settled = settle(run, dict.fromkeys(graph.nodes, WAITING), graph.roots)
    plan = _plan(settled, {}, ())
    plan.may_end = len(settled.steps) == len(graph.nodes) and plan.may_end
    return plan


def plan_finish(run: RunContext, node_key: str, outcome: Outcome, read: Mapping[str, NodeState]) -> Plan | set[str]:
    """What an outcome of `node_key` settles (a retry settles nothing), or the nodes whose states it
    needs first.

    `read` holds states read from the database; the node's descendants not among them are taken as
    WAITING (`Graph.descendants`), which the database confirms for every node it writes.
    """
    graph = run.graph
    node = graph.nodes[node_key]
    freed = node.event_type if kinds.kind_of(node.kind).uses_worker else None
    if outcome.status == S.RETRY:
        return Plan(types=[], may_end=False)
    view = {
        **dict.fromkeys(graph.descendants[node_key], WAITING),
        **read,
        node_key: NodeState(outcome.status, outcome.result),
    }
    settled = settle(run, view, graph.succs[node_key])
    if settled.needs:
        return settled.needs
    return _plan(settled, {k: v for k, v in read.items() if k != node_key}, [freed])


def plan_rerun(run: RunContext, states: Mapping[str, NodeState], rerun: Iterable[str]) -> Plan:
    """A retried run, its `rerun` nodes WAITING again and `states` holding every node: settle them."""
    settled = settle(run, states, rerun)
    plan = _plan(settled, {}, ())
    plan.may_end = True  # every node is known: the database checks whether all are final
    return plan


# --------------------------------------------------------------------------- runs


def run_outcome(statuses: Iterable[str]) -> str | None:
    """A run's final status once none of its tasks is left to finish, else None."""
    seen = list(statuses)
    if any(s not in FINAL for s in seen):
        return None
    return R.FAILED if any(s in RUN_FAILS_ON for s in seen) else R.SUCCESS


def run_retryable(status: str) -> bool:
    """Only a run that ended without success can be retried."""
    return status in (R.FAILED, R.CANCELED)


# --------------------------------------------------------------------------- admission


class Waiting(NamedTuple):
    """A task in an event type's line, or becoming ready now."""

    queued_at: Any
    id: int


def admit(*, concurrency: int, held: int, released: int, line: Iterable[Waiting]) -> list[Waiting]:
    """Who is handed to Celery from an event type's line: at most as many as the slots free (its
    `concurrency` less the slots `held`, counting those this transition `released`), first in
    `LINE_ORDER`. The line includes the tasks becoming ready in the same transition."""
    free = max(concurrency - (held - released), 0)
    return sorted(line, key=operator.attrgetter(*LINE_ORDER))[:free]


def held_after(*, held: int, released: int, admitted: int) -> int:
    """The type's count of held slots after admission; never below zero, so a count that drifted low
    (the reconciler recounts it) cannot fail a transition."""
    return max(held - released + admitted, 0)
