"""The engine's decisions, as plain functions of what they decide on: no database, no clock, no broker.

Which successors become ready and what becomes of them (trigger rules, node kinds), whether a failed
attempt is retried and after how long, who is admitted from an event type's line, and when a run ends.
`transitions` gathers the inputs, asks these functions, and has the database carry the answers out
(`sql`); the statements that must decide inside the database for speed (admission, the run's end) are
built from the constants here and checked against these functions by the test suite.
"""

from __future__ import annotations

import operator
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..models import TaskRun, WorkflowRun
from . import expressions, kinds
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
# Statuses of an attempt that may still record an outcome: those of a task's, and a waiting node's.
LIVE = frozenset({S.QUEUED, S.STARTED, S.RETRY})
RESOLVABLE = LIVE | {S.DEFERRED}
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
    error: str = ""


WAITING = NodeState(S.WAITING)


@dataclass(frozen=True)
class RunContext:
    """What a node's kind may read when the node becomes ready."""

    trace_id: str
    payload: Mapping[str, Any]
    graph: Graph
    # The most elements a `map_over` may give (EVENTFLOW["MAX_MAP_ITEMS"]).
    max_map_items: int = 10_000


@dataclass
class Step:
    """A decided change of a WAITING node: QUEUED with the Event of its first attempt (it needs a
    worker and a slot), final at once (SKIPPED, UPSTREAM_FAILED, FAILURE, or a kind that needs no
    worker), or, for a mapped node, STARTED with its `instances`: one QUEUED step per element, each
    with its `map_index` and its own Event. `error` says why a node that did not run did not."""

    node: str
    status: str
    result: Any = None
    error: str = ""
    event: dict | None = None
    map_index: int | None = None
    instances: list[Step] = field(default_factory=list)
    # For a mapped node's row: how many instance rows it keeps (rows of an earlier expansion beyond
    # them go); None keeps them all (a retry re-running some).
    trim: int | None = None
    # For a DEFERRED node: seconds until its wait ends (its timeout, a delay), and for a wait_event the
    # event type and key it waits for.
    due_in: float | None = None
    wait_type: str = ""
    wait_key: str = ""
    # The notification reaching it raises for webhooks (`approval.requested`), if any.
    notify: str = ""

    @property
    def event_type(self) -> str | None:
        """The event type whose slot a QUEUED step waits for: its Event's."""
        return self.event["event_type"] if self.event else None


def mapped(node: NodeSpec) -> bool:
    """Whether the node runs one instance per element of its `map_over`."""
    return bool(node.options.get("map_over"))


def map_outcome(instances: Sequence[NodeState]) -> NodeState | None:
    """A mapped node's state once all its instances are final (else None): SUCCESS with the list of
    their results in index order when all succeeded, else FAILURE saying how many did not."""
    if any(i.status not in FINAL for i in instances):
        return None
    failed = sum(i.status != S.SUCCESS for i in instances)
    if failed:
        return NodeState(S.FAILURE, error=f"{failed} of {len(instances)} instances did not succeed")
    return NodeState(S.SUCCESS, [i.result for i in instances])


@dataclass
class Settled:
    steps: list[Step] = field(default_factory=list)
    # Nodes whose state a decision needed and was not given: read them, then settle again.
    needs: set[str] = field(default_factory=set)


def settle(run: RunContext, view: Mapping[str, NodeState], frontier: Iterable[str]) -> Settled:
    """Settle each WAITING node of `frontier` whose predecessors are all final, and onward through
    the nodes that end at once: its edges' conditions and its trigger rule say whether it runs, and
    its kind what running is.

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
        step = _ready(run, graph.nodes[key], {p: known[p] for p in preds})
        settled.steps.append(step)
        known[key] = NodeState(step.status, step.result)
        if step.status in FINAL:
            queue.extend(graph.succs[key])
    return settled


def _ready(run: RunContext, node: NodeSpec, preds: Mapping[str, NodeState]) -> Step:
    """What a WAITING node whose predecessors are all final becomes. A predecessor that succeeded
    along an edge whose `when` is false counts as SKIPPED; a `when` that fails fails the node. A mapped
    node's row keeps only the instances its step makes (a retried run may hold older ones)."""
    step = _decide(run, node, preds)
    if mapped(node) and step.trim is None:
        step.trim = len(step.instances)
    return step


def _decide(run: RunContext, node: NodeSpec, preds: Mapping[str, NodeState]) -> Step:
    graph, key = run.graph, node.key
    upstream = {p: state.result if state.status == S.SUCCESS else None for p, state in preds.items()}
    statuses, why = [], []
    for p, state in preds.items():
        condition = graph.conditions.get((p, key))
        status = state.status
        if condition and status == S.SUCCESS:
            try:
                taken = expressions.when(condition, payload=run.payload, upstream=upstream, result=state.result)
            except expressions.ExpressionError as exc:
                return Step(key, S.FAILURE, error=f"edge {p} -> {key}: when {exc}")
            if not taken:
                status = S.SKIPPED
                upstream[p] = None
                why.append(f"the condition of edge {p} -> {key} (`{condition}`) was false")
        if status != S.SUCCESS and status == state.status:
            why.append(f"{p} was {status}")
        statuses.append(status)
    decision = trigger(node.trigger_rule, statuses)
    if decision != RUN:
        return Step(key, decision, error=f"trigger rule {node.trigger_rule} not met: {'; '.join(why)}")
    return kinds.kind_of(node.kind).ready(node, run, upstream)


def expand(run: RunContext, node: NodeSpec, upstream: Mapping[str, Any], *, first: Callable[[int, Any], Step]) -> Step:
    """A mapped node that may run: one instance per element of its `map_over`, each QUEUED with the
    Event of its first attempt (`first(index, item)`), its node STARTED; SKIPPED for no element, FAILURE
    when the expression fails or gives more than `run.max_map_items`."""
    source = node.options["map_over"]
    try:
        items = expressions.map_items(source, payload=run.payload, upstream=upstream)
    except expressions.ExpressionError as exc:
        return Step(node.key, S.FAILURE, error=f"map_over {exc}")
    if not items:
        return Step(node.key, S.SKIPPED, error=f"map_over `{source}` gave an empty list")
    if len(items) > run.max_map_items:
        return Step(
            node.key,
            S.FAILURE,
            error=f"map_over `{source}` gave {len(items)} elements, more than the {run.max_map_items} allowed",
        )
    return Step(node.key, S.STARTED, instances=[first(index, item) for index, item in enumerate(items)])


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
    # A mapped node one of whose instances ends: the decision that the node goes on assumes another of
    # its instances is still unfinished.
    open: str | None = None

    @property
    def queued(self) -> list[Step]:
        """Node steps QUEUED: each joins its type's line with its new Event."""
        return [step for step in self.steps if step.status == S.QUEUED]

    @property
    def instances(self) -> list[Step]:
        """The instances of the mapped nodes this plan starts or starts again."""
        return [instance for step in self.steps for instance in step.instances]

    @property
    def events(self) -> list[dict]:
        """Every new Event of the plan."""
        return [step.event for step in (*self.steps, *self.instances) if step.event]


def _plan(settled: Settled, read: Mapping[str, NodeState], freed: Iterable[str | None]) -> Plan:
    steps = settled.steps
    ready = [s for s in steps if s.status == S.QUEUED] + [i for s in steps for i in s.instances]
    types = {t for t in freed if t} | {step.event_type for step in ready}
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


def plan_finish(
    run: RunContext,
    node_key: str,
    outcome: Outcome,
    read: Mapping[str, NodeState],
    *,
    map_index: int | None = None,
    instances: Sequence[NodeState] | None = None,
) -> Plan | set[str]:
    """What an outcome of `node_key` settles (a retry settles nothing), or the nodes whose states it
    needs first.

    `read` holds states read from the database; the node's descendants not among them are taken as
    WAITING (`Graph.descendants`), which the database confirms for every node it writes. The outcome
    of a mapped node's instance (`map_index`) ends the node only once every instance is final:
    `instances` holds their states as read (None: not read, and the node is taken to go on, which the
    database confirms).
    """
    graph = run.graph
    node = graph.nodes[node_key]
    freed = kinds.queue_of(node.kind, node.event_type)
    if outcome.status == S.RETRY:
        return Plan(types=[], may_end=False)
    ended = NodeState(outcome.status, outcome.result, outcome.error)
    if map_index is not None:
        if instances is not None:
            states = list(instances)
            if map_index < len(states):
                states[map_index] = ended
            ended = map_outcome(states)
        if instances is None or ended is None:  # another instance is (taken to be) unfinished
            return Plan(types=[freed] if freed else [], open=node_key)
    view = {
        **dict.fromkeys(graph.descendants[node_key], WAITING),
        **read,
        node_key: ended,
    }
    settled = settle(run, view, graph.succs[node_key])
    if settled.needs:
        return settled.needs
    plan = _plan(settled, {k: v for k, v in read.items() if k != node_key}, [freed])
    if map_index is not None:  # the node's row ends with its last instance
        plan.steps.insert(0, Step(node_key, ended.status, result=ended.result, error=ended.error))
        plan.expect[node_key] = S.STARTED
    return plan


def plan_rerun(
    run: RunContext,
    states: Mapping[str, NodeState],
    rerun: Iterable[str],
    instances: Mapping[str, Sequence[NodeState]] = (),
) -> Plan:
    """A retried run, its `rerun` nodes WAITING again and `states` holding every node: settle them.

    A mapped node whose instances ran, and whose predecessors keep their results, runs again only its
    instances that did not succeed (`instances` holds each such node's instance states).
    """
    instances = dict(instances)
    graph = run.graph
    rerun = set(rerun)
    partial = [key for key in sorted(rerun) if instances.get(key) and not any(p in rerun for p in graph.preds[key])]
    view = dict(states)
    steps = []
    for key in partial:
        step = _rerun_instances(run, graph.nodes[key], {p: states[p] for p in graph.preds[key]}, instances[key])
        steps.append(step)
        view[key] = NodeState(step.status, step.result)
    settled = settle(run, view, sorted(rerun - set(partial)))
    settled.steps[:0] = steps
    plan = _plan(settled, {}, ())
    plan.may_end = True  # every node is known: the database checks whether all are final
    return plan


def _rerun_instances(
    run: RunContext, node: NodeSpec, preds: Mapping[str, NodeState], instances: Sequence[NodeState]
) -> Step:
    """A mapped node run again: its instances that did not succeed, with their elements as before
    (`map_over` reads the same predecessors' results and payload)."""
    step = _ready(run, node, preds)
    if step.status != S.STARTED:
        return step
    again = [i for i in step.instances if i.map_index >= len(instances) or instances[i.map_index].status != S.SUCCESS]
    if not again:  # nothing left to run again: the node ends as its instances did
        ended = map_outcome(instances)
        return Step(node.key, ended.status, result=ended.result, error=ended.error)
    return Step(node.key, S.STARTED, instances=again, trim=None)


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

# A rate limit's windows, in seconds, by the unit its text names.
RATE_UNITS = {"second": 1, "minute": 60, "hour": 3600}
# A rate window's dispatch times are kept at this fraction of the window apart at least (a dispatch
# recorded within it of another moves that entry later): the record stays a bounded size whatever N,
# and a dispatch can only be counted longer than it happened, never shorter, so the limit holds.
RATE_RESOLUTION = 50


class Rate(NamedTuple):
    """A rate limit: at most `count` tasks handed to Celery in any window of `period` seconds."""

    count: int
    period: int

    @property
    def text(self) -> str:
        unit = next(name for name, seconds in RATE_UNITS.items() if seconds == self.period)
        return f"{self.count}/{unit}"


# A rate limit's text: N from 1 to 9999999, written without leading zeros.
RATE_PATTERN = r"^[1-9][0-9]{0,6}/(second|minute|hour)$"


def rate_parse(text: str | None) -> Rate | None:
    """`"N/second"`, `"N/minute"` or `"N/hour"` (N a whole number from 1 to 9999999), or None for no
    limit; a ValueError naming what is wrong otherwise."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError('must be a string like "5/second", or null')
    count, slash, unit = text.partition("/")
    if not slash or unit not in RATE_UNITS:
        raise ValueError(f'"{text}" is not N/second, N/minute or N/hour')
    if not re.match(RATE_PATTERN, text):
        raise ValueError(f'"{text}": N must be a whole number from 1 to 9999999')
    return Rate(int(count), RATE_UNITS[unit])


class RateLog(NamedTuple):
    """The dispatches a rate window counts: at each time (ascending), how many."""

    times: tuple = ()
    counts: tuple = ()


def rate_used(log: RateLog, now: Any, rate: Rate) -> int:
    """Dispatches counted against a window ending at `now`: every one later than `now` less the period,
    those recorded ahead of `now` (a retry's due time) included."""
    since = now - _period(rate)
    return sum(c for t, c in zip(log.times, log.counts, strict=True) if t > since)


def rate_opens(log: RateLog, at: Any, rate: Rate) -> Any:
    """The earliest time from `at` on at which one more dispatch keeps every window within the limit:
    when the window that ends then counts at most `count - 1` of those recorded."""
    total = 0
    for t, c in sorted(zip(log.times, log.counts, strict=True), reverse=True):
        total += c
        if total >= rate.count:
            return max(at, t + _period(rate))
    return at


def rate_record(log: RateLog, now: Any, at: Any, count: int, rate: Rate) -> RateLog:
    """The log with `count` dispatches at `at` (now, or a retry's due time), entries no window from
    `now` on counts dropped, and the new ones merged into an entry at most a `RATE_RESOLUTION`th of
    the period before `at`, whose time moves to `at`."""
    period = _period(rate)
    entries = [(t, c) for t, c in zip(log.times, log.counts, strict=True) if t > now - period]
    if count:
        near = [i for i, (t, _) in enumerate(entries) if at - period / RATE_RESOLUTION <= t <= at]
        if near:
            i = near[-1]
            entries[i] = (at, entries[i][1] + count)
        else:
            entries.append((at, count))
    entries.sort(key=operator.itemgetter(0))
    return RateLog(tuple(t for t, _ in entries), tuple(c for _, c in entries))


def _period(rate: Rate) -> Any:
    from datetime import timedelta

    return timedelta(seconds=rate.period)


class Waiting(NamedTuple):
    """A task in an event type's line, or becoming ready now: its run's priority and start, when it
    became ready, its id, and its fairness key."""

    priority: int
    run_created_at: Any
    queued_at: Any
    id: int
    key: str = ""


def line_order(task: Waiting) -> tuple:
    """A key's line: higher priority first, then older runs (so runs under way finish before new ones
    begin), then the first ready; `id` breaks ties."""
    return (-task.priority, task.run_created_at, task.queued_at, task.id)


# The line's order as the database sorts it (the index `task_run_key_line_idx`), `line_order`'s columns.
LINE_ORDER = ("priority DESC", "run_created_at", "queued_at", "id")


class KeyState(NamedTuple):
    """A fairness key as admission keeps it: its slots held, the turn it was last served at."""

    held: int = 0
    turn: int = 0


def admit(
    *,
    free: int,
    line: Iterable[Waiting],
    keys: Mapping[str, KeyState] | None = None,
    per_key: int | None = None,
    turn: int = 0,
) -> list[Waiting]:
    """Who is handed to Celery from an event type's line, in order, given the slots `free` (its
    concurrency and rate window allowing). Keys are served in turn: the one whose best waiting task
    has the highest priority, then the one served longest ago (a key never served first), then by
    name; from each, the head of its line (`line_order`), while it holds fewer than `per_key`.
    `keys` holds each key's state after the slots given back; `turn` is the type's last turn."""
    keys = dict(keys or {})
    lines: dict[str, list[Waiting]] = {}
    for task in sorted(line, key=line_order):
        lines.setdefault(task.key, []).append(task)
    admitted = []
    while free > 0:
        open_keys = [k for k, q in lines.items() if q and (per_key is None or keys.get(k, KeyState()).held < per_key)]
        if not open_keys:
            break
        key = min(open_keys, key=lambda k: (-lines[k][0].priority, keys.get(k, KeyState()).turn, k))
        admitted.append(lines[key].pop(0))
        turn += 1
        keys[key] = KeyState(keys.get(key, KeyState()).held + 1, turn)
        free -= 1
    return admitted


def free_slots(*, concurrency: int, held: int, released: int, room: int | None = None) -> int:
    """Slots admission may hand out: its `concurrency` less the slots `held`, counting those this
    transition `released`, and no more than the rate window's `room` when the type has a rate limit."""
    free = max(concurrency - (held - released), 0)
    return free if room is None else max(min(free, room), 0)


def held_after(*, held: int, released: int, admitted: int) -> int:
    """The type's count of held slots after admission; never below zero, so a count that drifted low
    (the reconciler recounts it) cannot fail a transition."""
    return max(held - released + admitted, 0)


def fairness_key_of(value: Any) -> str:
    """A fairness key's stored form: the expression's value as text (its first 200 characters), the
    shared key "" when it gave nothing."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)[:200]


def queue_timeout_outcome(*, waited: int, event_type: str) -> Outcome:
    """A task that waited past its type's `queue_timeout` fails, without retries."""
    return Outcome(S.FAILURE, error=f"waited {waited} s for a slot of {event_type}")


class WaitReason(NamedTuple):
    """Why a QUEUED task is not running yet: `code` (`key_share`, `rate_window`, `concurrency`,
    `place`) and a sentence for people."""

    code: str
    text: str


def wait_reason(
    *,
    concurrency: int,
    held: int,
    rate: Rate | None = None,
    rate_used: int = 0,
    rate_opens: Any = None,
    per_key: int | None = None,
    key: str = "",
    key_held: int = 0,
    place: int | None = None,
) -> WaitReason:
    """The first reason that holds, in the order admission checks them: its key's share, the type's
    slots, the rate window, else its place (those ahead of it go first)."""
    if per_key is not None and key_held >= per_key:
        return WaitReason("key_share", f"its key {key!r} already runs {key_held} of its {per_key}")
    if held >= concurrency:
        return WaitReason("concurrency", f"concurrency full: {held} of {concurrency} running")
    if rate is not None and rate_used >= rate.count:
        when = f"; the next slot opens at {rate_opens:%H:%M:%S.%f}"[:-3] if rate_opens is not None else ""
        return WaitReason("rate_window", f"rate window full: {rate_used} of {rate.text}{when}")
    ahead = f"{place - 1} ahead of it" if place else "its turn comes next"
    return WaitReason("place", f"place {place or 1} in line: {ahead}")
