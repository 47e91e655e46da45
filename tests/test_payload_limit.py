"""A run's payload is a JSON object within EVENTFLOW["MAX_PAYLOAD_BYTES"], however the run starts:
the API, a published event, a schedule's tick or the trigger_workflow command."""

from __future__ import annotations

import json
import math

import pytest
from django.core.management import CommandError, call_command

from events_app.models import Event
from tests import factories
from workflows_app import engine, tasks
from workflows_app.models import TaskRun, WorkflowRun
from workflows_app.schedules import ScheduleError, scheduled_run_start, workflow_schedule_create

pytestmark = pytest.mark.django_db

LIMIT = 200
TOO_BIG = {"text": "x" * LIMIT}
EVENT_TYPE = "order.placed"


@pytest.fixture(autouse=True)
def small_limit(settings):
    settings.EVENTFLOW = {**settings.EVENTFLOW, "MAX_PAYLOAD_BYTES": LIMIT}


@pytest.fixture
def listener(db):
    """A workflow that starts on every published `order.placed`."""
    return factories.workflow(factories.spec("listener", trigger_event_types=[EVENT_TYPE]))


def written() -> dict[str, int]:
    """The rows a started run writes."""
    return {model.__name__: model.objects.count() for model in (WorkflowRun, TaskRun, Event)}


def test_the_check_takes_a_payload_up_to_the_limit_and_gives_it_back_as_stored_json():
    fits = {"text": "x" * (LIMIT - len('{"text": ""}'))}
    assert len(json.dumps(fits)) == LIMIT
    assert engine.run_payload_check(fits) == fits
    assert engine.run_payload_check({"pair": (1, 2)}) == {"pair": [1, 2]}
    with pytest.raises(engine.EngineError, match=f"payload is larger than {LIMIT} bytes") as refused:
        engine.run_payload_check({"text": fits["text"] + "x"})
    assert refused.value.status == 413


@pytest.mark.parametrize("payload", [[1, 2], "text", None, 3], ids=["list", "string", "null", "number"])
def test_the_check_refuses_what_is_not_a_json_object_with_400(payload):
    with pytest.raises(engine.EngineError, match="payload must be a JSON object") as refused:
        engine.run_payload_check(payload)
    assert refused.value.status == 400


@pytest.mark.parametrize("value", [math.nan, math.inf, object()], ids=["nan", "infinity", "object"])
def test_the_check_refuses_what_json_cannot_hold_with_400(value):
    with pytest.raises(engine.EngineError, match="payload is not JSON") as refused:
        engine.run_payload_check({"value": value})
    assert refused.value.status == 400


def test_the_api_trigger_answers_413_and_writes_nothing(api, listener):
    before = written()
    response = api.post("/api/workflows/listener/runs/", {"payload": TOO_BIG}, format="json")
    assert response.status_code == 413, response.content
    assert response.json()["detail"] == f"payload is larger than {LIMIT} bytes"
    assert written() == before


def test_the_api_trigger_answers_400_for_a_payload_that_is_not_an_object(api, listener):
    before = written()
    response = api.post("/api/workflows/listener/runs/", {"payload": ["a"]}, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["detail"] == "payload must be a JSON object"
    assert written() == before


def test_a_published_event_over_the_limit_is_413_and_stores_no_event(api, listener):
    before = written()
    response = api.post("/api/events/", {"event_type": EVENT_TYPE, "payload": TOO_BIG}, format="json")
    assert response.status_code == 413, response.content
    assert response.json()["detail"] == f"payload is larger than {LIMIT} bytes"
    assert written() == before
    response = api.post("/api/events/", {"event_type": EVENT_TYPE, "payload": "text"}, format="json")
    assert response.status_code == 400 and response.json()["detail"] == "payload must be a JSON object"
    assert written() == before
    # Within the limit, the same event starts its listener.
    response = api.post("/api/events/", {"event_type": EVENT_TYPE, "payload": {"n": 1}}, format="json")
    assert response.status_code == 201 and len(response.json()["trace_ids"]) == 1


def test_publishing_through_the_engine_refuses_too_and_stores_nothing(listener):
    before = written()
    with pytest.raises(engine.EngineError, match="larger than"):
        engine.event_publish(event_type=EVENT_TYPE, payload=TOO_BIG)
    assert written() == before


def test_the_trigger_command_fails_naming_the_limit_and_writes_nothing(listener):
    before = written()
    with pytest.raises(CommandError, match=f"payload is larger than {LIMIT} bytes"):
        call_command("trigger_workflow", "listener", "--payload", json.dumps(TOO_BIG))
    assert written() == before


def test_a_schedule_tick_over_the_limit_fails_naming_its_schedule_and_starts_nothing(listener):
    before = written()
    kwargs = {"workflow": "listener", "payload": TOO_BIG, "schedule": "listener-hourly"}
    tick = tasks.start_scheduled_run.apply(kwargs=kwargs, task_id="tick-too-big")
    assert tick.failed()
    with pytest.raises(ScheduleError, match=f"schedule 'listener-hourly': payload is larger than {LIMIT} bytes"):
        tick.get()
    with pytest.raises(ScheduleError, match="payload must be a JSON object"):
        scheduled_run_start(workflow="listener", payload=[1], schedule="listener-hourly", tick_id="tick-list")
    assert written() == before


def test_a_schedule_over_the_limit_is_refused_when_made(listener):
    from django_celery_beat.models import PeriodicTask

    with pytest.raises(ScheduleError, match=f"payload is larger than {LIMIT} bytes"):
        workflow_schedule_create(workflow=listener, name="too-big", payload=TOO_BIG, every_seconds=60)
    assert not PeriodicTask.objects.filter(name="too-big").exists()
