"""kombu's Redis transport with one client per connection pool, and its file-system transport with
messages that appear whole.

For Redis, kombu builds a new `redis.Redis` for every message it publishes (`Channel.conn_or_acquire`), and
redis-py copies its table of response callbacks into a fresh dict for each: a quarter of the CPU
of a publish, paid by every trigger and every hop of a run. The client only wraps the channel's
connection pool, so one per pool does the same. Set by `config.settings.base` for `redis://`
broker URLs (`CELERY_BROKER_TRANSPORT`). tests/test_library_pins.py pins the kombu behaviour this
relies on (`conn_or_acquire`'s contract, `_create_client`). For the file system, see
`FilesystemChannel`; tests/test_transport.py pins what it relies on.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from time import monotonic
from typing import Any

from kombu.transport import filesystem, redis
from kombu.utils.json import dumps


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


class FilesystemChannel(filesystem.Channel):
    """kombu's `_put` creates the message's file under its final name, then writes it, while `_get`
    takes any file of that name without waiting for the writer's lock: a consumer can take the file
    empty and fail decoding it (kombu#1551), which ends the worker. Written under a name `_get`
    ignores (no `.<queue>.msg` suffix) and renamed into place, a message appears whole."""

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f"~{name}.part")
        try:
            with open(partial, "wb") as f:
                f.write(dumps(payload).encode())
            os.replace(partial, final)  # atomic within the folder
        except OSError as exc:
            raise filesystem.ChannelError(f"Cannot add file {final!r} to directory") from exc


class FilesystemTransport(filesystem.Transport):
    Channel = FilesystemChannel
