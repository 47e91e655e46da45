"""The tasks the benchmarks run, for Eventflow nodes and canvas signatures alike."""

import os
import time
from typing import Any

from celery import shared_task


@shared_task(name="bench.noop")
def noop(*args: Any) -> None:
    # Takes whatever it is given (an Event from Eventflow, the previous result from a canvas chain,
    # a chord header's list of results) so both sides run the very same task body.
    return None


# The steps of bench/burst.py's pipeline and how long each sleeps, in milliseconds: the bench passes
# its own in BENCH_BURST_MS ("intake=20,llm=80,..."), the workers it starts read them here.
BURST_MS = {"intake": 20, "llm": 80, "image": 40, "upload": 30, "publish_a": 20, "publish_b": 20}
BURST_MS.update(
    (step, int(ms))
    for step, _, ms in (item.partition("=") for item in os.environ.get("BENCH_BURST_MS", "").split(",") if item)
)


def _sleeper(step: str) -> Any:
    def sleep(*args: Any) -> None:
        # Sleeps only, whatever it is given (an Event, a chain's previous result, a chord's list).
        time.sleep(BURST_MS[step] / 1000)

    sleep.__name__ = sleep.__qualname__ = f"burst_{step}"
    return shared_task(name=f"bench.burst_{step}")(sleep)


BURST_TASKS = {step: _sleeper(step) for step in BURST_MS}
