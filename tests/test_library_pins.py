"""Behaviour of other libraries that the project relies on beyond their documented APIs: each test
says what is relied on and where, and fails when the library changes it."""

from __future__ import annotations

import copy
import inspect
import json
import uuid

import pytest
import redis
from celery import states
from django.conf import settings
from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.models import Group, Permission
from django_celery_results.backends.database import DatabaseBackend
from django_celery_results.models import TaskResult
from kombu import Connection, Exchange, Queue
from kombu.transport import redis as kombu_redis
from rest_framework import serializers
from rest_framework.authtoken.models import Token

from workflows_app import transport
from workflows_app.api import views
from workflows_app.api.authentication import MODEL_BACKEND_ONLY, TokenAuthentication
from workflows_app.celery_task import celery_result_row
from workflows_app.engine.sql import CELERY_RESULT_COLUMNS
from workflows_app.tasks import echo

# --------------------------------------------------------------------------- Django: user._perm_cache


@pytest.mark.django_db
def test_model_backend_answers_permission_checks_from_perm_cache_without_a_query(
    django_user_model, django_assert_num_queries
):
    """workflows_app/api/authentication.py (TokenAuthentication.authenticate_credentials) puts the
    names of the user's permissions in `user._perm_cache`, read in its token statement, so that the
    permission checks of the request (`user.has_perm` in views.require) ask no more queries. That
    holds while ModelBackend is the only backend and its `get_all_permissions` returns
    `_perm_cache` when the attribute is set."""
    assert list(settings.AUTHENTICATION_BACKENDS) == MODEL_BACKEND_ONLY
    user = django_user_model.objects.create_user(username="cached", password="pw-cached-123")
    user._perm_cache = {"workflows_app.add_workflowrun"}
    with django_assert_num_queries(0):
        assert user.has_perm("workflows_app.add_workflowrun")
        assert not user.has_perm("workflows_app.change_workflowrun")
        assert ModelBackend().has_perm(user, "workflows_app.add_workflowrun")
        assert ModelBackend().get_all_permissions(user) is user._perm_cache


@pytest.mark.django_db
def test_model_backend_keeps_in_perm_cache_the_names_the_token_statement_reads(django_user_model):
    """The set authentication.py stores must be what ModelBackend itself would store there, in the
    same attribute: "app_label.codename" for the user's own permissions and its groups'."""
    user = django_user_model.objects.create_user(username="grouped", password="pw-grouped-123")
    user.user_permissions.add(Permission.objects.get(codename="add_workflowrun"))
    group = Group.objects.create(name="operators")
    group.permissions.add(Permission.objects.get(codename="change_eventtype"))
    user.groups.add(group)
    key = Token.objects.create(user=user).key

    authenticated, _ = TokenAuthentication().authenticate_credentials(key)
    fresh = django_user_model.objects.get(pk=user.pk)
    assert not hasattr(fresh, "_perm_cache")
    django_reads = ModelBackend().get_all_permissions(fresh)
    assert fresh._perm_cache is django_reads  # where ModelBackend keeps them
    assert authenticated._perm_cache == django_reads == {"workflows_app.add_workflowrun", "events_app.change_eventtype"}


# --------------------------------------------------------------------------- django-celery-results' backend helpers


def test_the_result_backend_helpers_celery_result_row_calls_still_exist():
    """workflows_app/celery_task.py (celery_result_row) calls DatabaseBackend's private
    `_get_meta_from_request(request)` and `_get_extended_properties(request, traceback)`."""
    meta = inspect.signature(DatabaseBackend._get_meta_from_request)
    assert list(meta.parameters) == ["self", "request"] and meta.parameters["request"].default is None
    assert list(inspect.signature(DatabaseBackend._get_extended_properties).parameters) == [
        "self",
        "request",
        "traceback",
    ]


@pytest.mark.django_db
def test_celery_result_row_is_the_row_django_celery_results_stores_itself():
    """celery_result_row builds Celery's result row of a success with the backend's helpers; the
    engine writes it (workflows_app/engine/sql.py, `CELERY_RESULT_COLUMNS`, through
    jsonb_populate_record) in the transaction of the outcome, and Celery then stores nothing. So
    its keys must be TaskResult's columns the engine writes, and each value what the backend's own
    store_result would write, meta (the request's `meta`, and `children`) included."""
    task_id = str(uuid.uuid4())
    event = {"event_id": task_id, "payload": {"n": 1}, "context": {"upstream": {}}}
    retval = echo.run(event)
    echo.push_request(
        id=task_id,
        task=echo.name,
        args=[event],
        kwargs={},
        argsrepr=repr([event]),
        kwargsrepr="{}",
        hostname="pin@host",
        meta={"tenant": "t-1"},
        ignore_result=False,
    )
    try:
        assert isinstance(echo.backend, DatabaseBackend)
        row = celery_result_row(echo, retval)
        assert row is not None
        echo.backend.store_result(task_id, retval, states.SUCCESS, request=echo.request)
    finally:
        echo.pop_request()

    columns = {field.attname for field in TaskResult._meta.concrete_fields}
    assert set(CELERY_RESULT_COLUMNS) <= columns
    assert set(row) == set(CELERY_RESULT_COLUMNS) - {"date_created", "date_done"}
    stored = TaskResult.objects.get(task_id=task_id)
    assert {name: getattr(stored, name) for name in row} == row
    assert (row["status"], row["task_name"], row["worker"]) == ("SUCCESS", echo.name, "pin@host")
    assert json.loads(row["result"]) == retval
    assert json.loads(row["meta"]) == {"tenant": "t-1", "children": []}


# --------------------------------------------------------------------------- DRF: ModelOutputSerializer's field cache

OUTPUT_SERIALIZERS = [
    cls
    for cls in vars(views).values()
    if isinstance(cls, type) and issubclass(cls, views.ModelOutputSerializer) and cls is not views.ModelOutputSerializer
]
CONTAINERS = (list, dict, set)


def _state(field: serializers.Field) -> dict[str, tuple[int, object]]:
    """Each attribute of the field, by identity, with a copy of the contents of its containers."""
    return {
        name: (id(value), copy.copy(value) if isinstance(value, CONTAINERS) else None)
        for name, value in vars(field).items()
    }


def _built(cls: type[serializers.Serializer]) -> dict[str, serializers.Field]:
    cls().fields  # noqa: B018 - builds the class's cache, as the first instance does
    return cls.__dict__["_built_fields"]


def test_every_output_serializer_is_found():
    assert {cls.__name__ for cls in OUTPUT_SERIALIZERS} >= {
        "TaskRunOutputSerializer",
        "RunOutputSerializer",
        "RunDetailOutputSerializer",
        "EventOutputSerializer",
        "EventTypeOutputSerializer",
        "TaskResultOutputSerializer",
    }


@pytest.mark.parametrize("cls", OUTPUT_SERIALIZERS, ids=lambda cls: cls.__name__)
def test_drf_builds_new_field_instances_on_every_get_fields(cls):
    """workflows_app/api/views.py (ModelOutputSerializer.get_fields) keeps the fields of one call of
    DRF's ModelSerializer.get_fields for its class: they must belong to that call alone, which DRF
    ensures by deep-copying declared fields and building the others anew each time."""
    first = serializers.ModelSerializer.get_fields(cls())
    second = serializers.ModelSerializer.get_fields(cls())
    assert first.keys() == second.keys()
    assert not {id(f) for f in first.values()} & {id(f) for f in second.values()}


@pytest.mark.parametrize("cls", OUTPUT_SERIALIZERS, ids=lambda cls: cls.__name__)
def test_binding_a_shallow_copy_of_a_plain_field_leaves_the_cached_field_as_it_was(cls):
    """ModelOutputSerializer gives each instance shallow copies of its cached plain fields, which
    DRF binds to that instance (Field.bind, through the serializer's BindingDict). That is safe
    while binding only assigns attributes of the copy: were it to change a list or dict the copy
    shares with the cached field (validators, error messages...), or the field itself, this fails."""
    instance = cls()
    for name, cached in _built(cls).items():
        if isinstance(cached, serializers.BaseSerializer):
            continue  # deep-copied, so binding it binds its own child
        before = _state(cached)
        bound = copy.copy(cached)
        # A name and a parent no binding used before, so whatever it would write differs from the last.
        bound.bind(field_name=f"pinned_{name}", parent=instance)
        assert (bound.field_name, bound.parent) == (f"pinned_{name}", instance)
        assert (cached.field_name, cached.parent) == (None, None), f"{cls.__name__}.{name}: the cached field was bound"
        assert _state(cached) == before, f"{cls.__name__}.{name}: binding a copy changed the cached field"


@pytest.mark.parametrize("cls", OUTPUT_SERIALIZERS, ids=lambda cls: cls.__name__)
def test_the_fields_each_instance_gets_are_its_own_and_bound_to_it(cls):
    """DRF binds what get_fields returns when it builds `serializer.fields`, once per instance; the
    cache is never bound, and no plain field holds a sub-field (a ListField's `child`), which a
    shallow copy would share with the cached field."""
    one, two = cls(), cls()
    for name, cached in _built(cls).items():
        assert one.fields[name] is not cached and one.fields[name] is not two.fields[name]
        assert one.fields[name].parent is one and two.fields[name].parent is two
        assert cached.parent is None
        if not isinstance(cached, serializers.BaseSerializer):
            assert not hasattr(cached, "child") and not hasattr(cached, "child_relation"), f"{cls.__name__}.{name}"


# --------------------------------------------------------------------------- kombu: Channel.conn_or_acquire


@pytest.fixture
def redis_url() -> str:
    if not settings.CELERY_BROKER_URL.startswith("redis://"):
        pytest.fail("these tests publish to the Redis broker the test settings name")
    return settings.CELERY_BROKER_URL


def test_kombus_redis_channel_still_has_conn_or_acquire_as_the_override_expects():
    """workflows_app/transport.py overrides kombu's Redis `Channel.conn_or_acquire(client=None)`, the
    context manager through which kombu's channel sends its commands, and builds its one client
    per pool with the private `Channel._create_client()`."""
    acquire = kombu_redis.Channel.conn_or_acquire
    signature = inspect.signature(acquire)
    assert list(signature.parameters) == ["self", "client"] and signature.parameters["client"].default is None
    assert inspect.isgeneratorfunction(acquire.__wrapped__)  # a @contextmanager
    assert inspect.isgeneratorfunction(transport.Channel.conn_or_acquire.__wrapped__)
    create = inspect.signature(kombu_redis.Channel._create_client)
    assert all(p.default is not inspect.Parameter.empty for name, p in create.parameters.items() if name != "self")


def test_kombus_conn_or_acquire_yields_the_given_client_or_one_over_the_channels_pool(redis_url):
    """The contract the override keeps: a client given is yielded as is; otherwise kombu yields a
    client over the channel's connection pool (`channel.pool`, the same object until kombu replaces
    it on reconnect) and leaves it open after use, so one client per pool serves as well."""
    with Connection(redis_url) as conn:
        channel = conn.channel()
        try:
            assert type(channel) is kombu_redis.Channel
            given = object()
            with channel.conn_or_acquire(given) as client:
                assert client is given
            assert channel.pool is channel.pool
            with channel.conn_or_acquire() as client:
                assert isinstance(client, redis.Redis) and client.connection_pool is channel.pool
            assert client.ping()  # still usable: kombu did not close it
            assert channel._create_client().connection_pool is channel.pool
        finally:
            channel.close()


def test_a_message_round_trips_through_the_projects_transport_with_one_client(redis_url, monkeypatch):
    """Publishing through `workflows_app.transport:Transport` (CELERY_BROKER_TRANSPORT for redis://
    URLs) reaches the real Redis and comes back, kombu sending its commands through
    conn_or_acquire, and every one of them through the channel's one client."""
    acquired, created = [], []
    override, create = transport.Channel.conn_or_acquire, transport.Channel._create_client

    def counting_acquire(self, client=None):
        acquired.append(client)
        return override(self, client)

    def counting_create(self, asynchronous=False):
        client = create(self, asynchronous)
        if not asynchronous:  # the consumer's own client (BRPOP) is kombu's, one per channel
            created.append(client)
        return client

    monkeypatch.setattr(transport.Channel, "conn_or_acquire", counting_acquire)
    monkeypatch.setattr(transport.Channel, "_create_client", counting_create)
    name = f"pin-{uuid.uuid4().hex}"
    queue = Queue(name, Exchange(name), routing_key=name)
    with Connection(redis_url, transport="workflows_app.transport:Transport") as conn:
        assert isinstance(conn.default_channel, transport.Channel)
        try:
            with conn.SimpleQueue(queue) as simple:
                for n in range(3):
                    simple.put({"n": n})
                received = []
                for _ in range(3):
                    message = simple.get(timeout=5)
                    received.append(message.payload["n"])
                    message.ack()
            assert received == [0, 1, 2]
            assert len([c for c in acquired if c is None]) >= 3  # kombu asked for a client per publish
            assert len(created) == 1 and created[0].connection_pool is conn.default_channel.pool
        finally:
            queue(conn.default_channel).delete()
