"""A GIN index on runs' payloads, for the run list's payload search (`payload @> '{...}'`)."""

from django.db import migrations

# jsonb_path_ops rather than the default jsonb_ops: it indexes one hash per path to each value, so the
# index is about a third smaller and a containment lookup reads fewer entries; it cannot answer the
# key-exists operators (?, ?|, ?&), which payload search does not use. Built CONCURRENTLY (so outside
# a transaction): on a large table, runs keep starting while it builds.
# Kept out of WorkflowRun.Meta on purpose: Django's GinIndex would be built inside the migration's
# transaction, locking writes to the run table for the whole build.
INDEX = "run_payload_gin_idx"


class Migration(migrations.Migration):
    atomic = False

    dependencies = [("workflows_app", "0010_workers")]

    operations = [
        migrations.RunSQL(
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {INDEX} ON workflows_app_workflowrun "
            "USING gin (payload jsonb_path_ops)",
            reverse_sql=f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX}",
        )
    ]
