"""App config for workflows_app; connects the Celery signal handlers, and installs the engine's
database functions after each `migrate`."""

from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_migrate


def _install_functions(using: str = "default", **kwargs: Any) -> None:
    from . import pgsql

    pgsql.install_functions(using)


class WorkflowsAppConfig(AppConfig):
    name = "workflows_app"
    verbose_name = "Workflows"

    def ready(self) -> None:
        from . import signals

        signals.connect()
        post_migrate.connect(_install_functions, sender=self, dispatch_uid="workflows_app.install_functions")
