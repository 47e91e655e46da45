"""The webhooks' Celery task, on the engine's own queue."""

from celery import shared_task

from .services import deliver as deliver_once


@shared_task(name="webhooks_app.tasks.deliver", eventflow_internal=True, ignore_result=True)
def deliver(delivery_id: str) -> str:
    """One attempt to send a notification (`services.deliver`)."""
    return deliver_once(delivery_id)
