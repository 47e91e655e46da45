"""Installs the engine's database functions (written by `manage.py engine_functions --migration`)."""

from django.db import migrations

from workflows_app.engine import sql

# The digest of the definitions in workflows_app/engine/sql.py when this migration was written: the
# suite fails when the code's differ from the latest migration's, until one installs them.
DIGEST = '72ff291e39e1041e'


class Migration(migrations.Migration):
    dependencies = [("workflows_app", '0014_engine_functions_no_jit')]

    operations = [migrations.RunPython(sql.install_functions, sql.drop_functions)]
