"""manage.py engine_functions: the engine's database functions as SQL, or as a new migration installing them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db.migrations.loader import MigrationLoader

from workflows_app.engine import sql

MIGRATION = '''"""Installs the engine's database functions (written by `manage.py engine_functions --migration`)."""

from django.db import migrations

from workflows_app.engine import sql

# The digest of the definitions in workflows_app/engine/sql.py when this migration was written: the
# suite fails when the code's differ from the latest migration's, until one installs them.
DIGEST = {digest!r}


class Migration(migrations.Migration):
    dependencies = [("workflows_app", {previous!r})]

    operations = [migrations.RunPython(sql.install_functions, sql.drop_functions)]
'''


class Command(BaseCommand):
    help = "Print the statements that install the engine's database functions, or write their migration."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--migration",
            metavar="NAME",
            help="Write the app's next migration, NNNN_NAME, installing them (after a change to engine/sql.py).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not options["migration"]:
            self.stdout.write(sql.functions_sql())
            return
        loader = MigrationLoader(None, ignore_no_migrations=True)
        previous = max(name for app, name in loader.disk_migrations if app == "workflows_app")
        number = int(previous.split("_", 1)[0]) + 1
        folder = Path(__file__).resolve().parents[2] / "migrations"
        path = folder / f"{number:04d}_{options['migration']}.py"
        path.write_text(MIGRATION.format(digest=sql.functions_digest(), previous=previous))
        self.stdout.write(f"wrote {path}")
