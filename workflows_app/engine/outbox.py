"""Messages to Celery, sent once the transaction that decided them commits."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from django.db import transaction

from . import events
from .graph import graph_for_version

logger = logging.getLogger(__name__)

# The engine's own tasks (admitting from a line when its rate window has room again, sending a
# webhook's notification), and the engine's own queue.
ADMIT_TASK = "workflows_app.tasks.admit"
DELIVER_TASK = "webhooks_app.tasks.deliver"
ENGINE_QUEUE = "celery"
# Seconds between a node's soft time limit and the hard kill.
HARD_LIMIT_GRACE = 10


class Outbox:
    """Task messages and revokes to publish after commit (at once outside a transaction)."""

    def __init__(self) -> None:
        self.messages: list[tuple[dict, dict]] = []
        self.revokes: list[str] = []

    def add(self, message: dict, *, timeout: int | None, eta: datetime | None = None) -> None:
        options: dict[str, Any] = {"queue": message["event_type"]}
        if timeout:
            options["soft_time_limit"] = timeout
            options["time_limit"] = timeout + HARD_LIMIT_GRACE
        if eta is not None:
            options["eta"] = eta
        self.messages.append((message, options))

    def add_sent(
        self,
        sent: Iterable[Mapping[str, Any]],
        clock: datetime | None,
        *,
        known: Mapping[str, Mapping[str, Any]] | None = None,
        version_id: int | None = None,
    ) -> None:
        """The tasks admission answered to send: each with its stored Event, node and graph version (for
        the node's time limits), or the id of an Event the transition composed itself (`known`, of the
        graph `version_id`), stored at the database's `clock`."""
        for item in sent:
            if "event" in item:
                self.add_event(item["event"], version_id=item["version_id"], node=item["node"])
            else:
                event = (known or {})[str(item["event_id"])]
                self.add_event({**event, "timestamp": clock}, version_id=version_id, node=event["context"]["node"])

    def add_wake(self, event_type: str, at: datetime) -> None:
        """Admit from `event_type`'s line again at `at` (the database's time), when its rate window
        next has room: a message to the engine's own queue, due then."""
        self.add_internal(ADMIT_TASK, [event_type], eta=at)

    def add_delivery(self, delivery_id: str, *, eta: datetime | None = None) -> None:
        """Send a webhook's notification, written to its outbox by the transition that raised it (or
        due again at `eta`, the database's time)."""
        self.add_internal(DELIVER_TASK, [str(delivery_id)], eta=eta)

    def add_internal(self, task_name: str, args: list, *, eta: datetime | None = None) -> None:
        """A message of the engine's own, to its own queue: no Event, no node."""
        options: dict[str, Any] = {"queue": ENGINE_QUEUE, "args": args}
        if eta is not None:
            options["eta"] = eta
        self.messages.append(({"task_name": task_name, "internal": True}, options))

    def add_event(self, event: Mapping[str, Any], *, version_id: int, node: str, eta: datetime | None = None) -> None:
        self.add(events.message(event), timeout=graph_for_version(version_id).nodes[node].timeout, eta=eta)

    def flush_on_commit(self) -> None:
        if self.messages or self.revokes:
            messages, revokes = list(self.messages), list(self.revokes)
            transaction.on_commit(lambda: publish(messages, revokes))


def publish(messages: list[tuple[dict, dict]], revokes: list[str]) -> None:
    """Send after commit. A failure here is logged, not raised: the rows are committed and say what
    should be in flight, so the caller's request still succeeds and the reconciler sends it again."""
    from config.celery import app

    if messages:
        try:
            with app.producer_or_acquire() as producer:
                for message, options in messages:
                    if message.get("internal"):
                        app.send_task(message["task_name"], producer=producer, **options)
                        continue
                    app.send_task(
                        message["task_name"],
                        args=[message],
                        task_id=message["event_id"],
                        producer=producer,
                        argsrepr=args_repr(message, app.amqp.argsrepr_maxsize),
                        kwargsrepr="{}",
                        **options,
                    )
        except Exception:
            logger.exception("could not publish %d task message(s) to the broker", len(messages))
    if revokes:
        try:
            app.control.revoke(revokes, terminate=True, signal="SIGTERM")
        except Exception:
            # Some transports (the embedded file broker) have no broadcast; the durable cancel
            # check in the worker still refuses these attempts.
            logger.warning("could not broadcast revoke of %d task(s)", len(revokes), exc_info=True)


def args_repr(message: dict, limit: int) -> str:
    """The arguments as the message headers show them (and the result store keeps), cut at `limit`
    characters like Celery's own, but not elided past three levels: its `saferepr` walks the Event in
    Python, a fifth of a publish."""
    text = repr([message])
    return text if len(text) <= limit else text[: limit - 3] + "..."
