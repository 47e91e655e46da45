"""Installs the engine's database functions (written by `manage.py engine_functions --migration`)."""

from django.db import migrations

from workflows_app.engine import sql

# The digest of the definitions in workflows_app/engine/sql.py when this migration was written: the
# suite fails when the code's differ from the latest migration's, until one installs them.
DIGEST = '4350e5c5134ca1f7'


class Migration(migrations.Migration):
    dependencies = [("workflows_app", '0013_metrics_rollup')]

    operations = [migrations.RunPython(sql.install_functions, sql.drop_functions)]
