"""Root URLs: admin, the REST API under /api/, Prometheus metrics at /metrics, and the status pages."""

from django.contrib import admin
from django.urls import include, path

from workflows_app.metrics import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include("workflows_app.api.urls")),
    path("metrics", metrics_view, name="metrics"),
    path("", include("workflows_app.urls")),
]

handler404 = "workflows_app.api.errors.handler404"
handler500 = "workflows_app.api.errors.handler500"
