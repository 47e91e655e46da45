"""One JSON error shape for every API failure: {"detail": message, ...}, with the right status code."""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import Http404, HttpRequest, HttpResponse, HttpResponsePermanentRedirect, JsonResponse
from django.urls import Resolver404, resolve
from django.views import defaults
from django.views.decorators.csrf import csrf_exempt
from rest_framework import status
from rest_framework.exceptions import APIException, ValidationError
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from workflows_app.definitions import DefinitionError
from workflows_app.engine import EngineError


class PayloadTooLarge(APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "request body too large"
    default_code = "payload_too_large"


def _first_message(errors: Any) -> str:
    if isinstance(errors, dict):
        for field, value in errors.items():
            return f"{field}: {_first_message(value)}"
    if isinstance(errors, list) and errors:
        return _first_message(errors[0])
    return str(errors)


def exception_handler(exc: Exception, context: dict) -> Response | None:
    """DRF's handler, plus the engine's and the definition format's errors, always with a `detail`."""
    if isinstance(exc, RequestDataTooBig):
        return Response({"detail": str(exc)}, status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
    if isinstance(exc, DefinitionError):
        return Response({"detail": str(exc), "errors": exc.errors}, status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, EngineError):
        return Response({"detail": str(exc)}, status=exc.status)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, ValidationError):
        response.data = {"detail": _first_message(exc.detail), "errors": exc.detail}
    elif not (isinstance(response.data, dict) and "detail" in response.data):
        response.data = {"detail": _first_message(response.data)}
    return response


def _is_api(request: HttpRequest) -> bool:
    return request.path.startswith("/api/")


NOT_FOUND_ROUTE = "api-not-found"


@csrf_exempt  # it changes nothing, as DRF's views are exempt; a CSRF refusal would be an HTML page
def not_found(request: HttpRequest) -> HttpResponse:
    """The last route under /api/: a JSON 404 for any path no other route takes (an unknown path, a
    trace id that is not a UUID), whatever DEBUG says, since Django skips handler404 when it is on.

    Taking every path also keeps CommonMiddleware from redirecting to the path with a slash, so for
    an API route's path without its trailing slash this does it, in JSON: a GET or HEAD is
    redirected, and any other method, which a redirect would turn into a GET, told the path.
    """
    if settings.APPEND_SLASH and not request.path_info.endswith("/"):
        try:
            route = resolve(request.path_info + "/", getattr(request, "urlconf", None)).url_name
        except Resolver404:
            route = NOT_FOUND_ROUTE
        if route != NOT_FOUND_ROUTE:
            target = request.get_full_path(force_append_slash=True)
            if request.method in ("GET", "HEAD"):
                return HttpResponsePermanentRedirect(
                    target, content=json.dumps({"detail": f"Moved to {target}."}), content_type="application/json"
                )
            return JsonResponse({"detail": f"Not found. The path ends with a slash: {request.path}/"}, status=404)
    return JsonResponse({"detail": "Not found."}, status=404)


def handler404(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if _is_api(request):
        return JsonResponse({"detail": "Not found."}, status=404)
    return defaults.page_not_found(request, exception or Http404())


def handler500(request: HttpRequest) -> HttpResponse:
    if _is_api(request):
        return JsonResponse({"detail": "Internal server error."}, status=500)
    return defaults.server_error(request)
