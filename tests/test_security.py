"""Production settings and permissions: Django's deploy checks pass, and each action needs its permission."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from django.contrib.auth.models import Group, Permission
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests.workers import ROOT
from workflows_app.models import TaskRun, WorkflowRun


def test_production_settings_pass_the_deploy_checks():
    env = {
        "PATH": os.environ["PATH"],
        "DJANGO_SETTINGS_MODULE": "config.settings.production",
        "SECRET_KEY": "x" * 20 + "production-only-secret-value-for-the-check-0123456789",
        "ALLOWED_HOSTS": "eventflow.example.com",
        "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/postgres",
        "CELERY_BROKER_URL": "redis://127.0.0.1:6379/0",
    }
    done = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues" in done.stdout


def test_production_settings_refuse_to_start_without_a_secret_key():
    env = {"PATH": os.environ["PATH"], "DJANGO_SETTINGS_MODULE": "config.settings.production"}
    done = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0 and "SECRET_KEY" in done.stderr


@pytest.mark.django_db
def test_another_user_without_permission_cannot_cancel_or_retry_a_run(api, pipeline, django_user_model):
    trace_id = api.post("/api/workflows/product_pipeline/runs/", {}, format="json").json()["trace_id"]
    outsider = APIClient()
    outsider.force_authenticate(django_user_model.objects.create_user(username="outsider", password="pw-x-123456"))
    for action in ("cancel", "retry"):
        response = outsider.post(f"/api/runs/{trace_id}/{action}/")
        assert response.status_code == 403 and response.json()["detail"]
    assert WorkflowRun.objects.get(trace_id=trace_id).status == "RUNNING"
    assert not TaskRun.objects.filter(run_id=trace_id, status="REVOKED").exists()


def token_client(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


def test_a_token_authenticates_only_a_known_active_user_and_a_permission_counts_through_groups(
    pipeline, django_user_model
):
    trigger = "/api/workflows/product_pipeline/runs/"
    stranger = APIClient()
    stranger.credentials(HTTP_AUTHORIZATION="Token " + "0" * 40)
    response = stranger.post(trigger, {}, format="json")
    assert response.status_code == 401 and response.json()["detail"] == "Invalid token."

    member = django_user_model.objects.create_user(username="member", password="pw-member-123")
    client = token_client(member)
    assert client.post(trigger, {}, format="json").status_code == 403  # no permission yet

    group = Group.objects.create(name="triggerers")
    group.permissions.add(Permission.objects.get(codename="add_workflowrun", content_type__app_label="workflows_app"))
    member.groups.add(group)
    response = client.post(trigger, {}, format="json")
    assert response.status_code == 201, response.content
    assert WorkflowRun.objects.get(trace_id=response.json()["trace_id"]).created_by == member

    member.is_active = False
    member.save()
    response = client.post(trigger, {}, format="json")
    assert response.status_code == 401 and response.json()["detail"] == "User inactive or deleted."
    assert WorkflowRun.objects.count() == 1

    direct = django_user_model.objects.create_user(username="direct", password="pw-direct-123")
    direct.user_permissions.add(Permission.objects.get(codename="add_workflowdefinition"))
    direct_client = token_client(direct)
    assert direct_client.post(trigger, {}, format="json").status_code == 403  # another permission
    direct.user_permissions.add(Permission.objects.get(codename="add_workflowrun"))
    assert direct_client.post(trigger, {}, format="json").status_code == 201
    root = django_user_model.objects.create_superuser(username="root", password="pw-root-123", email="r@x.io")
    assert token_client(root).post(trigger, {}, format="json").status_code == 201  # holds every permission


@pytest.mark.django_db
def test_only_json_crosses_the_broker():
    from config.celery import app

    assert app.conf.accept_content == ["json"]
    assert app.conf.task_serializer == "json" and app.conf.result_serializer == "json"
