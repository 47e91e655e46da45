"""Root URLs: admin, the REST API under /api/ (webhooks' routes from their app), Prometheus metrics
at /metrics, and the status pages."""

from django.contrib import admin
from django.urls import include, path

from webhooks_app import api as webhooks_api
from workflows_app.metrics import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    # Before the rest of the API, whose last route answers every other path under /api/ with a 404.
    path("api/webhooks/", webhooks_api.WebhookListApi.as_view(), name="api-webhook-list"),
    path("api/webhooks/<int:pk>/", webhooks_api.WebhookDetailApi.as_view(), name="api-webhook-detail"),
    path("api/", include("workflows_app.api.urls")),
    path("metrics", metrics_view, name="metrics"),
    path("", include("workflows_app.urls")),
]

handler404 = "workflows_app.api.errors.handler404"
handler500 = "workflows_app.api.errors.handler500"
