"""Root URLs: admin, the REST API under /api/, and the status pages."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include("workflows_app.api.urls")),
    path("", include("workflows_app.urls")),
]

handler404 = "workflows_app.api.errors.handler404"
handler500 = "workflows_app.api.errors.handler500"
