"""The workflow definition format: validation (one function for admin, API and import), import, export."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import networkx as nx
from django.db import IntegrityError, transaction

from events_app.models import EVENT_TYPE_NAME, EventType

from .engine import ADMISSION_FIELDS, event_type_settings_check, event_type_update, expressions, kinds
from .engine.graph import COMMON_FIELDS, NODE_DEFAULTS, edge_parts, edge_spec
from .models import NODE_KEY, Edge, Node, TriggerRule, WorkflowDefinition, WorkflowVersion

NAME_RE = re.compile(r"^[-a-zA-Z0-9_]{1,100}$")
KEY_RE = re.compile(NODE_KEY)
EVENT_TYPE_RE = re.compile(EVENT_TYPE_NAME)
TOP_FIELDS = {
    "name",
    "description",
    "trigger_event_types",
    "event_types",
    "nodes",
    "edges",
    "is_active",
    "version",
}


class DefinitionError(ValueError):
    """A definition that cannot be saved; `errors` names every problem found."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("; ".join(errors))


def registered_task_names() -> set[str]:
    """Every task a node may run: those the Celery app knows after autodiscovery, except Celery's
    own and the engine's maintenance tasks (marked `eventflow_internal`), which take no Event."""
    from config.celery import app

    app.loader.import_default_modules()
    return {
        name
        for name, task in app.tasks.items()
        if not name.startswith("celery.") and not getattr(task, "eventflow_internal", False)
    }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_node(index: int, raw: Any, known_tasks: set[str], errors: list[str]) -> dict | None:
    """A node normalised: every common field with its default, then its kind's own fields."""
    where = f"nodes[{index}]"
    if not isinstance(raw, dict):
        errors.append(f"{where}: must be an object")
        return None
    key = raw.get("key")
    if not isinstance(key, str) or not KEY_RE.match(key):
        errors.append(f"{where}: key must be a slug of letters, digits, '_' or '-'")
        return None
    where = f"node '{key}'"
    kind_name = raw.get("kind", NODE_DEFAULTS["kind"])
    try:
        kind = kinds.kind_of(kind_name)
    except (KeyError, TypeError):
        errors.append(f"{where}: unknown kind '{kind_name}' (one of {', '.join(kinds.names())})")
        return None
    unknown = set(raw) - COMMON_FIELDS - kind.fields
    if "map_over" in unknown:
        errors.append(f"{where}: map_over is only for nodes of kind 'task' (this one is '{kind_name}')")
        unknown.discard("map_over")
    if unknown:
        errors.append(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    node = {**NODE_DEFAULTS, "task": "", "event_type": None, **{k: v for k, v in raw.items() if k not in unknown}}
    kind.check(node, where, errors, known_tasks)
    if not isinstance(node["params"], dict):
        errors.append(f"{where}: params must be an object")
    if not _is_int(node["max_retries"]) or node["max_retries"] < 0:
        errors.append(f"{where}: max_retries must be an integer >= 0")
    if not _is_number(node["retry_delay"]) or node["retry_delay"] < 0:
        errors.append(f"{where}: retry_delay must be a number >= 0")
    else:
        node["retry_delay"] = float(node["retry_delay"])
    if node["timeout"] is not None and (not _is_int(node["timeout"]) or node["timeout"] < 1):
        errors.append(f"{where}: timeout must be a positive integer of seconds or null")
    if node["trigger_rule"] not in TriggerRule.values:
        errors.append(
            f"{where}: unknown trigger_rule '{node['trigger_rule']}' (one of {', '.join(TriggerRule.values)})"
        )
    return node


def _check_edges(raw_edges: Any, keys: set[str], errors: list[str]) -> list[tuple[str, str, str]]:
    """Edges as (source, target, when), from `[source, target]` or `{from, to, when}`."""
    if not isinstance(raw_edges, list):
        errors.append("edges must be a list of [source, target] pairs or {from, to, when} objects")
        return []
    edges: list[tuple[str, str, str]] = []
    seen: set[tuple[str, str]] = set()
    for index, raw in enumerate(raw_edges):
        if isinstance(raw, dict) and set(raw) == {"source", "target"}:
            raw = [raw["source"], raw["target"]]
        if isinstance(raw, dict) and {"from", "to"} <= set(raw) <= {"from", "to", "when"}:
            if "when" in raw and not isinstance(raw["when"], str):
                errors.append(f"edges[{index}]: when must be a CEL expression in a string")
                continue
            raw = [raw["from"], raw["to"], raw.get("when") or ""]
        elif isinstance(raw, list | tuple) and len(raw) == 2:
            raw = [*raw, ""]
        if not (isinstance(raw, list | tuple) and len(raw) == 3 and all(isinstance(k, str) for k in raw)):
            errors.append(f"edges[{index}]: must be a [source, target] pair or a {{from, to, when}} object")
            continue
        source, target, when = raw
        bad = [k for k in (source, target) if k not in keys]
        if bad:
            errors.append(f"edge {source} -> {target}: unknown node {', '.join(repr(k) for k in bad)}")
            continue
        if source == target:
            errors.append(f"edge {source} -> {target}: a node cannot depend on itself")
            continue
        if (source, target) in seen:
            errors.append(f"edge {source} -> {target}: duplicate edge")
            continue
        seen.add((source, target))
        edges.append((source, target, when.strip()))
    return edges


def _check_expressions(nodes: list[dict], edges: list[tuple[str, str, str]], errors: list[str]) -> None:
    """Each edge's `when` and node's `map_over` compiles, reads only the names its place offers, and
    reads only the results of its node's predecessors."""
    preds: dict[str, set[str]] = {n["key"]: set() for n in nodes}
    for source, target, _ in edges:
        preds[target].add(source)
    for source, target, when in edges:
        if when:
            for problem in expressions.check(when, names=expressions.WHEN_NAMES, upstream=preds[target], expect=bool):
                errors.append(f"edge {source} -> {target}: when {problem}")
    for node in nodes:
        if node["kind"] == "wait_event":
            for name, names, gives in (
                ("event_key", expressions.MAP_OVER_NAMES, None),
                ("match", expressions.EVENT_NAMES, bool),
            ):
                if name in node:
                    found = expressions.check(node[name], names=names, upstream=preds[node["key"]], expect=gives)
                    errors.extend(f"node '{node['key']}': {name} {problem}" for problem in found)
        if "map_over" in node:
            found = expressions.check(
                node["map_over"], names=expressions.MAP_OVER_NAMES, upstream=preds[node["key"]], expect=list
            )
            errors.extend(f"node '{node['key']}': map_over {problem}" for problem in found)


def find_cycle(keys: Iterable[str], edges: Iterable[Iterable[str]]) -> list[str] | None:
    """The nodes of one cycle in order, first repeated at the end, or None for a DAG."""
    graph = nx.DiGraph()
    graph.add_nodes_from(keys)
    graph.add_edges_from(tuple(e) for e in edges)
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return None
    return [u for u, _ in cycle] + [cycle[0][0]]


def definition_validate(data: Any, *, known_tasks: set[str] | None = None) -> dict:
    """Check a definition in the export shape and return it normalised, or raise DefinitionError."""
    if not isinstance(data, dict):
        raise DefinitionError(["a workflow definition must be an object"])
    known_tasks = registered_task_names() if known_tasks is None else known_tasks
    errors: list[str] = []
    unknown = set(data) - TOP_FIELDS
    if unknown:
        errors.append(f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    name = data.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        errors.append("name must be a slug of letters, digits, '_' or '-'")
    description = data.get("description", "")
    if not isinstance(description, str):
        errors.append("description must be a string")
    triggers = data.get("trigger_event_types", [])
    if not isinstance(triggers, list) or not all(isinstance(t, str) and EVENT_TYPE_RE.match(t) for t in triggers):
        errors.append("trigger_event_types must be a list of event type names")
        triggers = []
    event_types = data.get("event_types", {})
    if event_types is None:  # an empty `event_types:` key in a YAML file
        event_types = {}
    if not isinstance(event_types, dict):  # an empty list too: the schema says object
        errors.append("event_types must be an object of name: {concurrency: n}")
        event_types = {}
    for et_name, et in event_types.items():
        if not EVENT_TYPE_RE.match(str(et_name)):
            errors.append(f"event type '{et_name}': name must use letters, digits, '.', '_' or '-'")
        if not isinstance(et, dict) or set(et) - {*ADMISSION_FIELDS, "description"}:
            fields = ", ".join(ADMISSION_FIELDS)
            errors.append(f"event type '{et_name}': must be an object with any of {fields} and description")
        else:
            # The one check of these settings, as the API and the admin make it.
            _, wrong = event_type_settings_check(et)
            errors.extend(f"event type '{et_name}': {field} {error}" for field, error in sorted(wrong.items()))
    is_active = data.get("is_active", True)
    if not isinstance(is_active, bool):
        errors.append("is_active must be true or false")
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        errors.append("nodes must be a non-empty list")
        raw_nodes = []
    nodes: list[dict] = []
    keys: set[str] = set()
    for index, raw in enumerate(raw_nodes):
        node = _check_node(index, raw, known_tasks, errors)
        if node is None:
            continue
        if node["key"] in keys:
            errors.append(f"node '{node['key']}': duplicate key")
            continue
        keys.add(node["key"])
        nodes.append(node)
    edges = _check_edges(data.get("edges", []), keys, errors)
    cycle = find_cycle(keys, [e[:2] for e in edges])
    if cycle:
        errors.append(f"cycle: {' -> '.join(cycle)}")
    _check_expressions(nodes, edges, errors)
    if errors:
        raise DefinitionError(errors)
    return {
        "name": name,
        "description": description,
        "is_active": is_active,
        "trigger_event_types": list(triggers),
        "event_types": {str(k): dict(v) for k, v in event_types.items()},
        "nodes": [{"key": n["key"], **{f: n[f] for f in sorted(set(n) - {"key"})}} for n in nodes],
        "edges": [edge_spec(*e) for e in edges],
    }


def definition_spec(workflow: WorkflowDefinition) -> dict:
    """The definition as stored now, in the export shape (without live event-type settings)."""
    nodes = list(workflow.nodes.order_by("id"))
    by_id = {n.id: n.key for n in nodes}
    return {
        "name": workflow.name,
        "description": workflow.description,
        "trigger_event_types": list(workflow.trigger_event_types or []),
        "nodes": [
            {
                "key": n.key,
                "event_type": n.event_type_id,
                "kind": n.kind,
                "max_retries": n.max_retries,
                "params": n.params or {},
                "retry_delay": float(n.retry_delay),
                "task": n.task,
                "timeout": n.timeout,
                "trigger_rule": n.trigger_rule,
                **(n.options or {}),
            }
            for n in nodes
        ],
        "edges": [edge_spec(by_id[e.source_id], by_id[e.target_id], e.when) for e in workflow.edges.order_by("id")],
    }


def definition_export(workflow: WorkflowDefinition) -> dict:
    """The export shape: what import_workflows and POST /api/workflows/ take back unchanged."""
    spec = definition_spec(workflow)
    type_names = sorted({n["event_type"] for n in spec["nodes"] if n["event_type"]})
    settings = {
        row["name"]: {k: v for k, v in row.items() if k != "name" and (k == "concurrency" or v is not None)}
        for row in EventType.objects.filter(name__in=type_names).values("name", *ADMISSION_FIELDS)
    }
    return {
        "name": spec["name"],
        "description": spec["description"],
        "is_active": workflow.is_active,
        "trigger_event_types": spec["trigger_event_types"],
        "event_types": {name: settings[name] for name in type_names},
        "nodes": spec["nodes"],
        "edges": spec["edges"],
    }


def workflow_version_sync(*, workflow: WorkflowDefinition) -> WorkflowVersion:
    """Snapshot the stored definition as a new version if it changed since the last one.

    Runs point at a version row, never at the live nodes, so edits never reach a run in flight.
    """
    spec = definition_spec(workflow)
    latest = workflow.versions.order_by("-version").first()
    if latest is not None and latest.spec == spec:
        return latest
    number = latest.version + 1 if latest else 1
    WorkflowDefinition.objects.filter(pk=workflow.pk).update(version=number)
    workflow.version = number
    return WorkflowVersion.objects.create(workflow=workflow, version=number, spec=spec)


def _node(workflow: WorkflowDefinition, spec: dict) -> Node:
    """A node row from its spec: the fields every node has in columns, its kind's own in `options`.
    The event type of a kind that runs no worker (the events a wait_event waits for) is no queue: it is
    kept in `options`, and no EventType row is made for it."""
    common = {k: v for k, v in spec.items() if k in COMMON_FIELDS and k != "event_type"}
    options = {k: v for k, v in spec.items() if k not in COMMON_FIELDS}
    queue = kinds.queue_of(spec["kind"], spec["event_type"])
    if spec["event_type"] and not queue:
        options["event_type"] = spec["event_type"]
    return Node(workflow=workflow, event_type_id=queue, options=options, **common)


@transaction.atomic
def workflow_definition_save(*, data: Any, known_tasks: set[str] | None = None) -> WorkflowDefinition:
    """Create or replace a definition from the export shape; all or nothing."""
    return _definition_store(definition_validate(data, known_tasks=known_tasks))


@transaction.atomic
def workflow_definition_create(*, data: Any, known_tasks: set[str] | None = None) -> WorkflowDefinition:
    """Create a definition from the export shape; a name already taken is a DefinitionError, and
    nothing is written.

    The row is inserted before anything else, in a savepoint: of two creations of one new name at
    once, the second waits on the name's unique index until the first commits, and is then refused
    (a check before the insert would let both pass, and the second replace the first).
    """
    spec = definition_validate(data, known_tasks=known_tasks)
    try:
        with transaction.atomic():
            workflow = WorkflowDefinition.objects.create(name=spec["name"])
    except IntegrityError:
        raise DefinitionError([f"name: workflow '{spec['name']}' already exists; change it instead"]) from None
    return _definition_store(spec, workflow)


def _definition_store(spec: dict, workflow: WorkflowDefinition | None = None) -> WorkflowDefinition:
    """Write a validated spec over `workflow`, or over the workflow of its name, created if new."""
    for et_name, et in spec["event_types"].items():
        admission, _ = event_type_settings_check(et)
        defaults = {**admission, **({"description": et["description"]} if "description" in et else {})}
        obj, created = EventType.objects.get_or_create(name=et_name, defaults=defaults)
        if created:
            continue
        if "description" in et:
            EventType.objects.filter(pk=obj.pk).update(description=et["description"])
        changed = {k: v for k, v in admission.items() if getattr(obj, k) != v}
        if changed:
            # As the API and the admin change them: a raised limit admits waiting tasks at once.
            event_type_update(name=et_name, **changed)
    queues = {kinds.queue_of(n["kind"], n["event_type"]) for n in spec["nodes"]} - {None}
    for et_name in queues - set(spec["event_types"]):
        EventType.objects.get_or_create(name=et_name)
    if workflow is None:
        workflow, _ = WorkflowDefinition.objects.select_for_update().get_or_create(name=spec["name"])
    workflow.description = spec["description"]
    workflow.trigger_event_types = spec["trigger_event_types"]
    workflow.is_active = spec["is_active"]
    workflow.save()
    workflow.edges.all().delete()
    workflow.nodes.all().delete()
    created_nodes = Node.objects.bulk_create(_node(workflow, n) for n in spec["nodes"])
    by_key = {n.key: n for n in created_nodes}
    edges = map(edge_parts, spec["edges"])
    Edge.objects.bulk_create(Edge(workflow=workflow, source=by_key[s], target=by_key[t], when=w) for s, t, w in edges)
    workflow_version_sync(workflow=workflow)
    return workflow
