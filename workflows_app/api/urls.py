"""API routes (every path of the REST API in one place)."""

from django.urls import path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from . import errors, views

urlpatterns = [
    path("", views.api_root, name="api-root"),
    path("workflows/", views.WorkflowListCreateApi.as_view(), name="api-workflow-list"),
    path("workflows/<slug:name>/", views.WorkflowDetailApi.as_view(), name="api-workflow-detail"),
    path("workflows/<slug:name>/runs/", views.RunTriggerApi.as_view(), name="api-run-trigger"),
    path("runs/", views.RunListApi.as_view(), name="api-run-list"),
    path("runs/cancel/", views.RunsCancelBulkApi.as_view(), name="api-runs-cancel"),
    path("runs/retry/", views.RunsRetryBulkApi.as_view(), name="api-runs-retry"),
    path("runs/<uuid:trace_id>/", views.RunDetailApi.as_view(), name="api-run-detail"),
    path("runs/<uuid:trace_id>/events/", views.RunEventsApi.as_view(), name="api-run-events"),
    path("runs/<uuid:trace_id>/cancel/", views.RunCancelApi.as_view(), name="api-run-cancel"),
    path("runs/<uuid:trace_id>/retry/", views.RunRetryApi.as_view(), name="api-run-retry"),
    path("runs/<uuid:trace_id>/nodes/<str:key>/approve/", views.NodeDecideApi.as_view(), name="api-node-approve"),
    path("runs/<uuid:trace_id>/nodes/<str:key>/reject/", views.NodeRejectApi.as_view(), name="api-node-reject"),
    path("events/", views.EventPublishApi.as_view(), name="api-event-publish"),
    path("event-types/", views.EventTypeListApi.as_view(), name="api-event-type-list"),
    path("event-types/<str:name>/", views.EventTypeDetailApi.as_view(), name="api-event-type-detail"),
    path("task-results/<uuid:task_id>/", views.TaskResultApi.as_view(), name="api-task-result"),
    path("schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("redoc/", SpectacularRedocView.as_view(url_name="api-schema"), name="api-redoc"),
    # Last: every other path under /api/ answers a JSON 404 (errors.not_found).
    re_path(r"^.*$", errors.not_found, name=errors.NOT_FOUND_ROUTE),
]
