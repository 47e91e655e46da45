"""JSON parsing that turns hostile bodies (oversized, too deep, malformed, unstorable) into 400/413, never a 500."""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from .errors import PayloadTooLarge


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """True when containers nest deeper than `limit`; iterative, so hostile input cannot overflow the stack."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def json_unstorable(value: Any) -> str | None:
    """Why a key or string of this JSON cannot be stored (PostgreSQL holds neither NUL nor a lone
    surrogate, in text or jsonb), or None when all can."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return "JSON strings cannot contain the NUL character (\\u0000)"
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "JSON strings must be valid Unicode: a lone surrogate (e.g. \\ud800) is not"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


class SafeJSONParser(JSONParser):
    """DRF's JSON parser with a size limit read before parsing and a nesting limit after.

    DRF's parser raises RecursionError on deep nesting, which it does not turn into a 400.
    """

    def parse(self, stream: Any, media_type: str | None = None, parser_context: dict | None = None) -> Any:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        request = (parser_context or {}).get("request")
        declared = request.META.get("CONTENT_LENGTH") if request is not None else None
        if declared and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        raw = stream.read(limit + 1) if stream is not None else b""
        if len(raw) > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        try:
            data = json.loads(raw.decode("utf-8")) if raw else {}
        except (ValueError, UnicodeDecodeError) as exc:
            raise ParseError(f"malformed JSON: {exc}") from None
        except RecursionError:
            raise ParseError("JSON nested too deeply") from None
        if json_depth_exceeds(data, settings.EVENTFLOW["MAX_JSON_DEPTH"]):
            raise ParseError(f"JSON nested deeper than {settings.EVENTFLOW['MAX_JSON_DEPTH']} levels")
        problem = json_unstorable(data)
        if problem:
            raise ParseError(problem)
        return data
