"""The no-op task every benchmark runs, for Eventflow nodes and canvas signatures alike."""

from typing import Any

from celery import shared_task


@shared_task(name="bench.noop")
def noop(*args: Any) -> None:
    # Takes whatever it is given (an Event from Eventflow, the previous result from a canvas chain,
    # a chord header's list of results) so both sides run the very same task body.
    return None
