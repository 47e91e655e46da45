"""API error shapes."""

from rest_framework.views import exception_handler  # noqa: F401


def handler404(request, exception=None):
    from django.views.defaults import page_not_found

    return page_not_found(request, exception)


def handler500(request):
    from django.views.defaults import server_error

    return server_error(request)
