"""Built-in tasks for demos, tests and smoke checks; each takes the Event as its only argument."""

import time

from celery import shared_task


@shared_task(name="workflows_app.tasks.echo")
def echo(event: dict) -> dict:
    return {
        "payload": event["payload"],
        "upstream": event["context"].get("upstream", {}),
    }


@shared_task(name="workflows_app.tasks.sleep")
def sleep(event: dict) -> dict:
    time.sleep(float(event["payload"].get("seconds", 0.1)))
    return {
        "payload": event["payload"],
        "upstream": event["context"].get("upstream", {}),
    }


@shared_task(name="workflows_app.tasks.fail")
def fail(event: dict) -> None:
    raise RuntimeError(event["payload"].get("message", "failed"))
