"""Status pages: runs, a run, a workflow, the queues."""

from django.urls import path

from . import views

app_name = "workflows_app"

urlpatterns = [
    path("", views.home, name="home"),
    path("runs/", views.RunListView.as_view(), name="run-list"),
    path("runs/<uuid:trace_id>/", views.RunDetailView.as_view(), name="run-detail"),
    path(
        "runs/<uuid:trace_id>/live/",
        views.RunLiveFragmentView.as_view(),
        name="run-live",
    ),
    path(
        "workflows/<slug:name>/",
        views.WorkflowDetailView.as_view(),
        name="workflow-detail",
    ),
    path("queues/", views.QueueListView.as_view(), name="queue-list"),
]
