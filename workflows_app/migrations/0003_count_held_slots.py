from django.db import migrations
from django.db.models import Count


def count_held_slots(apps, schema_editor):
    """Start each type's count of held slots from its task rows; admission keeps it from here."""
    EventType = apps.get_model("events_app", "EventType")
    TaskRun = apps.get_model("workflows_app", "TaskRun")
    held = dict(
        TaskRun.objects.filter(holds_slot=True)
        .values("event_type_id")
        .annotate(n=Count("id"))
        .values_list("event_type_id", "n")
    )
    for name, n in held.items():
        EventType.objects.filter(name=name).update(held=n)


class Migration(migrations.Migration):
    dependencies = [
        ("events_app", "0002_event_type_held"),
        ("workflows_app", "0002_fewer_task_run_indexes"),
    ]

    operations = [migrations.RunPython(count_held_slots, migrations.RunPython.noop)]
