"""An attempt's Event: its payload and context, composed here alone, and the message a task receives."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from events_app.models import Event, event_message

from . import expressions
from .graph import NodeSpec
from .rules import RunContext

# The columns of a new Event the engine writes; the database adds its timestamp (its own clock).
NEW_EVENT_FIELDS = ("event_id", "trace_id", "event_type", "task_name", "payload", "result", "context", "status")


def attempt_event(
    run: RunContext,
    node: NodeSpec,
    *,
    attempt: int,
    upstream: Mapping[str, Any],
    extra: Mapping[str, Any] = (),
    leave_out: tuple[tuple[str, ...], ...] = (),
) -> dict[str, Any]:
    """The Event of a node's attempt, not yet stored: the run's payload with the node's params merged
    over it, and a context naming the workflow, its version, the node, the attempt and the
    predecessors' results (`extra` adds to it). `leave_out`: field paths (`("payload", "items")`,
    `("upstream", "image", "images")`) its payload and upstream go without."""
    names = {"payload": {**run.payload, **node.params}, "upstream": dict(upstream)}
    if leave_out:
        names = expressions.without(names, leave_out)
    return {
        "event_id": str(uuid.uuid4()),
        "trace_id": run.trace_id,
        "event_type": node.event_type,
        "task_name": node.task,
        "payload": names["payload"],
        "result": {},
        "context": {
            "workflow": run.graph.workflow,
            "workflow_version": run.graph.version,
            "node": node.key,
            "attempt": attempt,
            "upstream": names["upstream"],
            **dict(extra),
        },
        "status": Event.Status.PENDING,
    }


def next_attempt_event(previous: Mapping[str, Any]) -> dict[str, Any]:
    """The Event of the attempt after `previous` (a failed one): the same payload and upstream."""
    context = dict(previous["context"])
    context["attempt"] = context.get("attempt", 1) + 1
    fresh = {name: previous[name] for name in NEW_EVENT_FIELDS}
    return {**fresh, "event_id": str(uuid.uuid4()), "result": {}, "context": context, "status": Event.Status.PENDING}


def message(row: Mapping[str, Any]) -> dict[str, Any]:
    """The message a task receives, from an Event's fields as stored (a row the database answered as
    JSON, or one composed here with the database's timestamp)."""
    return event_message(row)
