"""Installs the engine's database functions as `workflows_app.engine.sql` defined them when this
migration was written (`manage.py engine_functions --migration`): the statements are in 0005_engine_functions.sql
beside it, kept as they were, as a migration is."""

from pathlib import Path

from django.db import migrations

FUNCTIONS = (Path(__file__).parent / "sql" / '0005_engine_functions.sql').read_text()

DROP = """
DROP FUNCTION IF EXISTS eventflow_admit(varchar[], integer[], bigint[], uuid[], varchar[], double precision);
DROP FUNCTION IF EXISTS eventflow_end_run(uuid);
DROP FUNCTION IF EXISTS eventflow_advance(uuid, bigint, uuid, boolean, varchar, jsonb, text, jsonb, jsonb, uuid, double precision, jsonb, jsonb, jsonb, varchar[], uuid[], varchar[], varchar[], boolean, double precision);
DROP FUNCTION IF EXISTS eventflow_start_run(jsonb, jsonb, jsonb, jsonb, jsonb, varchar[], uuid[], varchar[], varchar[], boolean, double precision);
DROP FUNCTION IF EXISTS eventflow_cancel_run(uuid, double precision);
"""


class Migration(migrations.Migration):
    dependencies = [("workflows_app", '0004_kinds_and_instances')]

    operations = [migrations.RunSQL(FUNCTIONS, DROP)]
