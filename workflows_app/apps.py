"""App config for workflows_app; connects the Celery signal handlers."""

from django.apps import AppConfig


class WorkflowsAppConfig(AppConfig):
    name = "workflows_app"
    verbose_name = "Workflows"

    def ready(self) -> None:
        from . import signals

        signals.connect()
