"""The Celery application, configured only through CELERY_* Django settings."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

# Every task, built-in or the user's, gets the engine's start check through this base class.
app = Celery("config", task_cls="workflows_app.celery_task:EventTask")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
app.steps["worker"].add("workflows_app.leases:LeaseKeeper")
