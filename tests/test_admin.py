"""The admin: pages answer, workflows are authored inline and validated as a DAG, runs and events are view only."""

from __future__ import annotations

from typing import Any

import pytest
from django import forms
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from events_app.models import Event, EventType
from tests import factories
from workflows_app import engine
from workflows_app.models import Edge, Node, TaskRun, WorkflowDefinition, WorkflowRun, WorkflowVersion

pytestmark = pytest.mark.django_db

ECHO = "workflows_app.tasks.echo"
SLEEP = "workflows_app.tasks.sleep"


# --------------------------------------------------------------------------- helpers


def url(name: str, *args: Any) -> str:
    return reverse(f"admin:{name}", args=args)


def wf_url(action: str, *args: Any) -> str:
    return url(f"workflows_app_workflowdefinition_{action}", *args)


def snapshot(workflow: WorkflowDefinition) -> dict:
    """Everything an admin submit could change about a workflow."""
    workflow.refresh_from_db()
    return {
        "version": workflow.version,
        "versions": workflow.versions.count(),
        "nodes": sorted(workflow.nodes.values_list("key", "task", "event_type_id")),
        "edges": sorted(workflow.edges.values_list("source__key", "target__key", "when")),
        "options": sorted(workflow.nodes.values_list("key", "options")),
        "all_nodes": Node.objects.count(),
        "all_edges": Edge.objects.count(),
    }


def _form_values(form: forms.BaseForm) -> dict[str, Any]:
    """What the browser would send for a form as rendered."""
    data: dict[str, Any] = {}
    for name, field in form.fields.items():
        bound = form[name]
        value = bound.value()
        if isinstance(field, forms.BooleanField):
            if value:
                data[bound.html_name] = "on"
        elif isinstance(field, forms.MultipleChoiceField):
            data[bound.html_name] = list(value or [])
        else:
            data[bound.html_name] = "" if value is None else value
        if field.show_hidden_initial:  # fields with a callable default also send their initial value
            data[bound.html_initial_name] = field.prepare_value(bound.initial)
    return data


class ChangeForm:
    """The POST body of an admin change (or add) page, built from the page itself, with row helpers."""

    def __init__(self, response):
        assert response.status_code == 200
        self.data = _form_values(response.context["adminform"].form)
        self.prefixes: dict[str, str] = {}
        self.rows: dict[str, list] = {}
        for inline in response.context["inline_admin_formsets"]:
            formset = inline.formset
            name = formset.model.__name__
            self.prefixes[name] = formset.prefix
            self.rows[name] = [form.instance for form in formset.forms]
            self.data.update(_form_values(formset.management_form))
            for form in formset.forms:
                self.data.update(_form_values(form))

    def field(self, model: str, index: int, name: str) -> str:
        return f"{self.prefixes[model]}-{index}-{name}"

    def index_of(self, model: str, **attrs: Any) -> int:
        for index, instance in enumerate(self.rows[model]):
            if instance.pk and all(getattr(instance, k) == v for k, v in attrs.items()):
                return index
        raise LookupError(attrs)

    def add_row(self, model: str, **values: Any) -> int:
        total_name = f"{self.prefixes[model]}-TOTAL_FORMS"
        index = int(self.data[total_name])
        self.data[total_name] = str(index + 1)
        self.set_row(model, index, **values)
        return index

    def set_row(self, model: str, index: int, **values: Any) -> None:
        for name, value in values.items():
            self.data[self.field(model, index, name)] = value

    def node(self, key: str, task: str = ECHO, event_type: str = "q_default", **extra: Any) -> dict:
        return {
            "key": key,
            "task": task,
            "event_type": event_type,
            "params": "{}",
            "max_retries": "0",
            "retry_delay": "1.0",
            "timeout": "",
            "trigger_rule": "all_success",
            **extra,
        }


def edge(workflow: WorkflowDefinition, source: str, target: str) -> dict:
    nodes = {n.key: n.pk for n in workflow.nodes.all()}
    return {"source": nodes[source], "target": nodes[target]}


def page_errors(response) -> list[str]:
    """The definition errors shown above the node and edge rows."""
    errors: list[str] = []
    for inline in response.context["inline_admin_formsets"]:
        errors += list(inline.formset.non_form_errors())
    return errors


def all_errors(response) -> list:
    """Every error on the page, for assertion messages."""
    found: list = [response.context["adminform"].form.errors]
    for inline in response.context["inline_admin_formsets"]:
        found += [inline.formset.non_form_errors(), *(f.errors for f in inline.formset.forms)]
    return [e for e in found if e]


@pytest.fixture
def chain(db) -> WorkflowDefinition:
    """a -> b -> c, all echo on q_default."""
    return factories.workflow(
        factories.spec("chain", [("a", ECHO), ("b", ECHO), ("c", ECHO)], [["a", "b"], ["b", "c"]])
    )


@pytest.fixture
def run(pipeline) -> WorkflowRun:
    """A started run of the product pipeline (its messages are never sent: the test transaction never commits)."""
    started, _ = engine.workflow_run_start(workflow=pipeline, payload={"product": "lamp"}, source="command")
    return started


# --------------------------------------------------------------------------- every page answers


def test_changelists_answer_200(admin_client, pipeline, run):
    for name in (
        "workflows_app_workflowdefinition_changelist",
        "workflows_app_workflowrun_changelist",
        "workflows_app_taskrun_changelist",
        "events_app_eventtype_changelist",
        "events_app_event_changelist",
    ):
        response = admin_client.get(url(name))
        assert response.status_code == 200, name


def test_changelist_searches_and_filters_answer_200(admin_client, pipeline, run):
    trace = str(run.trace_id)
    for path in (
        wf_url("changelist") + "?q=product&is_active__exact=1",
        url("workflows_app_workflowrun_changelist") + f"?q={trace[:8]}&status__exact=RUNNING",
        url("workflows_app_workflowrun_changelist") + f"?workflow__id__exact={pipeline.pk}",
        url("workflows_app_taskrun_changelist") + f"?q={trace}&status__exact=QUEUED",
        url("workflows_app_taskrun_changelist") + "?event_type__name__exact=product_src",
        url("events_app_event_changelist") + f"?q={trace}&status__exact=PENDING",
        url("events_app_eventtype_changelist") + "?q=product",
    ):
        response = admin_client.get(path)
        assert response.status_code == 200, path
    listed = admin_client.get(url("workflows_app_workflowrun_changelist") + f"?q={trace}")
    assert list(listed.context["cl"].result_list) == [run]


def test_change_pages_answer_200(admin_client, pipeline, run):
    task = run.tasks.get(node_key="intake")
    event = Event.objects.get(trace_id=run.trace_id)
    for path in (
        wf_url("add"),
        wf_url("change", pipeline.pk),
        url("workflows_app_workflowrun_change", run.pk),
        url("workflows_app_taskrun_change", task.pk),
        url("events_app_eventtype_add"),
        url("events_app_eventtype_change", "product_src"),
        url("events_app_event_change", event.pk),
    ):
        response = admin_client.get(path)
        assert response.status_code == 200, path


def test_run_page_links_to_the_status_page_and_lists_its_tasks(admin_client, run):
    response = admin_client.get(url("workflows_app_workflowrun_change", run.pk))
    content = response.content.decode()
    assert f'href="/runs/{run.trace_id}/"' in content
    inline = response.context["inline_admin_formsets"][0]
    assert {form.instance.node_key for form in inline.formset.forms} == set(
        run.tasks.values_list("node_key", flat=True)
    )


def test_workflow_page_links_to_its_drawing(admin_client, pipeline):
    response = admin_client.get(wf_url("change", pipeline.pk))
    assert 'href="/workflows/product_pipeline/"' in response.content.decode()
    listed = admin_client.get(wf_url("changelist"))
    assert 'href="/workflows/product_pipeline/"' in listed.content.decode()


@pytest.mark.parametrize(
    "name",
    [
        "workflows_app_workflowdefinition_changelist",
        "workflows_app_workflowrun_changelist",
        "workflows_app_taskrun_changelist",
        "events_app_eventtype_changelist",
        "events_app_event_changelist",
    ],
)
def test_changelist_query_count_does_not_grow_with_rows(admin_client, name):
    def queries_for(n: int) -> int:
        for i in range(n):
            wf = factories.workflow(
                factories.spec(f"wf-{name[:10]}-{i}", [("a", ECHO), ("b", ECHO)], [["a", "b"]], event_type=f"q{i}")
            )
            engine.workflow_run_start(workflow=wf, payload={})
        with CaptureQueriesContext(connection) as ctx:
            assert admin_client.get(url(name)).status_code == 200
        return len(ctx.captured_queries)

    few = queries_for(1)
    many = queries_for(4)
    assert many == few


# --------------------------------------------------------------------------- authoring workflows


def test_task_select_lists_registered_tasks_sorted(admin_client, chain):
    response = admin_client.get(wf_url("change", chain.pk))
    content = response.content.decode()
    assert f'<option value="{ECHO}"' in content
    formset = response.context["inline_admin_formsets"][0].formset
    values = [value for value, _ in formset.forms[0].fields["task"].widget.choices if value]
    assert ECHO in values and SLEEP in values
    assert values == sorted(values)


def test_a_stored_task_no_longer_registered_stays_visible_and_is_named(admin_client, chain):
    Node.objects.filter(workflow=chain, key="a").update(task="gone.tasks.old")
    response = admin_client.get(wf_url("change", chain.pk))
    assert '<option value="gone.tasks.old" selected>gone.tasks.old (not registered)</option>' in (
        response.content.decode()
    )
    page = ChangeForm(response)
    response = admin_client.post(wf_url("change", chain.pk), page.data)
    assert response.status_code == 200
    assert "node 'a': unknown task 'gone.tasks.old' (not a registered Celery task)" in page_errors(response)


def test_change_page_query_count_does_not_grow_with_nodes(admin_client, chain, pipeline):
    def queries_for(workflow: WorkflowDefinition) -> int:
        with CaptureQueriesContext(connection) as ctx:
            assert admin_client.get(wf_url("change", workflow.pk)).status_code == 200
        return len(ctx.captured_queries)

    assert queries_for(pipeline) <= queries_for(chain)


@pytest.mark.parametrize("value", ['{"product.created": true}', "null", ""])
def test_bad_trigger_event_types_are_refused(admin_client, chain, value):
    before = snapshot(chain)
    page = ChangeForm(admin_client.get(wf_url("change", chain.pk)))
    page.data["trigger_event_types"] = value
    response = admin_client.post(wf_url("change", chain.pk), page.data)
    assert response.status_code == 200
    assert "trigger_event_types must be a list of event type names" in page_errors(response)
    assert snapshot(chain) == before
    assert WorkflowDefinition.objects.get(pk=chain.pk).trigger_event_types == []


def test_edge_choices_are_the_nodes_of_this_workflow_only(admin_client, chain, pipeline):
    response = admin_client.get(wf_url("change", chain.pk))
    formset = response.context["inline_admin_formsets"][1].formset
    for name in ("source", "target"):
        queryset = formset.forms[0].fields[name].queryset
        assert sorted(queryset.values_list("key", flat=True)) == ["a", "b", "c"]


def test_add_workflow_with_nodes_then_edges_creates_versions(admin_client):
    EventType.objects.create(name="q_admin", concurrency=2)
    page = ChangeForm(admin_client.get(wf_url("add")))
    assert list(page.prefixes) == ["Node"]  # edges link saved nodes: they come on the next save
    page.data.update({"name": "authored", "description": "made in the admin", "trigger_event_types": "[]"})
    page.data["is_active"] = "on"
    page.set_row("Node", 0, **page.node("first", event_type="q_admin"))
    page.add_row("Node", **page.node("second", task=SLEEP, event_type="q_admin", params='{"seconds": 0.1}'))
    response = admin_client.post(wf_url("add"), page.data)
    assert response.status_code == 302, all_errors(response)
    workflow = WorkflowDefinition.objects.get(name="authored")
    assert workflow.version == 1
    assert list(workflow.versions.values_list("version", flat=True)) == [1]
    assert sorted(workflow.nodes.values_list("key", flat=True)) == ["first", "second"]
    assert workflow.nodes.get(key="second").params == {"seconds": 0.1}

    page = ChangeForm(admin_client.get(wf_url("change", workflow.pk)))
    page.set_row("Edge", 0, **edge(workflow, "first", "second"))
    response = admin_client.post(wf_url("change", workflow.pk), page.data)
    assert response.status_code == 302, all_errors(response)
    workflow.refresh_from_db()
    assert workflow.version == 2
    assert workflow.versions.get(version=2).spec["edges"] == [["first", "second"]]
    assert workflow.versions.get(version=1).spec["edges"] == []


def test_add_workflow_without_nodes_is_refused(admin_client):
    page = ChangeForm(admin_client.get(wf_url("add")))
    page.data.update({"name": "empty", "trigger_event_types": "[]"})
    response = admin_client.post(wf_url("add"), page.data)
    assert response.status_code == 200
    assert "nodes must be a non-empty list" in page_errors(response)
    assert not WorkflowDefinition.objects.filter(name="empty").exists()


def test_saving_unchanged_keeps_the_version(admin_client, chain):
    before = snapshot(chain)
    page = ChangeForm(admin_client.get(wf_url("change", chain.pk)))
    response = admin_client.post(wf_url("change", chain.pk), page.data)
    assert response.status_code == 302, all_errors(response)
    assert snapshot(chain) == before


def test_cycle_is_refused_naming_it_and_nothing_changes(admin_client, chain):
    before = snapshot(chain)
    page = ChangeForm(admin_client.get(wf_url("change", chain.pk)))
    page.set_row("Edge", len(page.rows["Edge"]) - 1, **edge(chain, "c", "a"))
    # A node change in the same submit must not be written either.
    page.set_row("Node", page.index_of("Node", key="b"), task=SLEEP)
    response = admin_client.post(wf_url("change", chain.pk), page.data)
    assert response.status_code == 200
    errors = page_errors(response)
    assert any(e.startswith("cycle: ") and all(k in e for k in "abc") for e in errors), errors
    assert "cycle: " in response.content.decode()
    assert snapshot(chain) == before


def test_unknown_task_is_refused(admin_client, chain):
    before = snapshot(chain)
    page = ChangeForm(admin_client.get(wf_url("change", chain.pk)))
    page.set_row("Node", page.index_of("Node", key="a"), task="nowhere.tasks.missing")
    response = admin_client.post(wf_url("change", chain.pk), page.data)
    assert response.status_code == 200
    assert "node 'a': unknown task 'nowhere.tasks.missing' (not a registered Celery task)" in page_errors(response)
    assert snapshot(chain) == before


def test_self_edge_is_refused(admin_client, chain):
    before = snapshot(chain)
    page = ChangeForm(admin_client.get(wf_url("change", chain.pk)))
    page.set_row("Edge", len(page.rows["Edge"]) - 1, **edge(chain, "b", "b"))
    response = admin_client.post(wf_url("change", chain.pk), page.data)
    assert response.status_code == 200
    assert "edge b -> b: a node cannot depend on itself" in page_errors(response)
    assert snapshot(chain) == before


def test_duplicate_edge_is_refused(admin_client, chain):
    before = snapshot(chain)
    page = ChangeForm(admin_client.get(wf_url("change", chain.pk)))
    page.set_row("Edge", len(page.rows["Edge"]) - 1, **edge(chain, "a", "b"))
    response = admin_client.post(wf_url("change", chain.pk), page.data)
    assert response.status_code == 200
    assert "edge a -> b: duplicate edge" in page_errors(response)
    assert snapshot(chain) == before


def test_duplicate_key_is_refused(admin_client, chain):
    before = snapshot(chain)
    page = ChangeForm(admin_client.get(wf_url("change", chain.pk)))
    page.set_row("Node", len(page.rows["Node"]) - 1, **page.node("a"))
    response = admin_client.post(wf_url("change", chain.pk), page.data)
    assert response.status_code == 200
    assert "node 'a': duplicate key" in page_errors(response)
    assert snapshot(chain) == before


@pytest.mark.parametrize("value", ["[1, 2]", "null", ""])
def test_params_must_be_an_object(admin_client, chain, value):
    before = snapshot(chain)
    page = ChangeForm(admin_client.get(wf_url("change", chain.pk)))
    page.set_row("Node", page.index_of("Node", key="a"), params=value)
    response = admin_client.post(wf_url("change", chain.pk), page.data)
    assert response.status_code == 200
    assert "node 'a': params must be an object" in page_errors(response)
    assert snapshot(chain) == before


def test_unknown_trigger_rule_is_refused(admin_client, chain):
    before = snapshot(chain)
    page = ChangeForm(admin_client.get(wf_url("change", chain.pk)))
    page.set_row("Node", page.index_of("Node", key="a"), trigger_rule="whenever")
    response = admin_client.post(wf_url("change", chain.pk), page.data)
    assert response.status_code == 200
    assert "whenever" in response.content.decode()
    assert snapshot(chain) == before


def test_edge_to_a_node_of_another_workflow_is_refused(admin_client, chain, pipeline):
    before = snapshot(chain)
    page = ChangeForm(admin_client.get(wf_url("change", chain.pk)))
    foreign = pipeline.nodes.get(key="intake")
    page.set_row("Edge", len(page.rows["Edge"]) - 1, source=chain.nodes.get(key="c").pk, target=foreign.pk)
    response = admin_client.post(wf_url("change", chain.pk), page.data)
    assert response.status_code == 200
    edge_formset = response.context["inline_admin_formsets"][1].formset
    assert edge_formset.forms[-1].errors["target"]
    assert snapshot(chain) == before
    assert not Edge.objects.filter(target=foreign, workflow=chain).exists()


def test_edge_to_a_node_deleted_in_the_same_submit_is_refused(admin_client, chain):
    before = snapshot(chain)
    page = ChangeForm(admin_client.get(wf_url("change", chain.pk)))
    page.set_row("Node", page.index_of("Node", key="c"), DELETE="on")
    response = admin_client.post(wf_url("change", chain.pk), page.data)
    assert response.status_code == 200
    assert "edge b -> c (deleted): unknown node 'c (deleted)'" in page_errors(response)
    assert snapshot(chain) == before

    # Deleting the edge with it is fine, and makes a new version.
    page.set_row("Edge", page.index_of("Edge", source=chain.nodes.get(key="b")), DELETE="on")
    response = admin_client.post(wf_url("change", chain.pk), page.data)
    assert response.status_code == 302, all_errors(response)
    after = snapshot(chain)
    assert after["nodes"] == [("a", ECHO, "q_default"), ("b", ECHO, "q_default")]
    assert after["edges"] == [("a", "b", "")]
    assert after["version"] == before["version"] + 1


def test_rename_a_node_and_link_it_in_one_submit(admin_client, chain):
    page = ChangeForm(admin_client.get(wf_url("change", chain.pk)))
    page.set_row("Node", page.index_of("Node", key="c"), key="last")
    page.set_row("Edge", len(page.rows["Edge"]) - 1, **edge(chain, "a", "c"))
    response = admin_client.post(wf_url("change", chain.pk), page.data)
    assert response.status_code == 302, all_errors(response)
    chain.refresh_from_db()
    spec = chain.versions.get(version=chain.version).spec
    assert chain.version == 2
    assert sorted(map(tuple, spec["edges"])) == [("a", "b"), ("a", "last"), ("b", "last")]


def test_runs_in_flight_keep_their_version(admin_client, chain):
    started, _ = engine.workflow_run_start(workflow=chain, payload={})
    page = ChangeForm(admin_client.get(wf_url("change", chain.pk)))
    page.set_row("Node", page.index_of("Node", key="b"), task=SLEEP)
    response = admin_client.post(wf_url("change", chain.pk), page.data)
    assert response.status_code == 302, all_errors(response)
    started.refresh_from_db()
    chain.refresh_from_db()
    assert (started.workflow_version, chain.version) == (1, 2)
    assert {n["key"]: n["task"] for n in started.version.spec["nodes"]}["b"] == ECHO


def test_event_type_can_be_added_from_the_node_row(admin_client, chain):
    response = admin_client.get(wf_url("change", chain.pk))
    assert reverse("admin:events_app_eventtype_add") + "?_to_field=name&amp;_popup=1" in response.content.decode()


def test_activate_and_deactivate_actions(admin_client, chain, pipeline):
    changelist = wf_url("changelist")
    selected = [chain.pk, pipeline.pk]
    response = admin_client.post(changelist, {"action": "deactivate", "_selected_action": selected})
    assert response.status_code == 302
    assert not WorkflowDefinition.objects.filter(is_active=True).exists()
    admin_client.post(changelist, {"action": "activate", "_selected_action": [chain.pk]})
    assert list(WorkflowDefinition.objects.filter(is_active=True).values_list("name", flat=True)) == ["chain"]


def test_workflow_changelist_counts_nodes(admin_client, chain, pipeline):
    response = admin_client.get(wf_url("changelist"))
    counts = {wf.name: wf.node_count for wf in response.context["cl"].result_list}
    assert counts == {"chain": 3, "product_pipeline": 7}


# --------------------------------------------------------------------------- view-only admins


@pytest.mark.parametrize("model", ["workflows_app_workflowrun", "workflows_app_taskrun", "events_app_event"])
def test_runs_tasks_and_events_refuse_add(admin_client, model):
    assert admin_client.get(url(f"{model}_add")).status_code == 403


def test_runs_tasks_and_events_refuse_change_and_delete(admin_client, run):
    task = run.tasks.first()
    event = Event.objects.filter(trace_id=run.trace_id).first()
    for model, pk in (
        ("workflows_app_workflowrun", run.pk),
        ("workflows_app_taskrun", task.pk),
        ("events_app_event", event.pk),
    ):
        assert admin_client.post(url(f"{model}_change", pk), {"status": "SUCCESS"}).status_code == 403
        assert admin_client.get(url(f"{model}_delete", pk)).status_code == 403
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.RUNNING
    assert Event.objects.filter(trace_id=run.trace_id).count() >= 1


# --------------------------------------------------------------------------- event types


def test_event_type_changelist_shows_running_and_queued(admin_client):
    wf = factories.workflow(factories.spec("wide", [("a", ECHO), ("b", ECHO), ("c", ECHO)], event_type="narrow"))
    engine.workflow_run_start(workflow=wf, payload={})
    response = admin_client.get(url("events_app_eventtype_changelist"))
    row = next(t for t in response.context["cl"].result_list if t.name == "narrow")
    assert (row.concurrency, row.running, row.queued) == (1, 1, 2)


def test_changing_concurrency_in_the_change_form_admits_waiting_tasks(admin_client):
    wf = factories.workflow(factories.spec("wide", [("a", ECHO), ("b", ECHO), ("c", ECHO)], event_type="narrow"))
    started, _ = engine.workflow_run_start(workflow=wf, payload={})
    assert started.tasks.filter(holds_slot=True).count() == 1
    change = url("events_app_eventtype_change", "narrow")
    page = ChangeForm(admin_client.get(change))
    page.data["concurrency"] = "3"
    response = admin_client.post(change, page.data)
    assert response.status_code == 302
    assert EventType.objects.get(name="narrow").concurrency == 3
    assert started.tasks.filter(holds_slot=True).count() == 3
    assert not started.tasks.filter(status=TaskRun.Status.QUEUED, holds_slot=False).exists()


def test_changing_concurrency_in_the_list_admits_waiting_tasks(admin_client):
    wf = factories.workflow(factories.spec("wide", [("a", ECHO), ("b", ECHO), ("c", ECHO)], event_type="narrow"))
    started, _ = engine.workflow_run_start(workflow=wf, payload={})
    changelist = url("events_app_eventtype_changelist")
    response = admin_client.get(changelist)
    formset = response.context["cl"].formset
    data = _form_values(formset.management_form)
    for form in formset.forms:
        data.update(_form_values(form))
        if form.instance.name == "narrow":
            data[form["concurrency"].html_name] = "2"
    data["_save"] = "Save"
    response = admin_client.post(changelist, data)
    assert response.status_code == 302
    assert EventType.objects.get(name="narrow").concurrency == 2
    assert started.tasks.filter(holds_slot=True).count() == 2


@pytest.fixture
def limit_changes(monkeypatch) -> list[dict]:
    """The calls of engine.event_type_update, which still does its work."""
    calls: list[dict] = []
    original = engine.event_type_update

    def recorded(**kwargs: Any) -> EventType:
        calls.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(engine, "event_type_update", recorded)
    return calls


def test_a_new_limit_from_the_change_form_or_the_list_goes_through_the_engine(admin_client, limit_changes):
    EventType.objects.create(name="narrow", concurrency=1)
    change = url("events_app_eventtype_change", "narrow")
    page = ChangeForm(admin_client.get(change))
    page.data["concurrency"] = "4"
    assert admin_client.post(change, page.data).status_code == 302
    assert limit_changes == [{"name": "narrow", "concurrency": 4}]

    changelist = url("events_app_eventtype_changelist")
    formset = admin_client.get(changelist).context["cl"].formset
    data = {**_form_values(formset.management_form), "_save": "Save"}
    for form in formset.forms:
        data.update(_form_values(form))
        data[form["concurrency"].html_name] = "2"
    assert admin_client.post(changelist, data).status_code == 302
    assert limit_changes[1:] == [{"name": "narrow", "concurrency": 2}]
    assert EventType.objects.get(name="narrow").concurrency == 2


def test_a_description_edit_keeps_the_limit_and_leaves_the_engine_alone(admin_client, limit_changes):
    EventType.objects.create(name="narrow", concurrency=3, description="old")
    before = EventType.objects.get(name="narrow").updated_at
    change = url("events_app_eventtype_change", "narrow")
    page = ChangeForm(admin_client.get(change))
    page.data["description"] = "the narrow queue"
    assert admin_client.post(change, page.data).status_code == 302
    saved = EventType.objects.get(name="narrow")
    assert (saved.description, saved.concurrency) == ("the narrow queue", 3)
    assert saved.updated_at > before
    assert limit_changes == []


def test_an_edit_never_writes_back_a_count_of_held_slots_taken_meanwhile(admin_client, monkeypatch):
    """The change form reads the row, then a run takes both slots before the form is saved: the
    description is saved, and the count stays admission's (writing back the one read would let the
    next admission hand out a third task)."""
    from events_app.admin import EventTypeAdmin

    wf = factories.workflow(factories.spec("wide", [("a", ECHO), ("b", ECHO), ("c", ECHO)], event_type="narrow"))
    EventType.objects.filter(name="narrow").update(concurrency=2)
    change = url("events_app_eventtype_change", "narrow")
    page = ChangeForm(admin_client.get(change))
    read = EventTypeAdmin.get_object
    started = []

    def read_then_a_run_starts(self, *args: Any, **kwargs: Any) -> EventType | None:
        obj = read(self, *args, **kwargs)
        if self.model is EventType and not started:
            started.append(engine.workflow_run_start(workflow=wf, payload={})[0])
        return obj

    monkeypatch.setattr(EventTypeAdmin, "get_object", read_then_a_run_starts)
    page.data["description"] = "edited while busy"
    assert admin_client.post(change, page.data).status_code == 302
    assert started, "the run started between the read and the save"
    saved = EventType.objects.get(name="narrow")
    assert (saved.description, saved.concurrency, saved.held) == ("edited while busy", 2, 2)
    assert TaskRun.objects.filter(event_type_id="narrow", holds_slot=True).count() == 2
    assert started[0].tasks.filter(status=TaskRun.Status.QUEUED, holds_slot=False).count() == 1


def test_concurrency_below_one_is_refused(admin_client):
    EventType.objects.create(name="narrow", concurrency=2)
    change = url("events_app_eventtype_change", "narrow")
    page = ChangeForm(admin_client.get(change))
    page.data["concurrency"] = "0"
    response = admin_client.post(change, page.data)
    assert response.status_code == 200
    assert EventType.objects.get(name="narrow").concurrency == 2


def test_event_type_name_is_read_only_once_saved(admin_client):
    EventType.objects.create(name="narrow")
    change = url("events_app_eventtype_change", "narrow")
    page = ChangeForm(admin_client.get(change))
    assert "name" not in page.data
    page.data["name"] = "renamed"
    assert admin_client.post(change, page.data).status_code == 302
    assert list(EventType.objects.values_list("name", flat=True)) == ["narrow"]


def test_versions_are_untouched_by_event_type_edits(admin_client, pipeline):
    before = WorkflowVersion.objects.count()
    change = url("events_app_eventtype_change", "product_image")
    page = ChangeForm(admin_client.get(change))
    page.data["concurrency"] = "4"
    assert admin_client.post(change, page.data).status_code == 302
    assert WorkflowVersion.objects.count() == before


# --------------------------------------------------------------------------- conditions and maps


def test_a_condition_and_a_map_over_are_saved_from_the_change_form(admin_client, chain):
    page = ChangeForm(admin_client.get(wf_url("change", chain.pk)))
    page.set_row("Edge", page.index_of("Edge", source=chain.nodes.get(key="a")), when="has(result.items)")
    page.set_row("Node", page.index_of("Node", key="b"), map_over="upstream.a.items")

    response = admin_client.post(wf_url("change", chain.pk), page.data)

    assert response.status_code == 302, all_errors(response)
    chain.refresh_from_db()
    spec = chain.versions.get(version=chain.version).spec
    assert spec["edges"] == [{"from": "a", "to": "b", "when": "has(result.items)"}, ["b", "c"]]
    assert spec["nodes"][1]["map_over"] == "upstream.a.items" and "map_over" not in spec["nodes"][0]
    assert chain.nodes.get(key="b").options == {"map_over": "upstream.a.items"}
    # Shown again in its own field, not inside options; emptied, the node is no longer mapped.
    again = ChangeForm(admin_client.get(wf_url("change", chain.pk)))
    b = again.index_of("Node", key="b")
    assert again.data[again.field("Node", b, "map_over")] == "upstream.a.items"
    assert "map_over" not in again.data[again.field("Node", b, "options")]
    again.set_row("Node", b, map_over="")
    assert admin_client.post(wf_url("change", chain.pk), again.data).status_code == 302
    assert chain.nodes.get(key="b").options == {}
    assert Edge.objects.get(workflow=chain, source__key="a").when == "has(result.items)"


@pytest.mark.parametrize(
    ("when", "needle"),
    [
        ("result.ok &&", "edge a -> b: when"),
        ("upstream.c.done", "edge a -> b: when `upstream.c.done` reads upstream.c"),
    ],
)
def test_a_bad_condition_is_refused_naming_the_edge(admin_client, chain, when, needle):
    before = snapshot(chain)
    page = ChangeForm(admin_client.get(wf_url("change", chain.pk)))
    page.set_row("Edge", page.index_of("Edge", source=chain.nodes.get(key="a")), when=when)
    # A change to a node in the same submit must not be written either.
    page.set_row("Node", page.index_of("Node", key="c"), task=SLEEP)

    response = admin_client.post(wf_url("change", chain.pk), page.data)

    assert response.status_code == 200
    assert any(e.startswith(needle) for e in page_errors(response)), page_errors(response)
    assert snapshot(chain) == before


@pytest.mark.parametrize(
    ("map_over", "needle"),
    [
        ("upstream.c.items", "node 'b': map_over `upstream.c.items` reads upstream.c, which is not a predecessor"),
        ("[1, 2", "node 'b': map_over"),
        ("1 + 1", "node 'b': map_over `1 + 1` gives"),
    ],
)
def test_a_bad_map_over_is_refused_naming_the_node(admin_client, chain, map_over, needle):
    before = snapshot(chain)
    page = ChangeForm(admin_client.get(wf_url("change", chain.pk)))
    page.set_row("Node", page.index_of("Node", key="b"), map_over=map_over)

    response = admin_client.post(wf_url("change", chain.pk), page.data)

    assert response.status_code == 200
    assert any(e.startswith(needle) for e in page_errors(response)), page_errors(response)
    assert snapshot(chain) == before


def test_map_over_written_into_options_is_refused(admin_client, chain):
    before = snapshot(chain)
    page = ChangeForm(admin_client.get(wf_url("change", chain.pk)))
    page.set_row("Node", page.index_of("Node", key="b"), options='{"map_over": "upstream.a.items"}')

    response = admin_client.post(wf_url("change", chain.pk), page.data)

    assert response.status_code == 200
    assert "Set map_over in its own field" in response.content.decode()
    assert snapshot(chain) == before


def test_run_page_lists_each_node_once_however_many_instances(admin_client):
    workflow = factories.workflow(
        factories.spec(
            "fan",
            [("list", ECHO), {"key": "upload", "task": ECHO, "map_over": "upstream.list.images"}],
            [["list", "upload"]],
        )
    )
    started, _ = engine.workflow_run_start(workflow=workflow, payload={})
    factories.map_instances(started, "upload", ["SUCCESS"] * 30)

    html = admin_client.get(url("workflows_app_workflowrun_change", started.pk)).content.decode()
    tasks = admin_client.get(url("workflows_app_taskrun_changelist"), {"q": str(started.trace_id)})

    assert html.count('<td class="field-node_key">') == 2
    assert tasks.status_code == 200 and tasks.context["cl"].result_count == 32
