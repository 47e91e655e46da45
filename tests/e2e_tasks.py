"""Tasks only end-to-end tests load into their workers (with `celery worker --include`)."""

from celery import shared_task


@shared_task(name="tests.e2e_tasks.capture")
def capture(event: dict) -> dict:
    """Return the Event exactly as the task received it, so a test can check its fields."""
    return {"event": event}
