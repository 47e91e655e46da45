"""Status pages: runs (with bulk cancel and retry), a run and its nodes (with cancel, retry, approve and reject),
approvals, workflows, queues, workers."""

from django.urls import path

from . import views

app_name = "workflows_app"

urlpatterns = [
    path("", views.home, name="home"),
    path("runs/", views.RunListView.as_view(), name="run-list"),
    path("runs/bulk/", views.RunBulkView.as_view(), name="run-bulk"),
    path("runs/<uuid:trace_id>/", views.RunDetailView.as_view(), name="run-detail"),
    path(
        "runs/<uuid:trace_id>/live/",
        views.RunLiveFragmentView.as_view(),
        name="run-live",
    ),
    path("runs/<uuid:trace_id>/nodes/<slug:key>/", views.RunNodeView.as_view(), name="run-node"),
    path(
        "runs/<uuid:trace_id>/nodes/<slug:key>/approve/",
        views.NodeDecideView.as_view(),
        name="run-node-approve",
    ),
    path(
        "runs/<uuid:trace_id>/nodes/<slug:key>/reject/",
        views.NodeRejectView.as_view(),
        name="run-node-reject",
    ),
    path("runs/<uuid:trace_id>/cancel/", views.RunCancelView.as_view(), name="run-cancel"),
    path("runs/<uuid:trace_id>/retry/", views.RunRetryView.as_view(), name="run-retry"),
    path("approvals/", views.ApprovalListView.as_view(), name="approval-list"),
    path("workflows/", views.WorkflowListView.as_view(), name="workflow-list"),
    path(
        "workflows/<slug:name>/",
        views.WorkflowDetailView.as_view(),
        name="workflow-detail",
    ),
    path("queues/", views.QueueListView.as_view(), name="queue-list"),
    path("workers/", views.WorkerListView.as_view(), name="worker-list"),
]
