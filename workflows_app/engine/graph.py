"""A version's graph as the engine reads it: node settings with their defaults, predecessors, successors."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# A node's settings when its definition leaves them out: the definition format fills them in on save
# (`definitions.definition_validate`) and the engine reads older versions' specs with them.
NODE_DEFAULTS: Mapping[str, Any] = {
    "kind": "task",
    "params": {},
    "max_retries": 0,
    "retry_delay": 1.0,
    "timeout": None,
    "trigger_rule": "all_success",
}


@dataclass(frozen=True)
class NodeSpec:
    key: str
    kind: str
    task: str
    event_type: str | None
    params: dict
    max_retries: int
    retry_delay: float
    timeout: int | None
    trigger_rule: str
    # Settings of its kind beyond the ones every node has.
    options: Mapping[str, Any] = field(default_factory=dict)


# The fields every node has; a kind's own fields go to `NodeSpec.options`.
COMMON_FIELDS = frozenset({"key", "task", "event_type", *NODE_DEFAULTS})


@dataclass(frozen=True)
class Graph:
    workflow: str
    version: int
    nodes: dict[str, NodeSpec]
    preds: dict[str, tuple[str, ...]]
    succs: dict[str, tuple[str, ...]]
    # (source, target) -> the edge's `when`, for the edges that have one.
    conditions: Mapping[tuple[str, str], str] = field(default_factory=dict)

    @property
    def roots(self) -> list[str]:
        return [key for key in self.nodes if not self.preds[key]]

    @functools.cached_property
    def descendants(self) -> dict[str, frozenset[str]]:
        """Every node reachable from each node. Nothing below a node that is not final has been
        settled yet (a node is settled only once all its predecessors are final), so a transition
        of a node may take its descendants as WAITING without reading them."""
        below: dict[str, frozenset[str]] = {}

        def reach(key: str) -> frozenset[str]:
            if key not in below:
                found: set[str] = set()
                for succ in self.succs[key]:
                    found.add(succ)
                    found |= reach(succ)
                below[key] = frozenset(found)
            return below[key]

        for key in self.nodes:
            reach(key)
        return below


def node_from_spec(raw: Mapping[str, Any]) -> NodeSpec:
    node = {**NODE_DEFAULTS, **raw}
    return NodeSpec(
        key=node["key"],
        kind=node["kind"],
        task=node.get("task") or "",
        event_type=node.get("event_type"),
        params=node["params"] or {},
        max_retries=node["max_retries"],
        retry_delay=float(node["retry_delay"]),
        timeout=node["timeout"],
        trigger_rule=node["trigger_rule"],
        options={k: v for k, v in node.items() if k not in COMMON_FIELDS},
    )


def graph_from_spec(spec: Mapping[str, Any], *, version: int = 0) -> Graph:
    """The run-time view of a version's spec: node settings plus predecessor and successor maps."""
    nodes = {n["key"]: node_from_spec(n) for n in spec["nodes"]}
    preds: dict[str, list[str]] = {key: [] for key in nodes}
    succs: dict[str, list[str]] = {key: [] for key in nodes}
    conditions: dict[tuple[str, str], str] = {}
    for edge in spec["edges"]:
        source, target, when = edge_parts(edge)
        preds[target].append(source)
        succs[source].append(target)
        if when:
            conditions[source, target] = when
    return Graph(
        workflow=spec["name"],
        version=version,
        nodes=nodes,
        preds={k: tuple(v) for k, v in preds.items()},
        succs={k: tuple(v) for k, v in succs.items()},
        conditions=conditions,
    )


def edge_parts(edge: Any) -> tuple[str, str, str]:
    """(source, target, when) of an edge in the definition format: `[source, target]`, or
    `{from, to, when}` (`when` optional)."""
    if isinstance(edge, Mapping):
        return edge["from"], edge["to"], edge.get("when") or ""
    source, target = edge
    return source, target, ""


def edge_spec(source: str, target: str, when: str = "") -> list[str] | dict[str, str]:
    """An edge in the definition format: the short form unless it has a condition."""
    return {"from": source, "to": target, "when": when} if when else [source, target]


@functools.lru_cache(maxsize=1024)
def graph_for_version(version_id: int) -> Graph:
    """Versions never change, so each process parses one at most once."""
    from ..models import WorkflowVersion

    version = WorkflowVersion.objects.only("spec", "version").get(pk=version_id)
    return graph_from_spec(version.spec, version=version.version)


@functools.lru_cache(maxsize=4096)
def version_id_named(workflow: str, version: int) -> int:
    """The pk of a workflow's version by the names an Event carries. A workflow deleted and created
    again under its name may give another answer later: the database checks it under the run's lock."""
    from ..models import WorkflowVersion

    return WorkflowVersion.objects.values_list("pk", flat=True).get(workflow__name=workflow, version=version)
