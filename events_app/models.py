"""EventType (a Celery queue with a cluster-wide parallelism) and Event (one task execution request)."""

import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Any

from django.contrib.postgres.fields import ArrayField
from django.core.validators import MinValueValidator, RegexValidator
from django.db import models

# An event type's name, which is also its Celery queue's: the definition format checks it too.
EVENT_TYPE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
queue_name_validator = RegexValidator(
    EVENT_TYPE_NAME, "Use letters, digits, '.', '_' or '-', starting with a letter or digit."
)


class EventType(models.Model):
    name = models.CharField(
        "name",
        max_length=100,
        primary_key=True,
        validators=[queue_name_validator],
        help_text="Also the name of the Celery queue its tasks are sent to.",
    )
    concurrency = models.PositiveIntegerField(
        "concurrency",
        default=1,
        validators=[MinValueValidator(1)],
        help_text="Most tasks of this type running at once, across every worker and host.",
    )
    # NULL, not "", for "no limit": the API and definitions say null.
    rate_limit = models.CharField(  # noqa: DJ001
        "rate limit",
        max_length=30,
        null=True,
        blank=True,
        help_text="At most N tasks handed to Celery in any window of a second, minute or hour, across every "
        'worker and host: "N/second", "N/minute" or "N/hour". Empty: no limit.',
    )
    fairness_key = models.TextField(  # noqa: DJ001
        "fairness key",
        null=True,
        blank=True,
        help_text="A CEL expression on the run (e.g. payload.shop_id) whose value groups its tasks: the line serves "
        "the groups in turn. Applies to runs started after it is set.",
    )
    per_key_concurrency = models.PositiveIntegerField(
        "per-key concurrency",
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Most tasks of one fairness key running at once. Empty: no limit beyond concurrency.",
    )
    queue_timeout = models.PositiveIntegerField(
        "queue timeout",
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Seconds a task may wait for a slot; past it, it fails without retries. Empty: no limit.",
    )
    description = models.TextField("description", blank=True, default="")
    # Kept by admission under this row's lock, so admitting reads one number, not every slot held.
    held = models.PositiveIntegerField(
        "slots held",
        default=0,
        editable=False,
        help_text="Tasks of this type holding a slot (sent and not finished), as admission counts them.",
    )
    # Admission's own state, written only under this row's lock: the dispatches of the rate window
    # (times, and how many at each), and when a line the rate holds back is next due to be admitted from.
    rate_times = ArrayField(models.DateTimeField(), default=list, db_default=[], blank=True, editable=False)
    rate_counts = ArrayField(models.IntegerField(), default=list, db_default=[], blank=True, editable=False)
    rate_wake_at = models.DateTimeField("rate wake at", null=True, blank=True, editable=False)
    created_at = models.DateTimeField("created at", auto_now_add=True)
    updated_at = models.DateTimeField("updated at", auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "event type"
        verbose_name_plural = "event types"
        constraints = [
            models.CheckConstraint(
                condition=models.Q(concurrency__gte=1),
                name="event_type_concurrency_positive",
            ),
            models.CheckConstraint(
                condition=models.Q(per_key_concurrency__gte=1) | models.Q(per_key_concurrency__isnull=True),
                name="event_type_per_key_concurrency_positive",
            ),
            models.CheckConstraint(
                condition=models.Q(queue_timeout__gte=1) | models.Q(queue_timeout__isnull=True),
                name="event_type_queue_timeout_positive",
            ),
        ]

    def __str__(self) -> str:
        return self.name


class EventTypeKey(models.Model):
    """One fairness key of an event type, as admission keeps it: its slots held, the priority of its best
    waiting task while it may be served (NULL when it has none waiting or holds its share), and the turn
    it was last served at. Admission picks keys through these rows, so its cost depends neither on the
    number of keys nor on their lines' lengths. Written only under its type's row lock."""

    event_type = models.ForeignKey(EventType, on_delete=models.CASCADE, related_name="keys", db_index=False)
    key = models.CharField("key", max_length=200, blank=True)
    held = models.PositiveIntegerField("slots held", default=0)
    head_priority = models.SmallIntegerField("priority of its head", null=True, blank=True)
    turn = models.BigIntegerField("last served at turn", default=0)

    class Meta:
        verbose_name = "fairness key"
        verbose_name_plural = "fairness keys"
        constraints = [models.UniqueConstraint(fields=["event_type", "key"], name="event_type_key_unique")]
        indexes = [
            # The keys that may be served, best first: what admission picks from.
            models.Index(
                "event_type",
                models.F("head_priority").desc(),
                "turn",
                "key",
                condition=models.Q(head_priority__isnull=False),
                name="event_type_key_next_idx",
            )
        ]

    def __str__(self) -> str:
        return f"{self.event_type_id}:{self.key}"


class Event(models.Model):
    class Status(models.TextChoices):
        PENDING = "PENDING", "pending"
        STARTED = "STARTED", "started"
        RETRY = "RETRY", "retry"
        SUCCESS = "SUCCESS", "success"
        FAILURE = "FAILURE", "failure"
        REVOKED = "REVOKED", "revoked"

    event_id = models.UUIDField(
        "event id",
        primary_key=True,
        default=uuid.uuid4,
        editable=False,
        help_text="Also the Celery task id.",
    )
    trace_id = models.UUIDField(
        "trace id",
        null=True,
        blank=True,
        help_text="The workflow run this event belongs to, if any.",
    )
    event_type = models.CharField("event type", max_length=100, help_text="The node's event type and queue.")
    task_name = models.CharField("task name", max_length=200, blank=True, default="")
    payload = models.JSONField("payload", default=dict, blank=True)
    result = models.JSONField(
        "result", null=True, default=dict, blank=True, help_text="{} when sent; the task's return value once finished."
    )
    context = models.JSONField("context", default=dict, blank=True)
    status = models.CharField("status", max_length=10, choices=Status.choices, default=Status.PENDING)
    timestamp = models.DateTimeField("timestamp", help_text="When the event was sent.")
    updated_at = models.DateTimeField("updated at", auto_now=True)
    # NULL, not "", for "no key": the partial unique constraint then ignores keyless events.
    # NULL, not "", for "no key": the waiters' index then leaves keyless events out.
    key = models.CharField(  # noqa: DJ001
        "key",
        max_length=200,
        null=True,
        blank=True,
        help_text="Correlates a published event with the runs waiting for it (a wait_event node's event_key).",
    )
    idempotency_key = models.CharField(  # noqa: DJ001
        "idempotency key",
        max_length=200,
        null=True,
        blank=True,
        help_text="For a published event: the Idempotency-Key it was sent with; unique per event type.",
    )

    class Meta:
        ordering = ["timestamp"]
        verbose_name = "event"
        verbose_name_plural = "events"
        indexes = [
            models.Index(fields=["trace_id", "timestamp"], name="event_trace_time_idx"),
            models.Index(fields=["event_type", "-timestamp"], name="event_type_time_idx"),
            # A waiter reached after its event was published finds it by type, key and time.
            models.Index(
                fields=["event_type", "key", "timestamp"],
                condition=models.Q(key__isnull=False),
                name="event_type_key_time_idx",
            ),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["event_type", "idempotency_key"],
                condition=models.Q(idempotency_key__isnull=False),
                name="event_unique_idempotency_key",
            )
        ]

    def __str__(self) -> str:
        return f"{self.event_type}:{self.event_id}"

    def as_message(self) -> dict:
        """The JSON object a task receives as its only argument."""
        return event_message(self.__dict__)


def event_message(fields: Mapping[str, Any]) -> dict:
    """The JSON object a task receives as its only argument, from an Event's fields (ids as UUIDs or
    their text, the timestamp as a datetime or its ISO text)."""
    stamp = fields["timestamp"]
    if isinstance(stamp, str):
        stamp = dt.datetime.fromisoformat(stamp)
    trace_id = fields["trace_id"]
    return {
        "event_id": str(fields["event_id"]),
        "trace_id": str(trace_id) if trace_id else None,
        "event_type": fields["event_type"],
        "task_name": fields["task_name"],
        "payload": fields["payload"],
        "result": fields["result"],
        "context": fields["context"],
        "status": fields["status"],
        "timestamp": stamp.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
