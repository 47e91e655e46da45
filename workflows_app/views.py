"""Server-rendered status pages: runs, a run (live fragment, node detail, cancel, retry, approve and reject),
waiting approvals, workflows, queues."""

from __future__ import annotations

import html
import json
import uuid
from datetime import datetime, timedelta, tzinfo
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.mixins import LoginRequiredMixin, PermissionRequiredMixin
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect
from django.urls import reverse
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.utils.http import url_has_allowed_host_and_scheme, urlencode
from django.utils.safestring import SafeString, mark_safe
from django.views import View
from django.views.generic import TemplateView

from . import bulk, engine, graph_svg, selectors
from .engine import EngineError, graph_from_spec
from .models import TaskRun, WorkflowRun

RUNS_PER_PAGE = 50
RECENT_RUNS = 20
# Per-status counts on the run list stop at this many (shown as "10,000+"): counting further would
# cost time in proportion to the table, and past it the exact figure does not change a decision.
RUN_COUNT_CAP = 10_000
THROUGHPUT_WINDOW = timedelta(hours=1)
# /workers/ lists the workers heard from within this long; older rows stay in the table (and the admin).
WORKERS_SHOWN_FOR = timedelta(hours=1)
# The workflow page's per-node trends cover this many of its latest runs.
TREND_RUNS = 100
# Long payloads, results and errors are cut: the live fragment is fetched every second per viewer.
PAYLOAD_PREVIEW_CHARS = 20_000
RESULT_PREVIEW_CHARS = 160
ERROR_PREVIEW_CHARS = 200
INSTANCES_PER_PAGE = 50
DETAIL_CHARS = 50_000
QUICK_RANGES = (("1h", "last hour"), ("24h", "24 hours"), ("7d", "7 days"), ("30d", "30 days"))
# As long as the API takes (NodeDecideApi).
COMMENT_MAX_CHARS = 2000
APPROVE_PERMISSION = "workflows_app.approve_workflowrun"


def home(request: HttpRequest) -> HttpResponse:
    return redirect("workflows_app:run-list")


def format_duration(seconds: float | None) -> str:
    """A short human duration: 340 ms, 2.4 s, 3m 05s, 2h 03m; empty for unknown."""
    if seconds is None:
        return ""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _between(start: datetime | None, end: datetime | None) -> float | None:
    return (end - start).total_seconds() if start and end else None


def _preview(value: Any, limit: int) -> str:
    if value in (None, {}, [], ""):
        return ""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _pretty(value: Any, limit: int = DETAIL_CHARS) -> str:
    """Indented JSON for a detail view, cut at `limit` characters."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, indent=2, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _first_line(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    # A Python traceback's useful line is its last one; any other message leads with it.
    line = lines[-1] if lines and lines[0].startswith("Traceback") else (lines[0] if lines else "")
    return _preview(line.strip(), ERROR_PREVIEW_CHARS)


# How a mapped node's instances are summed up, in this order: a mark for the two outcomes, else a word.
INSTANCE_LABELS = (
    ("SUCCESS", "\u2713"),
    ("FAILURE", "\u2717"),
    ("STARTED", "running"),
    ("RETRY", "retrying"),
    ("QUEUED", "queued"),
    ("WAITING", "waiting"),
    ("REVOKED", "revoked"),
    ("SKIPPED", "skipped"),
    ("UPSTREAM_FAILED", "upstream failed"),
)
# Statuses whose `error` says why a node did not run, rather than what went wrong in it.
NOT_RUN = (TaskRun.Status.SKIPPED, TaskRun.Status.UPSTREAM_FAILED)
REJECTED_BY = "rejected by "


def waiting_for(task: TaskRun, kind: str) -> str:
    """What a DEFERRED node waits for, in a few words (its deadline apart)."""
    if kind == "wait_event":
        return f"event {task.wait_type} with key {task.wait_key}"
    return {"approval": "an approval", "delay": "its delay to end"}.get(kind, kind)


def waiting_short(task: TaskRun, kind: str, tz: tzinfo) -> str:
    """The same, short enough for the second line of its box in the drawing."""
    if kind == "wait_event":
        return f"waits for key {task.wait_key}"
    if kind == "approval":
        return "waits for an approval"
    return f"until {task.due_at.astimezone(tz):%H:%M:%S}" if task.due_at else "waits"


def approval_decision(task: TaskRun) -> dict[str, Any] | None:
    """Who decided an approval, when, and their comment: from its result once approved, from its error
    once rejected (usernames hold no ": "); None for an approval nobody decided (waiting, timed out)."""
    result = task.result if isinstance(task.result, dict) else {}
    if task.status == TaskRun.Status.SUCCESS and result.get("approved") is True:
        at = parse_datetime(str(result.get("at") or "")) or task.finished_at
        return {"approved": True, "by": result.get("by", ""), "comment": result.get("comment", ""), "at": at}
    if task.status == TaskRun.Status.FAILURE and task.error.startswith(REJECTED_BY):
        by, _, comment = task.error[len(REJECTED_BY) :].partition(": ")
        return {"approved": False, "by": by, "comment": comment, "at": task.finished_at}
    return None


def instance_summary(counts: dict[str, int], sep: str = " ") -> str:
    """A mapped node's instances per status, e.g. "180 \u2713 3 running 17 queued"; empty for none."""
    return sep.join(f"{counts[status]} {label}" for status, label in INSTANCE_LABELS if counts.get(status))


def instance_total(counts: dict[str, int]) -> int:
    return sum(n for status, n in counts.items() if status != "attempts")


# The task and event tables of a large run have thousands of cells and the live fragment is redrawn
# every second, so their rows are built here with plain string formatting: Django's template loop
# and `date` filter cost about ten times as much per cell.
def escape(value: Any) -> str:
    return html.escape(str(value))


def _time_cell(moment: datetime | None, tz: tzinfo) -> str:
    if moment is None:
        return "<td></td>"
    local = moment.astimezone(tz)
    stamp = local.isoformat()
    return f'<td><time datetime="{stamp}">{local:%H:%M:%S}</time></td>'


def task_rows_html(rows: list[dict[str, Any]]) -> SafeString:
    """The <tr> of each task of the run page's task table."""
    parts = []
    tz = timezone.get_current_timezone()
    for row in rows:
        task = row["task"]
        key, status = escape(row["key"]), escape(task.status)
        place = ""
        if row["place"]:
            position = "" if task.line_position is None else task.line_position
            place = f' <span class="muted" data-line-position="{position}">{escape(row["place"])}</span>'
        if row["mapped"]:
            place += f' <span class="instances" data-instances="{row["instances"]}">{escape(row["summary"])}</span>'
        if row["waits"]:
            until = ""
            if task.due_at:
                local = task.due_at.astimezone(tz)
                until = f' until <time datetime="{local.isoformat()}">{local:%Y-%m-%d %H:%M:%S}</time>'
            kind, waits = escape(row["kind"]), escape(row["waits"])
            place += f' <span class="waits" data-waits="{kind}">waits for {waits}{until}</span>'
        mapped = ' data-mapped="true"' if row["mapped"] else ""
        # A node of a kind that runs no task (it waits) is named by its kind.
        task_cell = (
            f' class="mono">{escape(task.task_name)}' if task.task_name else f' class="muted">{escape(row["kind"])}'
        )
        # Why a node did not run is no error of its own: shown as a reason, not in red.
        reason = "reason" if task.status in NOT_RUN else "error"
        duration = escape(row["duration"])
        if row["running"]:
            duration = f'<span class="muted">{duration} so far</span>'
        parts.append(
            f'<tr id="task-{key}" data-node="{key}" data-status="{status}"{mapped}>'
            f'<td><a href="{escape(row["detail_url"])}" data-node-link="{key}"><strong>{key}</strong></a></td>'
            f"<td>{escape(task.event_type_id or '')}</td>"
            f"<td{task_cell}</td>"
            f'<td><span class="badge st-{status}">{status}</span>{place}</td>'
            f'<td class="num">{row["attempts"]}</td>'
            f"{_time_cell(task.queued_at, tz)}{_time_cell(task.started_at, tz)}{_time_cell(task.finished_at, tz)}"
            f'<td class="num">{escape(row["waited"])}</td>'
            f'<td class="num">{duration}</td>'
            f'<td class="wrap {reason}" title="{escape(row["error_full"])}">{escape(row["error"])}</td>'
            "</tr>\n"
        )
    return mark_safe("".join(parts))  # every value above is escaped


def event_rows_html(events: list[dict[str, Any]], *, run_url: str) -> SafeString:
    """The <tr> of each event of the run page's event table, in order."""
    parts = []
    tz = timezone.get_current_timezone()
    run_url = escape(run_url)
    for item in events:
        event = item["event"]
        node = escape(item["node"])
        link = (
            f'<a href="{run_url}nodes/{node}/" data-node-link="{node}">{node}</a>'
            if node
            else '<span class="muted">trigger</span>'
        )
        status = escape(event.status)
        stamp = event.timestamp.astimezone(tz)
        parts.append(
            f'<tr data-event-id="{event.event_id}">'
            f'<td><time datetime="{stamp.isoformat()}">{stamp:%H:%M:%S}</time></td>'
            f"<td>{link}</td>"
            f'<td class="num">{escape(item["attempt"])}</td>'
            f"<td>{escape(event.event_type)}</td>"
            f'<td><span class="badge st-{status}">{status}</span></td>'
            f'<td class="mono">{event.event_id}</td>'
            f'<td class="wrap mono">{escape(item["result"])}</td>'
            "</tr>\n"
        )
    return mark_safe("".join(parts))  # every value above is escaped


def node_rows_html(nodes: list[Any], *, queues_url: str) -> SafeString:
    """The <tr> of each node of the workflow page's node table (`after`, `map_over` and `params_json` set
    on each; `after` as (source, the edge's condition) pairs)."""
    parts = []
    for node in nodes:
        key, event_type = escape(node.key), escape(node.event_type_id or "")
        none = '<span class="muted">\u2014</span>'
        timeout = f"{node.timeout} s" if node.timeout else none
        after = ", ".join(
            f'<a href="#node-{escape(source)}">{escape(source)}</a>'
            + (
                f' <span class="when" data-when="{escape(when)}">when <code>{escape(when)}</code></span>'
                if when
                else ""
            )
            for source, when in node.after
        )
        task = escape(node.task or node.kind)
        if node.map_over:
            over = escape(node.map_over)
            task += f'<br><span class="map-over" data-map-over="{over}">map over <code>{over}</code></span>'
        # A node of a kind that needs no worker has no queue, hence no concurrency: its kind is shown.
        concurrency = (
            f'<a href="{escape(queues_url)}#queue-{event_type}" title="its queue">{node.event_type.concurrency}</a>'
            if node.event_type_id
            else none
        )
        parts.append(
            f'<tr id="node-{key}" data-node="{key}" data-kind="{escape(node.kind)}">'
            f"<td><strong>{key}</strong></td>"
            f'<td class="mono">{task}</td>'
            f"<td>{event_type}</td>"
            f'<td class="num">{concurrency}</td>'
            f'<td class="num">{node.max_retries}</td>'
            f'<td class="num">{escape(node.retry_delay)} s</td>'
            f'<td class="num">{timeout}</td>'
            f"<td>{escape(node.get_trigger_rule_display())}</td>"
            f'<td class="wrap">{after}</td>'
            f'<td class="wrap mono">{escape(node.params_json)}</td>'
            "</tr>\n"
        )
    return mark_safe("".join(parts))  # every value above is escaped


def pages_public() -> bool:
    """Whether the status pages are open without a login (EVENTFLOW_PUBLIC_PAGES; off by default)."""
    return bool(settings.EVENTFLOW.get("PUBLIC_PAGES", False))


class LoginUnlessPublicMixin(LoginRequiredMixin):
    """A login is required unless the administrator opened the pages to everyone."""

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if pages_public():
            # Skip LoginRequiredMixin's check only; the view's own dispatch still runs.
            return super(LoginRequiredMixin, self).dispatch(request, *args, **kwargs)
        return super().dispatch(request, *args, **kwargs)


class PageMixin(LoginUnlessPublicMixin):
    """The nav entry to highlight and the status palette for base.html."""

    nav = ""

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        context.update(nav=self.nav, status_css=graph_svg.status_css())
        return context


# --------------------------------------------------------------------------- run list


def parse_moment(text: str, *, end: bool = False, now: datetime | None = None) -> datetime | None:
    """A time filter: ISO date or date-time (UTC when naive), or a span back from now such as 15m, 24h, 7d
    (`selectors.moment_parse`, which the API and the bulk actions read filters with too)."""
    return selectors.moment_parse(text, end=end, now=now)


def cursor_encode(run: WorkflowRun) -> str:
    return f"{run.created_at.isoformat()}_{run.trace_id}"


def cursor_decode(text: str) -> tuple[datetime, str] | None:
    """The (created_at, trace_id) pair a page link carries; None when it is not one."""
    moment_text, _, trace_text = (text or "").rpartition("_")
    try:
        moment = parse_datetime(moment_text)
        trace_id = str(uuid.UUID(trace_text))
    except ValueError:
        return None
    if moment is None or timezone.is_naive(moment):
        return None
    return moment, trace_id


def _count_label(count: int) -> str:
    return f"{RUN_COUNT_CAP:,}+" if count > RUN_COUNT_CAP else f"{count:,}"


class RunListView(PageMixin, TemplateView):
    template_name = "workflows_app/run_list.html"
    nav = "runs"

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        params = self.request.GET
        now = timezone.now()
        workflow = params.get("workflow", "").strip()
        status = params.get("status", "").strip().upper()
        if status not in WorkflowRun.Status.values:
            status = ""
        since_text, until_text = params.get("since", "").strip(), params.get("until", "").strip()
        since = parse_moment(since_text, now=now)
        until = parse_moment(until_text, end=True, now=now)
        ignored = [
            name
            for name, text, value in (("since", since_text, since), ("until", until_text, until))
            if text and not value
        ]
        payload_text = params.get("payload", "").strip()
        payload, payload_error = None, ""
        if payload_text:
            try:
                payload = selectors.payload_filter_parse(payload_text)
            except ValueError as exc:
                payload_error = str(exc)
        window = {"workflow": workflow or None, "since": since, "until": until, "payload": payload}

        counts = selectors.run_status_counts(**window, cap=RUN_COUNT_CAP)
        older_than = cursor_decode(params.get("older", ""))
        newer_than = None if older_than else cursor_decode(params.get("newer", ""))
        runs, more = selectors.run_page_list(
            **window,
            status=status or None,
            older_than=older_than,
            newer_than=newer_than,
            limit=RUNS_PER_PAGE,
        )
        # Going back (newer) there is always an older page: the one we came from; and vice versa.
        has_newer = more if newer_than else bool(older_than)
        has_older = True if newer_than else more
        for run in runs:
            run.elapsed = format_duration(_between(run.created_at, run.finished_at or now))

        filters = {
            k: v
            for k, v in (
                ("workflow", workflow),
                ("since", since_text),
                ("until", until_text),
                ("payload", payload_text if payload else ""),
            )
            if v
        }
        with_status = {**filters, **({"status": status} if status else {})}

        def query(**extra: str) -> str:
            return urlencode({**with_status, **extra})

        capped = any(n > RUN_COUNT_CAP for n in counts.values())
        context.update(
            runs=runs,
            workflow=workflow,
            status=status,
            since=since_text if since else "",
            until=until_text if until else "",
            since_at=since,
            until_at=until,
            ignored=ignored,
            workflows=list(selectors.workflow_list().values_list("name", flat=True)),
            statuses=WorkflowRun.Status.values,
            status_counts=[(s, _count_label(counts[s])) for s in WorkflowRun.Status.values],
            total=f"{sum(min(n, RUN_COUNT_CAP) for n in counts.values()):,}{'+' if capped else ''}",
            quick_ranges=[(value, label, urlencode({**with_status, "since": value})) for value, label in QUICK_RANGES],
            has_newer=has_newer,
            has_older=has_older,
            newer_query=query(newer=cursor_encode(runs[0])) if runs and has_newer else "",
            older_query=query(older=cursor_encode(runs[-1])) if runs and has_older else "",
            first_query=query(),
            paged=bool(older_than or newer_than),
            # Query strings that keep the other filters on the status chips and the "clear" links.
            filter_query=urlencode(filters),
            filtered=bool(filters or status),
            payload=payload_text,
            payload_error=payload_error,
            can_act=can_act_on_runs(self.request),
            # The whole filter, status included, that "all matching" acts on.
            bulk_query=urlencode(with_status),
            here=self.request.get_full_path(),
        )
        return context


# --------------------------------------------------------------------------- bulk actions


BULK_VERBS = {"cancel": ("Cancel", "canceled", "running"), "retry": ("Retry", "retried", "failed or canceled")}


def _bulk_request(data: Any) -> tuple[str, str, selectors.RunFilter | None, dict[str, str]]:
    """The action, its scope ('selected' or 'all'), and its runs from a form (GET or POST): the checked
    trace ids, or the filter of the run list; with what is wrong with it, by field."""
    action = data.get("action", "")
    scope = "selected" if data.get("scope") == "selected" else "all"
    errors: dict[str, str] = {}
    if action not in BULK_VERBS:
        errors["action"] = "one of cancel, retry"
    fields: dict[str, Any] = {}
    if scope == "selected":
        fields["trace_ids"] = data.getlist("trace_id")
        if not fields["trace_ids"]:
            errors["trace_ids"] = "select at least one run"
    else:
        fields.update({name: data.get(name, "") for name in ("workflow", "status", "since", "until", "payload")})
    filters = None
    if not errors:
        try:
            filters = selectors.run_filter_parse(fields)
        except selectors.FilterError as exc:
            errors.update(exc.errors)
        if filters is not None and filters.is_empty():
            errors["filter"] = "name the runs: select some, or filter the list first"
            filters = None
    return action, scope, filters if not errors else None, errors


def _run_list_url(filters: selectors.RunFilter | None) -> str:
    url = reverse("workflows_app:run-list")
    given = {k: v for k, v in (filters.given if filters else {}).items() if v}
    return f"{url}?{urlencode(given)}" if given else url


class RunBulkView(PermissionRequiredMixin, PageMixin, TemplateView):
    """Cancel or retry many runs from the run list: GET shows what would happen (how many runs match and how
    many would change) with a form to confirm; POST does it, then back to the list with the outcome. Plain
    forms, so it works without JavaScript."""

    template_name = "workflows_app/run_bulk.html"
    nav = "runs"
    permission_required = "workflows_app.change_workflowrun"
    raise_exception = True
    http_method_names = ["get", "post"]

    def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        action, scope, filters, errors = _bulk_request(request.GET)
        context = self.get_context_data(action=action, scope=scope, filters=filters, errors=errors)
        if filters is not None:
            matched, changing = bulk.bulk_preview(action=action, filters=filters)
            context.update(matched=matched, changing=changing, others=matched - changing)
        return self.render_to_response(context, status=400 if errors else 200)

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        action, scope, filters, errors = _bulk_request(request.POST)
        if errors or filters is None:
            context = self.get_context_data(action=action, scope=scope, filters=filters, errors=errors)
            return self.render_to_response(context, status=400)
        service = bulk.workflow_runs_cancel if action == "cancel" else bulk.workflow_runs_retry
        result = service(filters=filters)
        verb, done, _ = BULK_VERBS[action]
        text = f"{result.changed:,} of {result.matched:,} matching run{'s' if result.matched != 1 else ''} {done}"
        if result.changed < result.matched:
            text += f"; the other {result.matched - result.changed:,} were left as they were"
        messages.success(request, text + ".")
        return HttpResponseRedirect(_safe_next(request, _run_list_url(filters)))

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        action, filters = kwargs.get("action"), kwargs.get("filters")
        verb, done, eligible = BULK_VERBS.get(action, ("", "", ""))
        given = filters.given if filters else {}
        context.update(
            verb=verb,
            done=done,
            eligible=eligible,
            hidden=[(k, v) for k, v in given.items() if k != "trace_ids" and v],
            trace_ids=list(filters.trace_ids or ()) if filters else [],
            back=_safe_next_get(self.request, _run_list_url(filters)),
        )
        return context


# --------------------------------------------------------------------------- run page


def can_act_on_runs(request: HttpRequest) -> bool:
    return request.user.has_perm("workflows_app.change_workflowrun")


def run_live_context(*, trace_id: str) -> dict[str, Any]:
    """Everything the live fragment draws: the run, its coloured DAG, timeline, task rows and events."""
    run = selectors.run_page_get(trace_id=trace_id)
    if run is None:
        raise Http404("No run with this trace id.")
    # The run's own version snapshot, already loaded: no query, and never the live definition.
    graph = graph_from_spec(run.version.spec, version=run.workflow_version)
    now = timezone.now()
    run_url = reverse("workflows_app:run-detail", args=[run.trace_id])
    tasks = {task.node_key: task for task in run.tasks.all()}
    instances = selectors.run_instance_counts(trace_id=trace_id)
    rows = []
    nodes = []
    tz = timezone.get_current_timezone()
    for key, spec in graph.nodes.items():
        task = tasks.get(key)
        if task is None:
            continue
        deferred = task.status == TaskRun.Status.DEFERRED
        # Mapped in this run: it has instances, or its version says it maps (and has none yet).
        mapped = key in instances or bool(spec.options.get("map_over"))
        counts = instances.get(key, {})
        summary = instance_summary(counts)
        running = bool(task.started_at) and task.status in (TaskRun.Status.STARTED, TaskRun.Status.RETRY)
        duration = _between(task.started_at, task.finished_at or (now if running else None))
        waiting = _between(task.queued_at, task.started_at or task.finished_at or now) if task.queued_at else None
        if task.line_position is not None:
            place = f"#{task.line_position} in line"
        elif task.status == TaskRun.Status.QUEUED:
            place = "sent to a worker"
        else:
            place = ""
        # Node keys are slugs, so the detail URL is built without a reverse() per node.
        detail_url = f"{run_url}nodes/{key}/"
        row = {
            "task": task,
            "key": key,
            "detail_url": detail_url,
            "duration": format_duration(duration),
            "running": running,
            "waited": format_duration(waiting),
            "place": place,
            "error": _first_line(task.error),
            "error_full": _preview(task.error, 2000),
            "mapped": mapped,
            "instances": instance_total(counts),
            "summary": instance_summary(counts, " \u00b7 ")
            or ("no instances" if task.status in TaskRun.FINAL else "no instances yet"),
            # A mapped node's own row never runs: its attempts are its instances'.
            "attempts": counts.get("attempts", 0) if mapped else task.attempts,
            "kind": spec.kind,
            "waits": waiting_for(task, spec.kind) if deferred else "",
        }
        rows.append(row)
        if mapped and summary:
            detail = summary
        elif deferred:
            detail = waiting_short(task, spec.kind, tz)
        elif spec.kind == "approval" and task.status == TaskRun.Status.SUCCESS:
            detail = "approved"
        elif spec.kind == "approval" and task.error.startswith(REJECTED_BY):
            # The error names who rejected it; the comment after it is in the row and the detail.
            detail = task.error.partition(": ")[0]
        elif task.status in NOT_RUN and task.error:
            detail = _first_line(task.error)
        else:
            detail = place or " \u00b7 ".join(
                part
                for part in (
                    f"attempt {task.attempts}" if task.attempts else "",
                    row["duration"],
                )
                if part
            )
        tooltip = [key, spec.task, task.status]
        if mapped:
            tooltip.append(f"map over {spec.options.get('map_over', '')}: {row['summary']}")
        if task.status in NOT_RUN and task.error:
            tooltip.append(task.error)
        if deferred:
            until = f" until {task.due_at.astimezone(tz):%Y-%m-%d %H:%M:%S}" if task.due_at else ""
            tooltip.append(f"waits for {row['waits']}{until}")
        nodes.append(
            graph_svg.SvgNode(
                key=key,
                lines=(spec.event_type or spec.kind, detail or task.get_status_display()),
                status=task.status,
                href=detail_url,
                tooltip=" \u00b7 ".join(tooltip),
                mapped=mapped,
                badge=f"\u00d7{row['instances']}" if row["instances"] else ("map" if mapped else ""),
            )
        )
    edges = [(source, target) for target, sources in graph.preds.items() for source in sources]
    timeline_end = run.finished_at or now
    events = [
        {
            "event": event,
            "node": (event.context or {}).get("node", ""),
            "attempt": (event.context or {}).get("attempt", ""),
            "result": _preview(event.result, RESULT_PREVIEW_CHARS),
        }
        # The table shows each event's result, never its payload: no need to read and decode it.
        for event in selectors.run_events(trace_id=str(run.trace_id), instances=False).defer("payload")
    ]
    counts: dict[str, int] = {}
    for task in tasks.values():
        counts[task.status] = counts.get(task.status, 0) + 1
    return {
        "run": run,
        "rows": rows,
        "events": events,
        "run_url": run_url,
        "task_rows_html": task_rows_html(rows),
        "event_rows_html": event_rows_html(events, run_url=run_url),
        "dag_svg": graph_svg.dag_svg(
            nodes, edges, label=f"{run.workflow.name} run {run.trace_id}", conditions=graph.conditions
        ),
        "has_instances": bool(instances),
        "timeline_svg": graph_svg.timeline_svg(
            [
                graph_svg.TimelineRow(
                    key=r["key"],
                    status=r["task"].status,
                    queued_at=r["task"].queued_at,
                    started_at=r["task"].started_at,
                    finished_at=r["task"].finished_at,
                )
                for r in rows
            ],
            start=run.created_at,
            end=max(timeline_end, run.created_at + timedelta(milliseconds=1)),
        ),
        "task_counts": [(s, counts[s]) for s in graph_svg.TASK_STATUSES if counts.get(s)],
        "legend": graph_svg.legend(),
        "run_duration": format_duration(_between(run.created_at, run.finished_at or now)),
        "live_url": reverse("workflows_app:run-live", args=[run.trace_id]),
        "can_cancel": not run.is_final,
        "can_retry": run.status in (WorkflowRun.Status.FAILED, WorkflowRun.Status.CANCELED),
    }


class RunDetailView(PageMixin, TemplateView):
    template_name = "workflows_app/run_detail.html"
    nav = "runs"

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        context.update(run_live_context(trace_id=str(kwargs["trace_id"])))
        payload = json.dumps(context["run"].payload, indent=2, sort_keys=True, default=str)
        context["payload_json"] = _preview(payload, PAYLOAD_PREVIEW_CHARS)
        context["can_act"] = can_act_on_runs(self.request)
        return context


class RunLiveFragmentView(LoginUnlessPublicMixin, TemplateView):
    """The part of the run page that changes, polled by the page while the run is not final."""

    template_name = "workflows_app/_run_live.html"

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        context.update(run_live_context(trace_id=str(kwargs["trace_id"])))
        context["can_act"] = can_act_on_runs(self.request)
        return context

    def render_to_response(self, context: dict[str, Any], **kwargs: Any) -> HttpResponse:
        response = super().render_to_response(context, **kwargs)
        response["Cache-Control"] = "no-store"
        return response


def _page_number(text: str | None) -> int:
    """A 1-based page number from a query string; 1 for anything that is not one."""
    return int(text) if text and text.isdigit() and 0 < len(text) < 7 and int(text) > 0 else 1


def instances_context(
    *, trace_id: str, key: str, run_url: str, page: int, status: str, counts: dict[str, int]
) -> dict[str, Any]:
    """One page of a mapped node's instances (those in `status`, when it is one), with the links to the
    other pages and to each status, all plain links of the node's page."""
    status = status if status in TaskRun.Status.values and counts.get(status) else ""
    total = counts.get(status, 0) if status else instance_total(counts)
    pages = max((total + INSTANCES_PER_PAGE - 1) // INSTANCES_PER_PAGE, 1)
    page = min(page, pages)
    rows = selectors.node_instance_page(
        trace_id=trace_id,
        node=key,
        status=status or None,
        offset=(page - 1) * INSTANCES_PER_PAGE,
        limit=INSTANCES_PER_PAGE,
    )
    now = timezone.now()
    node_url = f"{run_url}nodes/{key}/"

    def link(number: int, wanted: str = status) -> str:
        return f"{node_url}?{urlencode({'instances': number, **({'status': wanted} if wanted else {})})}"

    instances = []
    for task in rows:
        running = bool(task.started_at) and task.status in (TaskRun.Status.STARTED, TaskRun.Status.RETRY)
        instances.append(
            {
                "task": task,
                "duration": format_duration(_between(task.started_at, task.finished_at or (now if running else None))),
                "running": running,
                "error": _first_line(task.error),
                "error_full": _pretty(task.error),
            }
        )
    return {
        "instances": instances,
        "instance_total": instance_total(counts),
        "instance_summary": instance_summary(counts, " \u00b7 "),
        "instance_status": status,
        "instance_statuses": [(s, label, counts[s], link(1, s)) for s, label in INSTANCE_LABELS if counts.get(s)],
        "instance_all_url": link(1, ""),
        "instance_page": page,
        "instance_pages": pages,
        "instance_first": (page - 1) * INSTANCES_PER_PAGE,
        "instance_prev_url": link(page - 1) if page > 1 else "",
        "instance_next_url": link(page + 1) if page < pages else "",
    }


def node_detail_context(
    *, trace_id: str, key: str, instances_page: int = 1, instances_status: str = ""
) -> dict[str, Any]:
    """One node of a run: its task row, settings from the run's version, neighbours, and every attempt;
    for a mapped node, its instances by status and one page of them instead of the attempts."""
    task = selectors.task_page_get(trace_id=trace_id, node=key)
    if task is None:
        raise Http404("No such node in this run.")
    run = task.run
    graph = graph_from_spec(run.version.spec, version=run.workflow_version)
    spec = graph.nodes.get(key)
    preds = sorted(graph.preds.get(key, ())) if spec else []
    succs = sorted(graph.succs.get(key, ())) if spec else []
    statuses = selectors.task_neighbour_statuses(trace_id=trace_id, nodes=preds + succs)
    run_url = reverse("workflows_app:run-detail", args=[run.trace_id])
    now = timezone.now()
    running = bool(task.started_at) and task.status in (TaskRun.Status.STARTED, TaskRun.Status.RETRY)
    counts = selectors.run_instance_counts(trace_id=trace_id, node=key).get(key, {})
    mapped = bool(counts) or bool(spec and spec.options.get("map_over"))
    attempts = []
    # A mapped node's row has no attempt of its own; its instances' are in their rows.
    for event in [] if mapped else selectors.node_events(trace_id=trace_id, node=key):
        result = event.result if isinstance(event.result, dict) else {"value": event.result}
        error = result.get("error", "") if event.status == "FAILURE" else ""
        attempts.append(
            {
                "event": event,
                "attempt": (event.context or {}).get("attempt", ""),
                "error": _first_line(str(error)),
                "error_full": _pretty(error),
                "result": "" if error else _preview(event.result, RESULT_PREVIEW_CHARS),
                "is_current": event.event_id == task.current_event_id,
            }
        )
    event = task.current_event
    if event is not None:
        payload = event.payload
    else:
        # Not sent yet: the payload it will get, as the engine builds it.
        payload = {**run.payload, **(spec.params if spec else {})}
    if task.line_position is not None:
        place = f"#{task.line_position} in line"
    elif task.status == TaskRun.Status.QUEUED:
        place = "sent to a worker"
    else:
        place = ""
    kind = spec.kind if spec else "task"
    reason = selectors.task_wait_reason(task)
    context = {
        "mapped": mapped,
        "map_over": spec.options.get("map_over", "") if spec else "",
        "not_run": task.status in NOT_RUN,
        "kind": kind,
        "waits_for": waiting_for(task, kind) if task.status == TaskRun.Status.DEFERRED else "",
        "waiting_approval": kind == "approval" and task.status == TaskRun.Status.DEFERRED,
        "decision": approval_decision(task) if kind == "approval" else None,
    }
    if mapped:
        context.update(
            instances_context(
                trace_id=trace_id,
                key=key,
                run_url=run_url,
                page=instances_page,
                status=instances_status,
                counts=counts,
            )
        )
    return context | {
        "run": run,
        "task": task,
        "key": key,
        "spec": spec,
        "run_url": run_url,
        "place": place,
        "wait_reason": reason,
        "running": running,
        "duration": format_duration(_between(task.started_at, task.finished_at or (now if running else None))),
        "waited": format_duration(
            _between(task.queued_at, task.started_at or task.finished_at or now) if task.queued_at else None
        ),
        "preds": [(k, statuses.get(k, ""), f"{run_url}nodes/{k}/") for k in preds],
        "succs": [(k, statuses.get(k, ""), f"{run_url}nodes/{k}/") for k in succs],
        "params_json": _pretty(spec.params) if spec and spec.params else "",
        "payload_json": _pretty(payload),
        "result_json": _pretty(task.result),
        "error_text": _pretty(task.error),
        "error_line": _first_line(task.error),
        "attempts": attempts,
        "event_json": _pretty(event.as_message()) if event is not None else "",
        "event": event,
    }


class RunNodeView(PageMixin, TemplateView):
    """A node's detail: a full page, or with ?fragment=1 the panel the run page opens in place."""

    nav = "runs"

    def get_template_names(self) -> list[str]:
        if self.request.GET.get("fragment"):
            return ["workflows_app/_node_detail.html"]
        return ["workflows_app/node_detail.html"]

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        params = self.request.GET
        context.update(
            node_detail_context(
                trace_id=str(kwargs["trace_id"]),
                key=kwargs["key"],
                instances_page=_page_number(params.get("instances")),
                instances_status=params.get("status", "").upper(),
            )
        )
        context["can_decide"] = context["waiting_approval"] and can_decide(self.request)
        return context

    def render_to_response(self, context: dict[str, Any], **kwargs: Any) -> HttpResponse:
        response = super().render_to_response(context, **kwargs)
        response["Cache-Control"] = "no-store"
        return response


class RunActionView(PermissionRequiredMixin, View):
    """POST only: change a run through the engine, then back to its page with the outcome as a message."""

    permission_required = "workflows_app.change_workflowrun"
    # A signed-in user without the permission, or an anonymous one, gets 403 rather than a login loop.
    raise_exception = True
    http_method_names = ["post"]

    def act(self, request: HttpRequest, run: WorkflowRun) -> None:
        raise NotImplementedError

    def post(self, request: HttpRequest, trace_id: uuid.UUID) -> HttpResponse:
        run = WorkflowRun.objects.filter(trace_id=trace_id).only("trace_id", "status").first()
        if run is None:
            raise Http404("No run with this trace id.")
        try:
            self.act(request, run)
        except EngineError as exc:
            messages.error(request, str(exc))
        return HttpResponseRedirect(reverse("workflows_app:run-detail", args=[trace_id]))


class RunCancelView(RunActionView):
    def act(self, request: HttpRequest, run: WorkflowRun) -> None:
        if run.is_final:
            messages.warning(request, f"Run is already {run.status}: nothing to cancel.")
            return
        run = engine.workflow_run_cancel(trace_id=str(run.trace_id))
        if run.status == WorkflowRun.Status.CANCELED:
            messages.success(request, "Run canceled: its unfinished tasks are revoked.")
        else:
            # It reached a final state on its own between the page and the click.
            messages.warning(request, f"Run finished as {run.status} before it could be canceled.")


class RunRetryView(RunActionView):
    def act(self, request: HttpRequest, run: WorkflowRun) -> None:
        engine.workflow_run_retry(trace_id=str(run.trace_id))
        messages.success(request, "Run restarted: failed, upstream-failed and revoked tasks run again; successes stay.")


# --------------------------------------------------------------------------- approvals


def can_decide(request: HttpRequest) -> bool:
    return request.user.has_perm(APPROVE_PERMISSION)


def _safe_next_get(request: HttpRequest, default: str) -> str:
    """As `_safe_next`, from a GET form's `next`."""
    target = request.GET.get("next", "")
    allowed = url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    )
    return target if target and allowed else default


def _safe_next(request: HttpRequest, default: str) -> str:
    """The page to go back to: the form's `next` when it is a page of this site, else `default`."""
    target = request.POST.get("next", "")
    allowed = url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    )
    return target if target and allowed else default


class NodeDecideView(PermissionRequiredMixin, View):
    """POST only: approve (or, in NodeRejectView, reject) a run's waiting approval through the engine,
    with the form's optional `comment`, then back to `next` (the run page by default) with the outcome as
    a message."""

    permission_required = APPROVE_PERMISSION
    permission_denied_message = (
        "approving or rejecting needs the permission \u201cCan approve or reject a run\u2019s waiting approval\u201d, "
        "given in the admin."
    )
    # A signed-in user without the permission, or an anonymous one, gets 403 rather than a login loop.
    raise_exception = True
    http_method_names = ["post"]
    approve = True

    def post(self, request: HttpRequest, trace_id: uuid.UUID, key: str) -> HttpResponse:
        back = _safe_next(request, reverse("workflows_app:run-detail", args=[trace_id]))
        comment = request.POST.get("comment", "").strip()
        if len(comment) > COMMENT_MAX_CHARS:
            messages.error(request, f"Nothing decided: a comment holds at most {COMMENT_MAX_CHARS:,} characters.")
            return HttpResponseRedirect(back)
        try:
            engine.task_run_decide(
                trace_id=str(trace_id), node=key, approve=self.approve, user=request.user, comment=comment
            )
        except EngineError as exc:
            if exc.status == 404:
                raise Http404(str(exc)) from None
            # Decided by someone else (or timed out) since the page was drawn: a message, not an error page.
            messages.warning(request, f"Nothing decided: {exc}.")
            return HttpResponseRedirect(back)
        verb = "Approved" if self.approve else "Rejected"
        messages.success(request, f"{verb} {key} of run {trace_id}" + (f": \u201c{comment}\u201d" if comment else "."))
        return HttpResponseRedirect(back)


class NodeRejectView(NodeDecideView):
    approve = False


class ApprovalListView(PageMixin, TemplateView):
    """Every waiting approval, newest first, with Approve and Reject for those allowed to decide."""

    template_name = "workflows_app/approval_list.html"
    nav = "approvals"

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        now = timezone.now()
        approvals = selectors.approval_page_list()
        for task in approvals:
            task.waited = format_duration(_between(task.queued_at, now))
            task.run_url = reverse("workflows_app:run-detail", args=[task.run.trace_id])
        context.update(
            approvals=approvals,
            now=now,
            can_decide=can_decide(self.request),
            here=reverse("workflows_app:approval-list"),
        )
        return context


# --------------------------------------------------------------------------- workflows


class WorkflowListView(PageMixin, TemplateView):
    template_name = "workflows_app/workflow_list.html"
    nav = "workflows"

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        context["workflows"] = list(selectors.workflow_page_list())
        return context


class WorkflowDetailView(PageMixin, TemplateView):
    template_name = "workflows_app/workflow_detail.html"
    nav = "workflows"

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        workflow = selectors.workflow_page_get(name=kwargs["name"])
        if workflow is None:
            raise Http404("No workflow with this name.")
        nodes = list(workflow.nodes.all())
        key_of = {node.id: node.key for node in nodes}
        conditions = {(key_of[e.source_id], key_of[e.target_id]): e.when for e in workflow.edges.all() if e.when}
        edges = [(key_of[e.source_id], key_of[e.target_id]) for e in workflow.edges.all()]
        after: dict[str, list[tuple[str, str]]] = {}
        for source, target in edges:
            after.setdefault(target, []).append((source, conditions.get((source, target), "")))
        for node in nodes:
            node.params_json = json.dumps(node.params, sort_keys=True) if node.params else ""
            node.after = after.get(node.key, [])
            node.map_over = (node.options or {}).get("map_over", "")
        runs = selectors.workflow_recent_runs(workflow=workflow, limit=RECENT_RUNS)
        now = timezone.now()
        for run in runs:
            run.elapsed = format_duration(_between(run.created_at, run.finished_at or now))
        trends = selectors.workflow_node_trends(workflow=workflow, runs=TREND_RUNS)
        context.update(
            trend_runs=TREND_RUNS,
            trends=[(node.key, trend_cells(trends.get(node.key))) for node in nodes],
            workflow=workflow,
            nodes=nodes,
            edges=edges,
            versions=list(workflow.versions.all()),
            runs=runs,
            node_rows_html=node_rows_html(nodes, queues_url=reverse("workflows_app:queue-list")),
            dag_svg=graph_svg.workflow_svg(
                nodes,
                edges,
                label=f"{workflow.name} definition",
                href=lambda key: f"#node-{key}",
                conditions=conditions,
            ),
        )
        return context


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else ""


def trend_cells(trend: selectors.NodeTrend | None) -> dict[str, str]:
    """A node's trend as the workflow page shows it; empty cells for a node that has not run."""
    if trend is None:
        return {"runs": "0", "duration_p50": "", "duration_p95": "", "wait_p50": "", "wait_p95": "", "failed": ""}
    return {
        "runs": str(trend.runs),
        "duration_p50": format_duration(trend.duration_p50),
        "duration_p95": format_duration(trend.duration_p95),
        "wait_p50": format_duration(trend.wait_p50),
        "wait_p95": format_duration(trend.wait_p95),
        "failed": f"{_share(trend.failed, trend.ended)} ({trend.failed} of {trend.ended})" if trend.ended else "",
        "failed_share": "" if trend.failed_share is None else f"{trend.failed_share:.4f}",
    }


# --------------------------------------------------------------------------- workers


def lease_bound() -> timedelta:
    """How long a worker may go unheard before it counts as silent: a live one beats every few seconds, and
    past this bound the reconciler has taken back the attempts it held (their leases lapsed)."""
    config = settings.EVENTFLOW
    return timedelta(seconds=config["LEASE_SECONDS"] + config["RECONCILE_SECONDS"])


def attempt_fate(fate: selectors.AttemptFate, *, worker: str) -> tuple[str, str]:
    """(code, words) for what became of an attempt a silent `worker` was running."""
    S = TaskRun.Status
    if not fate.current:
        # Its task has a newer attempt: the engine sent it again after this one was lost.
        where = f" on {fate.worker}" if fate.worker and fate.worker != worker else ""
        return "retried", f"retried elsewhere: attempt {fate.attempts} is {fate.status}{where}"
    if fate.status == S.STARTED:
        lapses = fate.lease_expires_at.strftime("%H:%M:%S") if fate.lease_expires_at else "soon"
        return "pending", f"still marked running; its lease lapses at {lapses}, then it is retried or failed"
    if fate.status == S.FAILURE:
        return "failed", f"failed: {_first_line(fate.error)}"
    if fate.status == S.SUCCESS:
        return "succeeded", "finished before the worker went silent"
    if fate.status == S.REVOKED:
        return "revoked", "canceled with its run"
    if fate.status in (S.RETRY, S.QUEUED):
        return "retried", f"to be retried: attempt {fate.attempts + 1} waits"
    return fate.status.lower(), fate.status


class WorkerListView(PageMixin, TemplateView):
    """Every worker heard from lately (from the database, so it survives restarts of the web app): its host,
    queues, pool size, the attempts it runs, when it was last heard from; a silent one is marked, and what
    became of the attempts it held is shown."""

    template_name = "workflows_app/worker_list.html"
    nav = "workers"

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        bound = lease_bound()
        workers = selectors.worker_page_list(seen_within=WORKERS_SHOWN_FOR)
        running = selectors.worker_running(names=[w.name for w in workers])
        by_worker: dict[str, list[TaskRun]] = {}
        for task in running:
            by_worker.setdefault(task.worker, []).append(task)
        silent = [w for w in workers if w.silent_for > bound]
        # A silent worker's attempts: those its last heartbeat named, and any row still naming it as running.
        held = {w.name: [*w.attempts, *(str(t.current_event_id) for t in by_worker.get(w.name, []))] for w in silent}
        fates = {f.event_id: f for f in selectors.attempt_fates(event_ids=[e for ids in held.values() for e in ids])}
        now = timezone.now()
        for worker in workers:
            worker.silent = worker.silent_for > bound
            worker.quiet = format_duration(worker.silent_for.total_seconds())
            worker.up_for = format_duration(_between(worker.started_at, now))
            worker.running = [] if worker.silent else by_worker.get(worker.name, [])
            for task in worker.running:
                task.run_url = reverse("workflows_app:run-detail", args=[task.run_id])
                task.elapsed = format_duration(_between(task.started_at, now))
            worker.fates = []
            for event_id in dict.fromkeys(held.get(worker.name, [])):
                fate = fates.get(event_id)
                if fate is None:
                    continue  # not a task attempt (an engine task), or purged since
                code, words = attempt_fate(fate, worker=worker.name)
                run_url = reverse("workflows_app:run-detail", args=[fate.trace_id])
                worker.fates.append({"fate": fate, "code": code, "words": words, "run_url": run_url})
        context.update(
            workers=workers,
            live=sum(1 for w in workers if not w.silent),
            bound=format_duration(bound.total_seconds()),
            shown_for=format_duration(WORKERS_SHOWN_FOR.total_seconds()),
            now=now,
        )
        return context


# --------------------------------------------------------------------------- queues


class QueueListView(PageMixin, TemplateView):
    template_name = "workflows_app/queue_list.html"
    nav = "queues"

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        now = timezone.now()
        queues = list(selectors.event_type_queue_page_list(since=now - THROUGHPUT_WINDOW))
        for queue in queues:
            queue.running = queue.running or 0
            queue.queued = queue.queued or 0
            queue.done_since = queue.done_since or 0
            queue.failed_since = queue.failed_since or 0
            queue.oldest_wait = format_duration(_between(queue.oldest_queued_at, now))
            queue.full = queue.running >= queue.concurrency
            queue.usage = min(100, round(100 * queue.running / queue.concurrency)) if queue.concurrency else 0
        # The next tasks out of each line, and why each waits: two queries for all the types.
        admission = selectors.event_types_admission(queues)
        for queue in queues:
            queue.admission = admission[queue.name]
        context.update(queues=queues, now=now)
        return context
