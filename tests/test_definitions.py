"""Conditions and maps in the definition format: refused on import as on save, naming the edge or node,
with nothing written; and a definition with both exported and imported back unchanged."""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

import tests.kinds  # noqa: F401 - registers the `noop` kind
from tests import factories
from workflows_app.definitions import DefinitionError, definition_export, definition_validate
from workflows_app.models import Edge, Node, WorkflowDefinition, WorkflowVersion

ECHO = "workflows_app.tasks.echo"
KNOWN = {ECHO}


BAD = {
    "when-syntax": (
        factories.spec("w", [("a", ECHO), ("b", ECHO)], [{"from": "a", "to": "b", "when": "result.ok &&"}]),
        "edge a -> b: when `result.ok &&` does not compile",
    ),
    "when-type": (
        factories.spec("w", [("a", ECHO), ("b", ECHO)], [{"from": "a", "to": "b", "when": "result.n + 1"}]),
        "edge a -> b: when `result.n + 1` gives int, not a bool",
    ),
    "when-unknown-name": (
        factories.spec("w", [("a", ECHO), ("b", ECHO)], [{"from": "a", "to": "b", "when": "outcome.ok"}]),
        "edge a -> b: when `outcome.ok` does not compile: undeclared reference to 'outcome.ok' (it may read payload, "
        "result, upstream)",
    ),
    "when-not-upstream": (
        factories.spec(
            "w",
            [("a", ECHO), ("b", ECHO), ("c", ECHO)],
            [["a", "b"], {"from": "b", "to": "c", "when": "upstream.a.ok"}],
        ),
        "edge b -> c: when `upstream.a.ok` reads upstream.a, which is not a predecessor (its predecessors: b)",
    ),
    "map-syntax": (factories.fan_spec(map_over="[1, 2"), "node 'upload': map_over `[1, 2` does not compile"),
    "map-type": (
        factories.fan_spec(map_over="size(payload) > 1"),
        "node 'upload': map_over `size(payload) > 1` gives bool, not a list",
    ),
    "map-result": (factories.fan_spec(map_over="result"), "node 'upload': map_over `result` does not compile"),
    "map-not-upstream": (
        factories.fan_spec(map_over="upstream.publish"),
        "node 'upload': map_over `upstream.publish` reads upstream.publish, which is not a predecessor",
    ),
    "rule": (factories.fan_spec(trigger_rule="most_success"), "node 'upload': unknown trigger_rule 'most_success'"),
    "kind": (
        factories.spec("w", [{"key": "gate", "kind": "noop", "event_type": None, "map_over": "[1]"}], []),
        "node 'gate': map_over is only for nodes of kind 'task' (this one is 'noop')",
    ),
}


@pytest.mark.parametrize(("definition", "message"), BAD.values(), ids=BAD.keys())
def test_a_bad_condition_or_map_is_refused_naming_it(definition, message):
    with pytest.raises(DefinitionError) as refused:
        definition_validate(definition, known_tasks=KNOWN)
    assert any(error.startswith(message) for error in refused.value.errors), refused.value.errors


@pytest.mark.django_db
@pytest.mark.parametrize(("definition", "message"), BAD.values(), ids=BAD.keys())
def test_import_refuses_it_and_writes_nothing(tmp_path, definition, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(definition))
    with pytest.raises(CommandError) as refused:
        call_command("import_workflows", str(path), stdout=io.StringIO(), stderr=io.StringIO())
    assert message in str(refused.value)
    assert not WorkflowDefinition.objects.exists() and not Node.objects.exists() and not Edge.objects.exists()


@pytest.mark.django_db
def test_conditions_and_maps_round_trip_through_export_and_import(tmp_path):
    workflow = factories.workflow(factories.fan_spec())
    exported = definition_export(workflow)
    assert exported["edges"] == [["list", "upload"], {"from": "upload", "to": "publish", "when": "size(result) > 0"}]
    assert exported["nodes"][1]["map_over"] == "upstream.list.images" and "map_over" not in exported["nodes"][0]
    path = tmp_path / "fan.json"
    path.write_text(json.dumps(exported))
    call_command("import_workflows", str(path), stdout=io.StringIO())
    assert definition_export(WorkflowDefinition.objects.get(name="fan")) == exported
    assert WorkflowVersion.objects.filter(workflow__name="fan").count() == 1
