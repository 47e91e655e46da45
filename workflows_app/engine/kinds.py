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


def names() -> list[str]:
    return sorted(_KINDS)


register(TaskKind())
