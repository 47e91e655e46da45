"""The workflow engine: every run and task transition, which signals, views, commands and the API call.

Where each rule lives:
- `rules`: the decisions, as plain functions: trigger rules (`trigger`), which successors become
  ready and what they become (`settle`, asking each node's kind), retries and their backoff
  (`retry_delay`), a run's end (`run_outcome`), admission's order and count (`admit`).
- `kinds`: kinds of node (`task`; `wait_event`, `approval` and `delay`, which wait DEFERRED without a
  worker; and any registered): what a node does once it may run.
- `events`: an attempt's Event (payload, context) and the message a task receives.
- `graph`: a version's graph, and node defaults.
- `transitions`: the services (`workflow_run_start`, `task_run_start`, `task_run_finish`,
  `workflow_run_cancel`, `workflow_run_retry`, `task_runs_reconcile`, ...), each gathering what a
  decision needs and having the database carry it out.
- `sql`: the statements and database functions that carry decisions out, on the database's clock.
- `outbox`: messages to Celery, sent after commit.
"""

from .graph import Graph, NodeSpec, graph_for_version, graph_from_spec
from .transitions import (
    ADMISSION_FIELDS,
    EngineError,
    Start,
    event_publish,
    event_type_admit,
    event_type_set_concurrency,
    event_type_settings_check,
    event_type_update,
    event_types_recount,
    run_payload_check,
    task_run_decide,
    task_run_finish,
    task_run_retrying,
    task_run_start,
    task_runs_reconcile,
    task_runs_redispatch,
    task_runs_renew,
    workflow_run_cancel,
    workflow_run_retry,
    workflow_run_start,
)

__all__ = [
    "EngineError",
    "Graph",
    "NodeSpec",
    "Start",
    "event_publish",
    "ADMISSION_FIELDS",
    "event_type_admit",
    "event_type_set_concurrency",
    "event_type_settings_check",
    "event_type_update",
    "event_types_recount",
    "graph_for_version",
    "graph_from_spec",
    "run_payload_check",
    "task_run_decide",
    "task_run_finish",
    "task_run_retrying",
    "task_run_start",
    "task_runs_reconcile",
    "task_runs_redispatch",
    "task_runs_renew",
    "workflow_run_cancel",
    "workflow_run_retry",
    "workflow_run_start",
]
