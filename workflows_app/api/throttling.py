"""The trigger rate limit: a count per user and fixed window in Django's cache.

DRF's `ScopedRateThrottle` keeps the time of every request of the last window in one list that it
reads from and writes back to the cache whole on each request; at a few thousand triggers a
minute that list costs more than the rest of the check, and the cost grows with the rate. A count
per window costs the same at any rate. The count lives in the `default` cache: with a cache every
process shares (`CACHE_URL`, e.g. Redis), the limit holds across gunicorn workers and hosts; with
the default per-process memory cache, each process counts alone.
"""

from __future__ import annotations

from typing import Any

from rest_framework.request import Request
from rest_framework.settings import api_settings
from rest_framework.throttling import ScopedRateThrottle


class ScopedWindowThrottle(ScopedRateThrottle):
    """At most N requests per user (per client address when anonymous) in each window of the
    scope's rate, e.g. 6000 in each minute for "6000/minute". The windows are fixed, so a client
    may send up to twice the rate across a window's edge, as in any fixed-window limiter."""

    def get_rate(self) -> str | None:
        # Read on each request, not at import as DRF does, so a changed setting applies at once.
        return api_settings.DEFAULT_THROTTLE_RATES.get(self.scope)

    def allow_request(self, request: Request, view: Any) -> bool:
        self.scope = getattr(view, self.scope_attr, None)
        self.rate = self.get_rate() if self.scope else None
        if self.rate is None:
            return True
        self.num_requests, self.duration = self.parse_rate(self.rate)
        now = self.timer()
        window = int(now // self.duration)
        key = f"{self.get_cache_key(request, view)}_{window}"
        try:
            count = self.cache.incr(key)
        except ValueError:  # the window's first request, or its key just expired
            # add() fails when a concurrent request created the key first; count after it then.
            count = 1 if self.cache.add(key, 1, self.duration + 1) else self.cache.incr(key)
        self.wait_seconds = (window + 1) * self.duration - now
        return count <= self.num_requests

    def wait(self) -> float:
        return self.wait_seconds
