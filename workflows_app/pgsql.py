"""Statements written out for PostgreSQL, run on Django's connection and prepared once per connection.

The hot paths (the engine's transitions, a trigger's token and workflow) repeat a few statements for
every task or request, and PostgreSQL spends longer planning them than running them, and Django longer
building them than both: these helpers run a statement text built once per process, prepared at its
first use, and load its rows into model instances as the ORM would.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg
from django.db import connection, models
from psycopg.types.json import Jsonb


def execute(sql: str, params: Sequence[Any] | Mapping[str, Any]) -> psycopg.Cursor:
    """Run `sql` in Django's connection and transaction, prepared at first use when the connection
    prepares at all (`prepare_threshold` in the database's OPTIONS, set by `config.settings.base`).

    A psycopg cursor of its own on Django's connection keeps Django's transaction and error
    handling, and lets the hot path ask for preparing at once rather than after a few runs.
    """
    with connection.wrap_database_errors:
        connection.ensure_connection()
        raw = connection.connection
        cursor = psycopg.Cursor(raw)
        cursor.execute(sql, params, prepare=True if raw.prepare_threshold is not None else None)
    return cursor


def fetch_one(sql: str, params: Sequence[Any] | Mapping[str, Any]) -> tuple[Any, ...] | None:
    cursor = execute(sql, params)
    with connection.wrap_database_errors:
        return cursor.fetchone()


def fetch_all(sql: str, params: Sequence[Any] | Mapping[str, Any]) -> list[tuple[Any, ...]]:
    cursor = execute(sql, params)
    with connection.wrap_database_errors:
        return cursor.fetchall()


def fetch_rows(sql: str, params: Sequence[Any], *row_models: type[models.Model]) -> list[tuple[Any, ...]]:
    """Run a statement selecting `columns(model)` for each of `row_models` in turn, then any other
    values; per row, the instance of each, as the ORM would load them, then those values."""
    rows = fetch_all(sql, params)
    layout = []
    start = 0
    for model in row_models:
        fields = model._meta.concrete_fields
        names = [field.attname for field in fields]
        converters = [(i, f.from_db_value) for i, f in enumerate(fields) if hasattr(f, "from_db_value")]
        layout.append((model, start, start + len(fields), names, converters))
        start += len(fields)
    loaded = []
    for row in rows:
        instances = []
        for model, begin, end, names, converters in layout:
            values = list(row[begin:end])
            for i, convert in converters:
                values[i] = convert(values[i], None, connection)
            instances.append(model.from_db(connection.alias, names, values))
        loaded.append((*instances, *row[start:]))
    return loaded


def loads(value: Any) -> Any:
    """A jsonb value as this connection answers it: Django makes psycopg hand jsonb over as text, for
    its JSONField to parse."""
    return json.loads(value) if isinstance(value, str | bytes) else value


def columns(model: type[models.Model], alias: str = "") -> str:
    prefix = f"{alias}." if alias else ""
    return ", ".join(f"{prefix}{field.column}" for field in model._meta.concrete_fields)


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not a column value JSON can carry")


def as_json(value: Any) -> Jsonb:
    """A parameter PostgreSQL reads as jsonb, with dates and ids as the text their columns parse.

    Rows go to a statement as one JSON document, read back by `jsonb_populate_recordset` or
    `jsonb_to_recordset`, rather than as an array parameter per column: psycopg adapts an array
    element by element in Python, which cost a trigger more than the rest of its inserts.
    """
    return Jsonb(value, dumps=functools.partial(json.dumps, default=_json_value))


def new_row(instance: models.Model) -> dict[str, Any]:
    """A new instance's row, column by column, as the ORM's insert prepares it (`pre_save` fills
    `auto_now` dates), for `as_json`."""
    return {f.column: f.pre_save(instance, True) for f in instance._meta.concrete_fields}
