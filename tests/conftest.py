"""Fixtures shared by the whole suite: users, clients, saved workflows."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests import factories


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user(username="operator", password="pw-operator-123")


@pytest.fixture
def trigger_user(django_user_model):
    """A user with the permissions to trigger, cancel and author workflows, but no staff rights."""
    u = django_user_model.objects.create_user(username="trigger", password="pw-trigger-123")
    u.user_permissions.add(
        *Permission.objects.filter(
            codename__in=[
                "add_workflowrun",
                "change_workflowrun",
                "add_workflowdefinition",
                "change_workflowdefinition",
                "change_eventtype",
                "add_event",
            ]
        )
    )
    return u


@pytest.fixture
def admin_user(django_user_model):
    return django_user_model.objects.create_superuser(username="admin", password="pw-admin-123", email="a@x.io")


@pytest.fixture
def api(trigger_user) -> APIClient:
    """An API client authenticated with a DRF token, as an outside system would be."""
    client = APIClient()
    token = Token.objects.create(user=trigger_user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def anon_api() -> APIClient:
    return APIClient()


@pytest.fixture
def pipeline(db):
    return factories.workflow(factories.product_pipeline_spec())


@pytest.fixture
def workers(transactional_db, tmp_path):
    """Start real worker processes: `workers(queues, concurrency=2)`; all are stopped after the test.

    `clock_offset=seconds` runs a worker with its wall clock that far from the true time (libfaketime).
    """
    from tests.workers import Worker, purge_broker

    purge_broker()
    started: list[Worker] = []

    def start(
        queues,
        *,
        concurrency: int = 2,
        name: str | None = None,
        env: dict | None = None,
        clock_offset: float | None = None,
    ) -> Worker:
        worker = Worker(
            name or f"w{len(started)}",
            queues,
            concurrency=concurrency,
            log_dir=tmp_path,
            env=env,
            clock_offset=clock_offset,
        )
        started.append(worker)
        worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()
    print(f"worker logs in {tmp_path}")
