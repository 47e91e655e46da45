"""Webhooks: the one check of a webhook's settings, and the sending of its notifications from the outbox.

A notification is a Delivery row, written by the engine in the transaction of the change it reports
(`engine.sql` `eventflow_notify`), so it exists exactly when the change does. It is sent by Celery
tasks on the engine's own queue, never by the transition: a receiver that hangs or fails slows no
run. Each attempt claims its delivery for a while on the database's clock (so two senders never
send it at once), is recorded with its status code or error, and an answer other than 2xx is tried
again after `WEBHOOK_RETRY_SECONDS`, doubling, for up to a day. A message lost on its way (its
sender killed after the commit) is sent again by the reconciler once its claim lapses.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import secrets
import socket
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import requests
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone
from standardwebhooks.webhooks import Webhook as Signer

from .models import Delivery, DeliveryAttempt, Notification

logger = logging.getLogger(__name__)

# A notification is tried again for this long after it was raised.
GIVE_UP_AFTER = timedelta(days=1)
SECRET_PREFIX = "whsec_"


def _config(name: str) -> Any:
    return settings.EVENTFLOW[name]


def _grace() -> float:
    """How long a sent message may take to reach a worker before the reconciler sends it again: as
    for a task's message."""
    return _config("DISPATCH_GRACE_SECONDS")


def secret_new() -> str:
    """A Standard Webhooks secret: `whsec_` and 24 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def _refused_address(host: str) -> str | None:
    """Why a host may not be sent to while private addresses are off: it resolves to a private,
    loopback, link-local or otherwise non-public address (or does not resolve)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        return f"its host {host!r} does not resolve ({exc})"
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global:
            return f"its host {host!r} is at {address}, a private address (EVENTFLOW_WEBHOOK_ALLOW_PRIVATE is off)"
    return None


def url_check(url: Any) -> str | None:
    """What is wrong with a webhook's URL, or None."""
    if not isinstance(url, str) or not url:
        return "must be an http or https URL"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url!r} is not an http or https URL"
    if len(url) > 2000:
        return "is longer than 2000 characters"
    if not _config("WEBHOOK_ALLOW_PRIVATE"):
        return _refused_address(parts.hostname)
    return None


def webhook_check(data: Mapping[str, Any], *, partial: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """A webhook's settings as given: the values to store, and what is wrong with each wrong field. The
    one check for the API and the admin."""
    clean: dict[str, Any] = {}
    errors: dict[str, str] = {}
    if "url" in data or not partial:
        if error := url_check(data.get("url")):
            errors["url"] = error
        else:
            clean["url"] = data["url"]
    if "notifications" in data or not partial:
        wanted = data.get("notifications")
        known = set(Notification.values)
        if not isinstance(wanted, list) or not wanted or not all(isinstance(n, str) for n in wanted):
            errors["notifications"] = f"must be a non-empty list of {', '.join(Notification.values)}"
        elif unknown := [n for n in wanted if n not in known]:
            errors["notifications"] = f"unknown notification {unknown[0]!r}: one of {', '.join(Notification.values)}"
        else:
            clean["notifications"] = list(dict.fromkeys(wanted))
    if data.get("secret") is not None:
        secret = data["secret"]
        try:
            valid = isinstance(secret, str) and secret.startswith(SECRET_PREFIX)
            valid = valid and len(base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)) >= 16
        except ValueError:
            valid = False
        if valid:
            clean["secret"] = secret
        else:
            errors["secret"] = "must be whsec_ followed by at least 16 bytes in base64"
    elif not partial:
        clean["secret"] = secret_new()
    for name in ("description", "is_active"):
        if name in data:
            kind = str if name == "description" else bool
            if isinstance(data[name], kind):
                clean[name] = data[name]
            else:
                errors[name] = f"must be {'a string' if kind is str else 'true or false'}"
    return clean, errors


def retry_delay(attempts: int) -> float:
    """Seconds before the next try of a notification tried `attempts` times: doubling from
    `WEBHOOK_RETRY_SECONDS`."""
    return _config("WEBHOOK_RETRY_SECONDS") * 2 ** (attempts - 1)


def body_of(delivery: Delivery) -> str:
    """What is POSTed: the notification, when it was raised, and what it says."""
    data = {"type": delivery.notification, "timestamp": delivery.created_at.isoformat(), "data": delivery.data}
    return json.dumps(data, separators=(",", ":"), sort_keys=True)


def _now() -> datetime:
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement_timestamp()")
        return cursor.fetchone()[0]


def _claim(delivery_id: str) -> Delivery | None:
    """The delivery, claimed for one attempt, if it is pending, due and not claimed by another sender."""
    hold = _config("WEBHOOK_TIMEOUT_SECONDS") + _grace()
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            UPDATE {Delivery._meta.db_table}
            SET sending = true, claimed_until = statement_timestamp() + make_interval(secs => %s)
            WHERE id = %s AND state = 'pending' AND next_attempt_at <= statement_timestamp() AND NOT sending
            RETURNING id
            """,
            [hold, delivery_id],
        )
        claimed = cursor.fetchone()
    return Delivery.objects.select_related("webhook").get(pk=claimed[0]) if claimed else None


def deliver(delivery_id: str) -> str:
    """One attempt to send a notification: its state after it (or "skipped" when it was not pending,
    not due, or another sender is at it)."""
    with transaction.atomic():
        delivery = _claim(delivery_id)
    if delivery is None:
        return "skipped"
    webhook = delivery.webhook
    body = body_of(delivery)
    started = time.monotonic()
    status_code, error = None, ""
    refused = None if _config("WEBHOOK_ALLOW_PRIVATE") else _refused_address(urlsplit(webhook.url).hostname or "")
    if refused:
        error = f"refused: {refused}"
    elif not webhook.is_active:
        error = "refused: the webhook is inactive"
    else:
        sent_at = timezone.now()
        headers = {
            "content-type": "application/json",
            "webhook-id": str(delivery.id),
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": Signer(webhook.secret).sign(str(delivery.id), sent_at, body),
            "user-agent": "Eventflow-Webhooks",
        }
        try:
            response = requests.post(
                webhook.url,
                data=body.encode(),
                headers=headers,
                timeout=(min(5.0, _config("WEBHOOK_TIMEOUT_SECONDS")), _config("WEBHOOK_TIMEOUT_SECONDS")),
                allow_redirects=False,
            )
            status_code = response.status_code
            if not 200 <= status_code < 300:
                error = f"answered {status_code}"
        except requests.RequestException as exc:
            error = f"{type(exc).__name__}: {exc}"[:2000]
    seconds = time.monotonic() - started
    return _record(delivery, status_code=status_code, error=error, seconds=seconds)


def _record(delivery: Delivery, *, status_code: int | None, error: str, seconds: float) -> str:
    """Record the attempt, and what comes next: delivered, another try later, or given up."""
    with transaction.atomic():
        now = _now()
        attempts = delivery.attempts + 1
        DeliveryAttempt.objects.create(
            delivery=delivery, number=attempts, at=now, status_code=status_code, error=error, seconds=seconds
        )
        fields: dict[str, Any] = {"attempts": attempts, "sending": False}
        if not error:
            fields.update(state=Delivery.State.DELIVERED, claimed_until=None)
        else:
            due = now + timedelta(seconds=retry_delay(attempts))
            if due > delivery.created_at + GIVE_UP_AFTER:
                fields.update(state=Delivery.State.FAILED, claimed_until=None)
            else:
                fields.update(next_attempt_at=due, claimed_until=due + timedelta(seconds=_grace()))
                _send_on_commit([delivery.id], eta=due)
        Delivery.objects.filter(pk=delivery.pk).update(**fields)
    if error:
        logger.warning(
            "webhook %s: %s of run %s: %s", delivery.webhook.url, delivery.notification, delivery.trace_id, error
        )
    return fields.get("state", Delivery.State.PENDING)


def _send_on_commit(ids: Iterable[Any], *, eta: datetime | None = None) -> None:
    """A message for each delivery, sent once the transaction that claimed them commits."""
    from workflows_app.engine.outbox import Outbox

    outbox = Outbox()
    for delivery_id in ids:
        outbox.add_delivery(str(delivery_id), eta=eta)
    outbox.flush_on_commit()


def deliveries_resend(ids: Iterable[Any]) -> int:
    """Send these notifications again now (the admin's "send again"), whatever became of them; how many."""
    ids = [str(i) for i in ids]
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(
                f"""
                UPDATE {Delivery._meta.db_table}
                SET state = 'pending', next_attempt_at = statement_timestamp(), created_at = statement_timestamp(),
                    claimed_until = statement_timestamp() + make_interval(secs => %s), sending = false
                WHERE id = ANY(%s::uuid[]) RETURNING id
                """,
                [_grace(), ids],
            )
            again = [row[0] for row in cursor.fetchall()]
        _send_on_commit(again)
    return len(again)


def deliveries_recover(*, limit: int = 200) -> int:
    """Send again the pending notifications whose claim lapsed: their message was lost (the process
    that committed them died before sending it, or the broker lost it). Run by the reconciler."""
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(
                f"""
                UPDATE {Delivery._meta.db_table}
                SET sending = false, claimed_until = statement_timestamp() + make_interval(secs => %s)
                WHERE id IN (
                    SELECT id FROM {Delivery._meta.db_table}
                    WHERE state = 'pending' AND claimed_until < statement_timestamp()
                    ORDER BY claimed_until LIMIT %s FOR UPDATE SKIP LOCKED
                )
                RETURNING id
                """,
                [_grace(), limit],
            )
            lost = [row[0] for row in cursor.fetchall()]
        _send_on_commit(lost)
    return len(lost)
