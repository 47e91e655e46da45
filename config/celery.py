"""The Celery application, configured only through CELERY_* Django settings."""

import os

from celery import Celery, signals

from workflows_app import logs as _logs
from workflows_app import tracing as _tracing

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

# Every task, built-in or the user's, gets the engine's start check through this base class.
app = Celery("config", task_cls="workflows_app.celery_task:EventTask")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
app.steps["worker"].add("workflows_app.leases:LeaseKeeper")

# Celery's loggers write through Django's LOGGING, so LOG_FORMAT=json holds in workers too, and the
# tracer's lines about a task's end (succeeded in, raised) name its attempt.
signals.after_setup_logger.connect(_logs.celery_after_setup_logger, weak=False)
signals.after_setup_task_logger.connect(_logs.celery_after_setup_task_logger, weak=False)
signals.task_prerun.connect(_logs.celery_task_prerun, weak=False)
signals.task_postrun.connect(_logs.celery_task_postrun, weak=False)

# A pool process exports the spans it finished before it exits (workflows_app/tracing.py).
signals.worker_process_shutdown.connect(lambda **_: _tracing.flush(), weak=False)
