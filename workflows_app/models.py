"""Workflow definitions (nodes, edges, immutable versions) and runs (WorkflowRun, TaskRun)."""

import uuid

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models

# A node's key; the definition format checks it too.
NODE_KEY = r"^[A-Za-z0-9_-]{1,100}$"
key_validator = RegexValidator(NODE_KEY, "Use letters, digits, '_' or '-'.")


class TriggerRule(models.TextChoices):
    """Airflow's trigger rules; what each means is `engine.rules.TRIGGER_RULES`."""

    ALL_SUCCESS = "all_success", "all succeeded"
    ALL_FAILED = "all_failed", "all failed"
    ALL_DONE = "all_done", "all done"
    ALL_SKIPPED = "all_skipped", "all skipped"
    ONE_SUCCESS = "one_success", "one succeeded"
    ONE_FAILED = "one_failed", "one failed"
    ONE_DONE = "one_done", "one succeeded or failed"
    NONE_FAILED = "none_failed", "none failed"
    NONE_FAILED_MIN_ONE_SUCCESS = "none_failed_min_one_success", "none failed, one succeeded"
    NONE_SKIPPED = "none_skipped", "none skipped"
    ALWAYS = "always", "always"


class WorkflowDefinition(models.Model):
    name = models.SlugField(
        "name",
        max_length=100,
        unique=True,
        help_text="Unique slug used in the API and URLs.",
    )
    description = models.TextField("description", blank=True, default="")
    version = models.PositiveIntegerField(
        "version",
        default=1,
        editable=False,
        help_text="Bumped on every change; runs keep the version they began with.",
    )
    is_active = models.BooleanField("active", default=True, help_text="Inactive workflows cannot be triggered.")
    trigger_event_types = models.JSONField(
        "trigger event types",
        default=list,
        blank=True,
        help_text="Events of these types start a run.",
    )
    created_at = models.DateTimeField("created at", auto_now_add=True)
    updated_at = models.DateTimeField("updated at", auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "workflow definition"
        verbose_name_plural = "workflow definitions"

    def __str__(self) -> str:
        return self.name


class Node(models.Model):
    workflow = models.ForeignKey(
        WorkflowDefinition,
        on_delete=models.CASCADE,
        related_name="nodes",
        verbose_name="workflow",
    )
    key = models.CharField(
        "key",
        max_length=100,
        validators=[key_validator],
        help_text="Unique within the workflow.",
    )
    kind = models.CharField(
        "kind",
        max_length=50,
        default="task",
        help_text="What the node does: 'task' runs a Celery task; other kinds are registered by apps.",
    )
    task = models.CharField("task", max_length=200, blank=True, help_text="A registered Celery task name.")
    event_type = models.ForeignKey(
        "events_app.EventType",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="nodes",
        verbose_name="event type",
        help_text="Its queue and parallelism (for kinds that run on a worker).",
    )
    options = models.JSONField(
        "options", default=dict, blank=True, help_text="Settings of its kind beyond those every node has."
    )
    params = models.JSONField("params", default=dict, blank=True, help_text="Merged over the run payload.")
    max_retries = models.PositiveIntegerField("max retries", default=0, help_text="Retries with exponential backoff.")
    retry_delay = models.FloatField(
        "retry delay",
        default=1.0,
        validators=[MinValueValidator(0)],
        help_text="Seconds before the first retry.",
    )
    timeout = models.PositiveIntegerField(
        "timeout",
        null=True,
        blank=True,
        help_text="Seconds; past it the attempt fails.",
    )
    trigger_rule = models.CharField(
        "trigger rule",
        max_length=30,
        choices=TriggerRule.choices,
        default=TriggerRule.ALL_SUCCESS,
    )

    class Meta:
        ordering = ["workflow", "id"]
        verbose_name = "node"
        verbose_name_plural = "nodes"
        # Deferred so that swapping two keys in one admin save does not trip over itself mid-way.
        constraints = [
            models.UniqueConstraint(
                fields=["workflow", "key"],
                name="node_unique_key_per_workflow",
                deferrable=models.Deferrable.DEFERRED,
            )
        ]

    def __str__(self) -> str:
        return self.key


class Edge(models.Model):
    workflow = models.ForeignKey(
        WorkflowDefinition,
        on_delete=models.CASCADE,
        related_name="edges",
        verbose_name="workflow",
    )
    source = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="out_edges", verbose_name="source")
    target = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="in_edges", verbose_name="target")
    when = models.TextField(
        "when",
        blank=True,
        default="",
        help_text=(
            "Optional CEL condition on the source's `result` (and `payload`, `upstream`): when the source "
            "succeeds and this is false, the edge is not taken and counts as skipped for its target."
        ),
    )

    class Meta:
        ordering = ["workflow", "id"]
        verbose_name = "edge"
        verbose_name_plural = "edges"
        constraints = [
            models.UniqueConstraint(fields=["source", "target"], name="edge_unique"),
            models.CheckConstraint(condition=~models.Q(source=models.F("target")), name="edge_no_self_loop"),
        ]

    def __str__(self) -> str:
        return f"{self.source_id} -> {self.target_id}"


class WorkflowVersion(models.Model):
    """An immutable snapshot of a definition, shared by every run that began on it."""

    workflow = models.ForeignKey(
        WorkflowDefinition,
        on_delete=models.CASCADE,
        related_name="versions",
        verbose_name="workflow",
    )
    version = models.PositiveIntegerField("version")
    spec = models.JSONField("spec", help_text="The definition in its export shape.")
    created_at = models.DateTimeField("created at", auto_now_add=True)

    class Meta:
        ordering = ["workflow", "-version"]
        verbose_name = "workflow version"
        verbose_name_plural = "workflow versions"
        constraints = [models.UniqueConstraint(fields=["workflow", "version"], name="workflow_version_unique")]

    def __str__(self) -> str:
        return f"{self.workflow_id} v{self.version}"


class WorkflowRun(models.Model):
    class Status(models.TextChoices):
        RUNNING = "RUNNING", "running"
        SUCCESS = "SUCCESS", "success"
        FAILED = "FAILED", "failed"
        CANCELED = "CANCELED", "canceled"

    FINAL = (Status.SUCCESS, Status.FAILED, Status.CANCELED)

    trace_id = models.UUIDField("trace id", primary_key=True, default=uuid.uuid4, editable=False)
    workflow = models.ForeignKey(
        WorkflowDefinition,
        on_delete=models.PROTECT,
        related_name="runs",
        verbose_name="workflow",
    )
    version = models.ForeignKey(
        WorkflowVersion,
        on_delete=models.PROTECT,
        related_name="runs",
        verbose_name="definition version",
    )
    workflow_version = models.PositiveIntegerField("workflow version")
    status = models.CharField("status", max_length=10, choices=Status.choices, default=Status.RUNNING)
    payload = models.JSONField("payload", default=dict, blank=True)
    # NULL, not "", for "no key": the partial unique constraint then ignores keyless runs.
    idempotency_key = models.CharField(  # noqa: DJ001
        "idempotency key", max_length=200, null=True, blank=True
    )
    source = models.CharField(
        "source",
        max_length=100,
        default="api",
        help_text="What started it: api, command, event or schedule.",
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="workflow_runs",
        verbose_name="created by",
    )
    trigger_event = models.ForeignKey(
        "events_app.Event",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="triggered_runs",
        verbose_name="trigger event",
        help_text="The published event that started this run, if an event did.",
    )
    priority = models.PositiveSmallIntegerField(
        "priority",
        default=5,
        db_default=5,
        validators=[MaxValueValidator(9)],
        help_text="0 to 9: its tasks go before those of runs with a lower one in every line.",
    )
    created_at = models.DateTimeField("created at", auto_now_add=True)
    finished_at = models.DateTimeField("finished at", null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "workflow run"
        verbose_name_plural = "workflow runs"
        permissions = [("approve_workflowrun", "Can approve or reject a run's waiting approval")]
        indexes = [
            models.Index(fields=["-created_at"], name="run_created_idx"),
            models.Index(fields=["workflow", "-created_at"], name="run_workflow_created_idx"),
            models.Index(fields=["status", "-created_at"], name="run_status_created_idx"),
            # The run list filtered by workflow and status, and its per-status counts within a workflow.
            models.Index(fields=["workflow", "status", "-created_at"], name="run_workflow_status_idx"),
            # purge_runs walks finished runs oldest first; unfinished runs are not in it.
            models.Index(
                fields=["finished_at"], condition=models.Q(finished_at__isnull=False), name="run_finished_idx"
            ),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["workflow", "idempotency_key"],
                condition=models.Q(idempotency_key__isnull=False),
                name="run_unique_idempotency_key",
            )
        ]

    def __str__(self) -> str:
        return str(self.trace_id)

    @property
    def is_final(self) -> bool:
        return self.status in self.FINAL


class TaskRun(models.Model):
    class Status(models.TextChoices):
        WAITING = "WAITING", "waiting"
        QUEUED = "QUEUED", "queued"
        DEFERRED = "DEFERRED", "deferred"
        STARTED = "STARTED", "started"
        RETRY = "RETRY", "retry"
        SUCCESS = "SUCCESS", "success"
        FAILURE = "FAILURE", "failure"
        SKIPPED = "SKIPPED", "skipped"
        UPSTREAM_FAILED = "UPSTREAM_FAILED", "upstream failed"
        REVOKED = "REVOKED", "revoked"

    FINAL = (
        Status.SUCCESS,
        Status.FAILURE,
        Status.SKIPPED,
        Status.UPSTREAM_FAILED,
        Status.REVOKED,
    )

    # Not indexed alone: the (run, node_key) constraint's index serves every lookup by run. Each
    # index is written on every transition of a task, so the table keeps only those a query needs.
    run = models.ForeignKey(
        WorkflowRun, on_delete=models.CASCADE, related_name="tasks", verbose_name="run", db_index=False
    )
    node_key = models.CharField("node", max_length=100)
    map_index = models.PositiveIntegerField(
        "map index",
        null=True,
        blank=True,
        help_text="Which instance of its node this is, for a node with many; null for a node's only one.",
    )
    event_type = models.ForeignKey(
        "events_app.EventType",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="task_runs",
        verbose_name="event type",
        db_index=False,  # indexed in Meta, without the LIKE index Django adds for a text key
    )
    task_name = models.CharField("task name", max_length=200, blank=True)
    status = models.CharField("status", max_length=16, choices=Status.choices, default=Status.WAITING)
    attempts = models.PositiveIntegerField("attempts", default=0, help_text="Attempts started or sent so far.")
    holds_slot = models.BooleanField(
        "holds a slot",
        default=False,
        help_text="Handed to Celery and not finished: counts against concurrency.",
    )
    current_event = models.ForeignKey(
        "events_app.Event",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        verbose_name="current event",
        help_text="The Event of the latest attempt; its id is the Celery task id.",
    )
    queued_at = models.DateTimeField("queued at", null=True, blank=True, help_text="When it became ready.")
    started_at = models.DateTimeField("started at", null=True, blank=True)
    finished_at = models.DateTimeField("finished at", null=True, blank=True)
    result = models.JSONField("result", null=True, blank=True)
    error = models.TextField("error", blank=True, default="")
    worker = models.CharField("worker", max_length=200, blank=True, default="")
    due_at = models.DateTimeField(
        "due at",
        null=True,
        blank=True,
        help_text=(
            "When its next attempt may start (a retry's backoff), or when a waiting node's wait ends (its "
            "timeout, a delay's end), on the database's clock."
        ),
    )
    wait_type = models.CharField(
        "waits for event type",
        max_length=100,
        blank=True,
        default="",
        db_default="",
        help_text="A wait_event node's event type.",
    )
    wait_key = models.CharField(
        "waits for key",
        max_length=200,
        blank=True,
        default="",
        db_default="",
        help_text="The key a wait_event node's event must carry.",
    )
    # Its place in its type's line: its run's priority and start, copied so one index orders the line,
    # and its fairness key (its type's `fairness_key` on the run's payload when the run started).
    priority = models.PositiveSmallIntegerField("priority", default=5, db_default=5)
    run_created_at = models.DateTimeField("run started at", null=True, blank=True)
    fair_key = models.CharField("fairness key", max_length=200, blank=True, default="", db_default="")
    dispatched_at = models.DateTimeField(
        "dispatched at", null=True, blank=True, help_text="When its latest attempt was handed to Celery."
    )
    lease_expires_at = models.DateTimeField(
        "lease expires at",
        null=True,
        blank=True,
        help_text=(
            "For a task holding a slot, when its state must next be confirmed: a sent task must have "
            "started by then, a started one's worker must have renewed it. Past it, the reconciler acts."
        ),
    )

    class Meta:
        ordering = ["run", "id"]
        verbose_name = "task run"
        verbose_name_plural = "task runs"
        constraints = [
            models.UniqueConstraint(
                fields=["run", "node_key", "map_index"], name="task_run_unique_instance", nulls_distinct=False
            )
        ]
        indexes = [
            models.Index(fields=["run", "status"], name="task_run_run_status_idx"),
            models.Index(fields=["event_type"], name="task_run_event_type_idx"),
            # The waiting line of an event type by age (queue timeouts, the oldest wait); only rows still
            # waiting are indexed.
            models.Index(
                fields=["event_type", "queued_at", "id"],
                condition=models.Q(status="QUEUED", holds_slot=False),
                name="task_run_line_idx",
            ),
            # Each fairness key's line in admission's order: priority, the run's start, readiness.
            models.Index(
                "event_type",
                "fair_key",
                models.F("priority").desc(),
                "run_created_at",
                "queued_at",
                "id",
                condition=models.Q(status="QUEUED", holds_slot=False),
                name="task_run_key_line_idx",
            ),
            # Occupied slots of an event type: what the reconciler recounts `EventType.held` from.
            models.Index(
                fields=["event_type"],
                condition=models.Q(holds_slot=True),
                name="task_run_slot_idx",
            ),
            # The waiters of an event type and key: what a published event resumes.
            models.Index(
                fields=["wait_type", "wait_key"],
                condition=models.Q(status="DEFERRED"),
                name="task_run_waiting_idx",
            ),
            # Waiting nodes by the end of their wait: what the reconciler ends.
            models.Index(fields=["due_at"], condition=models.Q(status="DEFERRED"), name="task_run_wait_due_idx"),
            # Slot holders by deadline: what the reconciler scans.
            models.Index(
                fields=["lease_expires_at"],
                condition=models.Q(holds_slot=True),
                name="task_run_deadline_idx",
            ),
            # Tasks that ended, by type and time: the queues page's throughput of the last hour, and the
            # tasks that /metrics counts since its rollup (nodes without a type under NULL).
            models.Index(
                fields=["event_type", "finished_at"],
                condition=models.Q(status__in=["SUCCESS", "FAILURE", "SKIPPED", "UPSTREAM_FAILED", "REVOKED"]),
                name="task_run_ended_idx",
            ),
        ]

    def __str__(self) -> str:
        instance = "" if self.map_index is None else f"[{self.map_index}]"
        return f"{self.run_id}:{self.node_key}{instance}"

    @property
    def duration(self) -> float | None:
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds()
        return None


class Worker(models.Model):
    """A Celery worker as its main process last reported itself: the durable list `/workers/` reads, so
    a restart of the web app (or of Flower) forgets none, and a worker that died says when it went quiet."""

    name = models.CharField(
        "name",
        max_length=200,
        unique=True,
        help_text="Celery's node name (`-n`, e.g. w1@host): what a task's `worker` holds.",
    )
    hostname = models.CharField("host", max_length=200, help_text="The machine it runs on.")
    queues = models.JSONField("queues", default=list, blank=True, help_text="The queues it consumes.")
    pool_size = models.PositiveIntegerField("pool size", default=0, help_text="Its concurrency: pool processes.")
    pid = models.PositiveIntegerField("pid", default=0, help_text="Its main process's id on its host.")
    started_at = models.DateTimeField(
        "started at", help_text="When this process (this pid) first reported, on the database's clock."
    )
    last_seen = models.DateTimeField(
        "last heard from", help_text="Its latest heartbeat, on the database's clock: every few seconds while alive."
    )
    attempts = models.JSONField(
        "attempts at last heartbeat",
        default=list,
        blank=True,
        help_text=(
            "Event ids of the attempts its pool ran at its latest heartbeat: what a worker that died was doing, "
            "since a retried attempt's task row then names its new worker."
        ),
    )

    class Meta:
        ordering = ["name"]
        verbose_name = "worker"
        verbose_name_plural = "workers"
        # /workers/ lists those heard from recently, newest heartbeat first.
        indexes = [models.Index(fields=["-last_seen"], name="worker_last_seen_idx")]

    def __str__(self) -> str:
        return self.name


class MetricsRollup(models.Model):
    """The runs and tasks that ended before `MetricsWatermark.until`, counted once by `/metrics` and
    kept: a scrape adds to them only what ended since, so its cost follows the recent throughput,
    not the history stored, and `purge_runs` does not make the counters drop."""

    kind = models.CharField("kind", max_length=10, help_text="run or task")
    label = models.CharField("workflow or event type", max_length=200, blank=True)
    status = models.CharField("status", max_length=16)
    count = models.BigIntegerField("count", default=0)

    class Meta:
        verbose_name = "metrics rollup"
        constraints = [models.UniqueConstraint(fields=["kind", "label", "status"], name="metrics_rollup_unique")]

    def __str__(self) -> str:
        return f"{self.kind} {self.label} {self.status}: {self.count}"


class MetricsWatermark(models.Model):
    """Until when `MetricsRollup` has counted, on the database's clock (one row)."""

    until = models.DateTimeField("until")

    class Meta:
        verbose_name = "metrics watermark"

    def __str__(self) -> str:
        return str(self.until)
