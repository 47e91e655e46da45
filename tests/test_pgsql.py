"""`pgsql.one_trip`: a transaction in one round trip, outside any transaction of Django's (so on a
database these tests really commit to), that writes all of its block or nothing."""

from __future__ import annotations

import pytest
from django.db import IntegrityError, connection

from events_app.models import EventType
from workflows_app import pgsql

pytestmark = pytest.mark.django_db(transaction=True)

INSERT = (
    f"INSERT INTO {pgsql.EVENT_TYPE} (name, concurrency, held, description, created_at, updated_at)"
    " VALUES (%s, 1, 0, '', now(), now())"
)


def test_a_block_commits_its_statements_together():
    assert not connection.in_atomic_block
    with pgsql.one_trip():
        pgsql.execute(INSERT, ["one"])
        pgsql.execute(INSERT, ["two"])
    assert set(EventType.objects.values_list("name", flat=True)) == {"one", "two"}


def test_a_failing_statement_writes_nothing_and_leaves_the_connection_usable():
    with pytest.raises(IntegrityError), pgsql.one_trip():
        pgsql.execute(INSERT, ["first"])
        pgsql.execute(INSERT, ["first"])  # the primary key again
        pgsql.execute(INSERT, ["third"])
    assert not EventType.objects.exists()
    with pgsql.one_trip():
        pgsql.execute(INSERT, ["after"])
    assert list(EventType.objects.values_list("name", flat=True)) == ["after"]


def test_an_error_raised_in_the_block_rolls_it_back():
    with pytest.raises(RuntimeError), pgsql.one_trip():
        pgsql.execute(INSERT, ["sent"])
        raise RuntimeError("the caller gave up")
    assert not EventType.objects.exists()
    assert EventType.objects.create(name="usable").name == "usable"
