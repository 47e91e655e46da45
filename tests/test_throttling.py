"""The trigger rate limit: a count per user and window, refused calls write nothing, and with a
shared cache the limit holds across gunicorn's worker processes."""

from __future__ import annotations

import http.client
import socket
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.core.cache import cache
from django.test import override_settings
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests.e2e import wait_for
from tests.processes import Process, free_port
from tests.workers import worker_env
from workflows_app.api.throttling import ScopedWindowThrottle
from workflows_app.models import WorkflowRun

RUNS = "/api/workflows/product_pipeline/runs/"


def rate(value: str) -> override_settings:
    rates = {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "trigger": value}
    return override_settings(REST_FRAMEWORK={**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": rates})


@pytest.fixture
def clock(monkeypatch):
    """The throttle's clock, set by the test: windows are fixed, so real time could cross one."""
    now = [1_800_000_000.0]  # the start of a minute
    monkeypatch.setattr(ScopedWindowThrottle, "timer", lambda self: now[0])
    cache.clear()
    yield now
    cache.clear()


@pytest.mark.django_db
def test_over_the_rate_a_trigger_gets_429_and_starts_nothing(api, pipeline, clock, django_user_model):
    with rate("3/minute"):
        assert [api.post(RUNS, {}, format="json").status_code for _ in range(3)] == [201] * 3
        clock[0] += 20
        refused = api.post(RUNS, {}, format="json")
        assert refused.status_code == 429 and refused.json()["detail"]
        assert int(refused["Retry-After"]) == 40  # the rest of the minute
        assert WorkflowRun.objects.count() == 3
        # The event endpoint shares the scope, so it counts against the same limit.
        assert api.post("/api/events/", {"event_type": "product.created"}, format="json").status_code == 429

        other = APIClient()
        other.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=other_user(django_user_model)).key}")
        assert other.post(RUNS, {}, format="json").status_code == 201  # each user has a count of their own

        clock[0] += 40  # the next minute
        assert api.post(RUNS, {}, format="json").status_code == 201
    assert WorkflowRun.objects.count() == 5


def other_user(django_user_model):
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.create_user(username="second", password="pw-x-123456")
    user.user_permissions.add(Permission.objects.get(codename="add_workflowrun"))
    return user


class Call:
    """A trigger sent in two parts: while its headers are unfinished, the gunicorn sync worker that
    accepted the connection waits on it and takes no other, and the app has not yet counted it."""

    def __init__(self, port: int, token: str):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(f"POST {RUNS} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Token {token}\r\n".encode())

    def finish(self) -> int:
        self.sock.sendall(b"Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        response = http.client.HTTPResponse(self.sock)
        response.begin()
        self.sock.close()
        return response.status


@pytest.mark.django_db(transaction=True)
def test_a_shared_cache_holds_the_limit_across_gunicorn_workers(pipeline, trigger_user, tmp_path: Path):
    import redis

    cache_url = "redis://127.0.0.1:6379/13"
    redis.Redis.from_url(cache_url).flushdb()
    token = Token.objects.create(user=trigger_user).key
    port = free_port()
    # A day's window: the seconds this test takes cannot cross one, but at midnight (UTC).
    env = worker_env(CACHE_URL=cache_url, EVENTFLOW_TRIGGER_RATE="2/day")
    cmd = [sys.executable, "-m", "gunicorn", "config.wsgi:application", "-w", "3", "-b", f"127.0.0.1:{port}"]
    server = Process(cmd, log_path=tmp_path / "gunicorn.log", env=env)
    try:

        def serving() -> bool:
            if why := server.exited():
                raise AssertionError(why)
            try:
                return Call(port, token).sock.close() is None
            except OSError:
                return False

        wait_for(serving, timeout=60, what="gunicorn to listen")
        # Two workers wait on a call each, so the third answers the next two calls: the limit.
        held = [Call(port, token), Call(port, token)]
        third = [Call(port, token).finish() for _ in range(2)]
        # Then the two held calls, each in a worker that has counted nothing itself.
        statuses = third + [call.finish() for call in held]
    finally:
        server.stop()
        redis.Redis.from_url(cache_url).flushdb()
    # Counting in each process alone, the held calls would be each worker's first and pass.
    assert statuses == [201, 201, 429, 429], server.log()
    assert WorkflowRun.objects.count() == 2
