"""Webhooks (a receiver and the notifications it wants) and their durable outbox: one Delivery per
notification and receiver, written in the transaction of the change it reports, and each attempt to
send it."""

import uuid

from django.contrib.postgres.fields import ArrayField
from django.db import models


class Notification(models.TextChoices):
    RUN_SUCCEEDED = "run.succeeded", "a run succeeded"
    RUN_FAILED = "run.failed", "a run failed"
    RUN_CANCELED = "run.canceled", "a run was canceled"
    TASK_FAILED = "task.failed", "a task failed"
    APPROVAL_REQUESTED = "approval.requested", "an approval waits for a decision"


class Webhook(models.Model):
    url = models.URLField("URL", max_length=2000, help_text="Where notifications are POSTed (http or https).")
    notifications = ArrayField(
        models.CharField(max_length=30, choices=Notification.choices),
        help_text="Which notifications it receives.",
    )
    # Kept to sign with; shown once, when the webhook is created.
    secret = models.CharField(
        "secret", max_length=200, help_text="A Standard Webhooks secret: whsec_ followed by base64."
    )
    description = models.TextField("description", blank=True, default="")
    is_active = models.BooleanField("active", default=True)
    created_at = models.DateTimeField("created at", auto_now_add=True)

    class Meta:
        ordering = ["id"]
        verbose_name = "webhook"
        verbose_name_plural = "webhooks"

    def __str__(self) -> str:
        return self.url


class Delivery(models.Model):
    class State(models.TextChoices):
        PENDING = "pending", "pending"
        DELIVERED = "delivered", "delivered"
        FAILED = "failed", "failed"

    # Also its `webhook-id`, the same on every attempt, so a receiver can drop a repeat.
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    webhook = models.ForeignKey(Webhook, on_delete=models.CASCADE, related_name="deliveries")
    notification = models.CharField("notification", max_length=30, choices=Notification.choices)
    trace_id = models.UUIDField("trace id")
    data = models.JSONField("data", help_text="What the notification says: the run's trace_id and status, ...")
    created_at = models.DateTimeField("created at")
    state = models.CharField(
        "state", max_length=10, choices=State.choices, default=State.PENDING, db_default=State.PENDING
    )
    attempts = models.PositiveIntegerField("attempts", default=0, db_default=0)
    next_attempt_at = models.DateTimeField("next attempt at", help_text="When it is due, on the database's clock.")
    # A sender holds it for one attempt: no other starts one meanwhile.
    sending = models.BooleanField("sending", default=False, db_default=False)
    claimed_until = models.DateTimeField(
        "claimed until",
        null=True,
        blank=True,
        help_text="A sender holds it, or its message is on its way, until then; past it, the reconciler sends it.",
    )

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "delivery"
        verbose_name_plural = "deliveries"
        indexes = [
            # Pending deliveries whose message may be lost: what the reconciler sends again.
            models.Index(fields=["claimed_until"], condition=models.Q(state="pending"), name="delivery_pending_idx"),
            models.Index(fields=["trace_id"], name="delivery_trace_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.notification} {self.trace_id}"


class DeliveryAttempt(models.Model):
    delivery = models.ForeignKey(Delivery, on_delete=models.CASCADE, related_name="attempt_log")
    number = models.PositiveIntegerField("attempt")
    at = models.DateTimeField("at")
    status_code = models.PositiveIntegerField("status code", null=True, blank=True)
    error = models.TextField("error", blank=True, default="")
    seconds = models.FloatField("seconds", default=0.0)

    class Meta:
        ordering = ["delivery", "number"]
        verbose_name = "delivery attempt"
        verbose_name_plural = "delivery attempts"

    def __str__(self) -> str:
        return f"{self.delivery_id} #{self.number}"
