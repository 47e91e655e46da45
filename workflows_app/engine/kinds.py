"""Kinds of node: what a node does once its trigger rule lets it run, and what its definition holds.

The engine asks a node's kind, never its name: a new kind is a module with a `NodeKind` subclass
passed to `register`, imported by every process that saves definitions or moves runs (an installed
app's `ready()`, or a module the workers import).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from events_app.models import EVENT_TYPE_NAME

from . import expressions

if TYPE_CHECKING:
    from .graph import NodeSpec
    from .rules import RunContext, Step

EVENT_TYPE_RE = re.compile(EVENT_TYPE_NAME)


class NodeKind:
    """A kind of node. `uses_worker`: it runs a Celery task on its event type's queue, holding one
    of the type's slots from admission to its outcome; otherwise it never reaches a worker."""

    name: ClassVar[str]
    uses_worker: ClassVar[bool] = False
    # The definition fields of its own, beyond those every node has (`graph.COMMON_FIELDS`).
    fields: ClassVar[frozenset[str]] = frozenset()

    def check(self, node: Mapping[str, Any], where: str, errors: list[str], known_tasks: set[str]) -> None:
        """Add to `errors` what is wrong with a node of this kind in a definition (`where` names it)."""

    def ready(self, node: NodeSpec, run: RunContext, upstream: dict[str, Any]) -> Step:
        """What the node becomes once it may run; `upstream` maps each predecessor to its result."""
        raise NotImplementedError


class TaskKind(NodeKind):
    """A Celery task: QUEUED with the Event of its first attempt, until admission hands it to Celery."""

    name = "task"
    uses_worker = True
    # `map_over`: a CEL expression giving a list; one instance of the task per element.
    fields = frozenset({"map_over"})

    def check(self, node: Mapping[str, Any], where: str, errors: list[str], known_tasks: set[str]) -> None:
        task = node.get("task")
        if not isinstance(task, str) or not task:
            errors.append(f"{where}: task is required")
        elif task not in known_tasks:
            errors.append(f"{where}: unknown task '{task}' (not a registered Celery task)")
        event_type = node.get("event_type")
        if not isinstance(event_type, str) or not EVENT_TYPE_RE.match(event_type):
            errors.append(f"{where}: event_type must be a queue name of letters, digits, '.', '_' or '-'")
        if "map_over" in node and not isinstance(node["map_over"], str):
            errors.append(f"{where}: map_over must be a CEL expression in a string")

    def ready(self, node: NodeSpec, run: RunContext, upstream: dict[str, Any]) -> Step:
        from .events import attempt_event
        from .rules import S, Step, expand, mapped

        if not mapped(node):
            return Step(node.key, S.QUEUED, event=attempt_event(run, node, attempt=1, upstream=upstream))

        # Each instance's Event holds its element, not the whole list again: n instances of a list of n
        # would store and send n² elements.
        leave_out = expressions.compiled(node.options["map_over"], expressions.MAP_OVER_NAMES).paths

        def instance(index: int, item: Any) -> Step:
            extra = {"map_index": index, "item": item}
            event = attempt_event(run, node, attempt=1, upstream=upstream, extra=extra, leave_out=leave_out)
            return Step(node.key, S.QUEUED, event=event, map_index=index)

        return expand(run, node, upstream, first=instance)


_KINDS: dict[str, NodeKind] = {}


def register(kind: NodeKind) -> NodeKind:
    """Make `kind` available to definitions and runs under `kind.name`."""
    _KINDS[kind.name] = kind
    return kind


def kind_of(name: str) -> NodeKind:
    return _KINDS[name]


def queue_of(kind: str, event_type: str | None) -> str | None:
    """A node's queue, whose slots it holds: its event type, for a kind that runs on a worker; none for a
    kind that does not (a wait_event's event type names the events it waits for)."""
    return event_type if event_type and kind_of(kind).uses_worker else None


def names() -> list[str]:
    return sorted(_KINDS)


register(TaskKind())


# --------------------------------------------------------------------------- nodes that wait


class WaitKind(NodeKind):
    """A node that waits, holding no worker, no message and no slot: DEFERRED with an Event of its own
    (its attempt, which the end of its wait resolves once), until an event, a person, or its `due_in`."""

    on_timeout = True  # whether `timeout` and `on_timeout` apply

    def check(self, node: Mapping[str, Any], where: str, errors: list[str], known_tasks: set[str]) -> None:
        if node.get("task"):
            errors.append(f"{where}: a {self.name} node runs no task")
        if node.get("max_retries"):
            errors.append(f"{where}: a {self.name} node is not retried (max_retries must be 0)")
        if self.on_timeout and node.get("on_timeout", "fail") not in ("fail", "skip"):
            errors.append(f"{where}: on_timeout must be fail or skip")

    def wait(self, node: NodeSpec, run: RunContext, upstream: dict[str, Any]) -> dict[str, Any]:
        """The Step fields of the wait (`due_in`, `wait_type`, `wait_key`), or {"error": ...}."""
        return {"due_in": node.timeout}

    def ready(self, node: NodeSpec, run: RunContext, upstream: dict[str, Any]) -> Step:
        from .events import attempt_event
        from .rules import S, Step

        wait = self.wait(node, run, upstream)
        if "error" in wait:
            return Step(node.key, S.FAILURE, error=wait["error"])
        event = attempt_event(run, node, attempt=1, upstream=upstream)
        event["event_type"] = wait.get("wait_type", "")
        return Step(node.key, S.DEFERRED, event=event, **wait)

    def due(self, node: NodeSpec) -> Any:
        """What the end of its wait (its `due_in` passed) makes of the node: an `rules.Outcome`."""
        from .rules import Outcome, S

        if node.options.get("on_timeout") == "skip":
            return Outcome(S.SKIPPED, error=f"no outcome within its timeout of {node.timeout:g} s: skipped")
        return Outcome(S.FAILURE, error=f"no outcome within its timeout of {node.timeout:g} s")


class WaitEventKind(WaitKind):
    """Succeeds on the first event of its `event_type` whose key is its `event_key`'s value and whose
    `match` holds, published since its run started; its result is that event."""

    name = "wait_event"
    fields = frozenset({"event_key", "match", "on_timeout"})

    def check(self, node: Mapping[str, Any], where: str, errors: list[str], known_tasks: set[str]) -> None:
        super().check(node, where, errors, known_tasks)
        event_type = node.get("event_type")
        if not isinstance(event_type, str) or not EVENT_TYPE_RE.match(event_type):
            errors.append(f"{where}: event_type must name the events it waits for")
        if "event_key" not in node:
            errors.append(f"{where}: event_key is required (a CEL expression on payload and upstream)")
        # `event_key` and `match` are compiled with the definition's other expressions, which know
        # each node's predecessors (`definitions._check_expressions`).

    def wait(self, node: NodeSpec, run: RunContext, upstream: dict[str, Any]) -> dict[str, Any]:
        source = node.options["event_key"]
        try:
            value = expressions.compiled(source, expressions.MAP_OVER_NAMES).evaluate(
                {"payload": run.payload, "upstream": upstream}
            )
        except expressions.ExpressionError as exc:
            return {"error": f"event_key {exc}"}
        if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
            return {"error": f"event_key `{source}` gave {value!r}, not a string or an integer"}
        return {"due_in": node.timeout, "wait_type": node.event_type, "wait_key": str(value)}

    @staticmethod
    def matches(node: NodeSpec, event: Mapping[str, Any]) -> bool:
        """Whether a published event (`event_id`, `event_type`, `key`, `payload`) meets the node's
        `match`; one that fails to evaluate does not."""
        source = node.options.get("match")
        if not source:
            return True
        try:
            return expressions.compiled(source, expressions.EVENT_NAMES).evaluate({"event": dict(event)}) is True
        except expressions.ExpressionError:
            return False


class ApprovalKind(WaitKind):
    """Waits for a person with `workflows_app.approve_workflowrun` to approve (SUCCESS) or reject
    (FAILURE) it."""

    name = "approval"
    fields = frozenset({"on_timeout"})

    def check(self, node: Mapping[str, Any], where: str, errors: list[str], known_tasks: set[str]) -> None:
        super().check(node, where, errors, known_tasks)
        if node.get("event_type"):
            errors.append(f"{where}: an approval node has no event_type")

    def wait(self, node: NodeSpec, run: RunContext, upstream: dict[str, Any]) -> dict[str, Any]:
        return {**super().wait(node, run, upstream), "notify": "approval.requested"}


class DelayKind(WaitKind):
    """SUCCESS `seconds` after it was reached."""

    name = "delay"
    fields = frozenset({"seconds"})
    on_timeout = False

    def check(self, node: Mapping[str, Any], where: str, errors: list[str], known_tasks: set[str]) -> None:
        super().check(node, where, errors, known_tasks)
        seconds = node.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
            errors.append(f"{where}: seconds must be a number >= 0")
        if node.get("event_type") or node.get("timeout") is not None:
            errors.append(f"{where}: a delay node has no event_type and no timeout")

    def wait(self, node: NodeSpec, run: RunContext, upstream: dict[str, Any]) -> dict[str, Any]:
        return {"due_in": float(node.options["seconds"])}

    def due(self, node: NodeSpec) -> Any:
        from .rules import Outcome, S

        return Outcome(S.SUCCESS, result={"waited": node.options["seconds"]})


register(WaitEventKind())
register(ApprovalKind())
register(DelayKind())
