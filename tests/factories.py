"""Test data builders, in one place: definitions in the export shape and saved workflows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from workflows_app.definitions import workflow_definition_save
from workflows_app.models import WorkflowDefinition

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


def workflow(data: dict | None = None) -> WorkflowDefinition:
    return workflow_definition_save(data=data or spec())
