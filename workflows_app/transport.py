"""kombu's Redis transport with one client per connection pool for the commands a channel sends.

kombu builds a new `redis.Redis` for every message it publishes (`Channel.conn_or_acquire`), and
redis-py copies its table of response callbacks into a fresh dict for each: a quarter of the CPU
of a publish, paid by every trigger and every hop of a run. The client only wraps the channel's
connection pool, so one per pool does the same. Set by `config.settings.base` for `redis://`
broker URLs (`CELERY_BROKER_TRANSPORT`). tests/test_library_pins.py pins the kombu behaviour this
relies on (`conn_or_acquire`'s contract, `_create_client`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis


class Channel(redis.Channel):
    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool
        shared = self.__dict__.get("_shared_client")
        if shared is None or shared.connection_pool is not pool:
            # A channel's pool is replaced when it reconnects; its client goes with it.
            shared = self._shared_client = self._create_client()
        yield shared


class Transport(redis.Transport):
    Channel = Channel
