"""manage.py engine_functions: the engine's database functions as SQL, or as a new migration installing them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db.migrations.loader import MigrationLoader

from workflows_app.engine import sql

MIGRATION = '''"""Installs the engine's database functions as `workflows_app.engine.sql` defined them when this
migration was written (`manage.py engine_functions --migration`): the statements are in {sql_name}
beside it, kept as they were, as a migration is."""

from pathlib import Path

from django.db import migrations

FUNCTIONS = (Path(__file__).parent / "sql" / {sql_name!r}).read_text()

DROP = """
{drop}"""


class Migration(migrations.Migration):
    dependencies = [("workflows_app", {previous!r})]

    operations = [migrations.RunSQL(FUNCTIONS, DROP)]
'''


class Command(BaseCommand):
    help = (
        "Print the statements that install the engine's database functions; with --migration NAME, "
        "write them as the app's next migration instead (after changing workflows_app/engine/sql.py)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--migration", metavar="NAME", help="Write a migration named NNNN_NAME.")

    def handle(self, *args: Any, **options: Any) -> None:
        if not options["migration"]:
            self.stdout.write(sql.functions_sql())
            return
        loader = MigrationLoader(None, ignore_no_migrations=True)
        previous = max(name for app, name in loader.disk_migrations if app == "workflows_app")
        number = int(previous.split("_", 1)[0]) + 1
        folder = Path(__file__).resolve().parents[2] / "migrations"
        name = f"{number:04d}_{options['migration']}"
        sql_path = folder / "sql" / f"{name}.sql"
        sql_path.parent.mkdir(exist_ok=True)
        sql_path.write_text(sql.functions_sql())
        drop = "".join(
            f"DROP FUNCTION IF EXISTS {sql.signature(name, arguments)};\n" for name, arguments, *_ in sql.FUNCTIONS
        )
        path = folder / f"{name}.py"
        path.write_text(MIGRATION.format(sql_name=sql_path.name, drop=drop, previous=previous))
        self.stdout.write(f"wrote {path} and {sql_path}")
