"""Test data builders, in one place: definitions in the export shape, saved workflows, run rows."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from django.utils import timezone

from events_app.models import Event
from workflows_app.definitions import workflow_definition_save
from workflows_app.models import TaskRun, WorkflowDefinition, WorkflowRun

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def product_pipeline_spec() -> dict:
    return yaml.safe_load((EXAMPLES / "product_pipeline.yaml").read_text())


def spec(
    name: str = "wf",
    nodes: list[tuple[str, str]] | list[dict] | None = None,
    edges: list[list[str]] | None = None,
    *,
    event_type: str = "q_default",
    **extra: Any,
) -> dict:
    """A definition: nodes given as (key, task) pairs or full dicts, all on one event type unless told."""
    built = []
    for node in nodes or [("a", "workflows_app.tasks.echo")]:
        if isinstance(node, dict):
            built.append({"event_type": event_type, **node})
        else:
            key, task = node
            built.append({"key": key, "task": task, "event_type": event_type})
    return {"name": name, "nodes": built, "edges": edges or [], **extra}


def fan_spec(name: str = "fan", **upload: Any) -> dict:
    """list -> upload (mapped over the list's images) -> publish (only when the uploads gave something)."""
    echo = "workflows_app.tasks.echo"
    return spec(
        name,
        [
            ("list", echo),
            {"key": "upload", "task": echo, "map_over": "upstream.list.images", **upload},
            ("publish", echo),
        ],
        [["list", "upload"], {"from": "upload", "to": "publish", "when": "size(result) > 0"}],
    )


def workflow(data: dict | None = None) -> WorkflowDefinition:
    return workflow_definition_save(data=data or spec())


# Statuses of an instance that has run (started_at set), and that ended (finished_at set).
_RAN = {"STARTED", "RETRY", "SUCCESS", "FAILURE"}
_ENDED = {"SUCCESS", "FAILURE", "SKIPPED", "UPSTREAM_FAILED", "REVOKED"}


def map_instances(run: WorkflowRun, node: str, statuses: Sequence[str], *, events: bool = False) -> list[TaskRun]:
    """Give `node` of a started run one instance row per status in `statuses` (map_index in order),
    straight in the rows, as a mapped node's would be part-way through: the node's row STARTED while
    any instance is unfinished, else SUCCESS with the results in index order or FAILURE naming the
    failed count. With `events`, each instance that was sent has the Event of its attempt."""
    now = timezone.now()
    row = TaskRun.objects.get(run=run, node_key=node, map_index=None)
    begun = now - timedelta(seconds=len(statuses) + 1)
    instances, sent = [], []
    for index, status in enumerate(statuses):
        queued = begun + timedelta(milliseconds=10 * index)
        started = queued + timedelta(milliseconds=500) if status in _RAN else None
        instance = TaskRun(
            run=run,
            node_key=node,
            map_index=index,
            event_type_id=row.event_type_id,
            task_name=row.task_name,
            status=status,
            attempts=1 if status in _RAN else 0,
            holds_slot=status in ("STARTED", "RETRY"),
            queued_at=queued,
            started_at=started,
            finished_at=now if status in _ENDED else None,
            result={"index": index} if status == "SUCCESS" else None,
            error=f"RuntimeError: instance {index} failed" if status == "FAILURE" else "",
        )
        if events and status != "WAITING":
            event = Event(
                event_id=uuid.uuid4(),
                trace_id=run.trace_id,
                event_type=row.event_type_id or "",
                task_name=row.task_name,
                payload=run.payload,
                result=instance.result or ({"error": instance.error} if instance.error else {}),
                context={"workflow": run.workflow.name, "node": node, "attempt": 1, "map_index": index, "item": index},
                status={"QUEUED": "PENDING"}.get(status, status),
                timestamp=queued,
            )
            sent.append(event)
            instance.current_event = event
        instances.append(instance)
    Event.objects.bulk_create(sent)
    TaskRun.objects.bulk_create(instances)
    failed = sum(1 for s in statuses if s == "FAILURE")
    if all(s in _ENDED for s in statuses):
        row.status = "FAILURE" if failed else "SUCCESS"
        row.finished_at = now
        row.result = None if failed else [i.result for i in instances]
        row.error = f"{failed} of {len(statuses)} instances failed" if failed else ""
    else:
        row.status = "STARTED"
    row.queued_at, row.started_at, row.holds_slot, row.current_event = begun, begun, False, None
    row.save(
        update_fields=[
            "status",
            "queued_at",
            "started_at",
            "finished_at",
            "result",
            "error",
            "holds_slot",
            "current_event",
        ]
    )
    return instances


def task_set(run: WorkflowRun, node: str, **fields: Any) -> None:
    """Set fields of a node's own row (not its instances'), e.g. a status and its reason in `error`."""
    TaskRun.objects.filter(run=run, node_key=node, map_index=None).update(**fields)
