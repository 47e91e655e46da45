"""OpenAPI building blocks: the error shape, paginated envelopes, the definition shape and documented statuses."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema_field
from rest_framework import serializers

from workflows_app.definitions import EVENT_TYPE_RE, KEY_RE, NAME_RE
from workflows_app.models import TriggerRule


class ErrorSerializer(serializers.Serializer):
    """Every API error: a message, and for validation errors the problems per field."""

    detail = serializers.CharField(help_text="What went wrong, in one sentence.")
    errors = serializers.JSONField(required=False, help_text="Validation errors per field, or a list of problems.")

    class Meta:
        ref_name = "Error"


_MEANING = {
    400: "Malformed JSON, unknown fields or invalid values; `detail` names the problem.",
    401: "No credentials, or a bad token.",
    403: "Authenticated, but without the permission this operation needs.",
    404: "No such object (or page).",
    409: "Conflicts with the object's state, e.g. an inactive workflow.",
    413: "The body or the payload is larger than allowed.",
    415: "The body is not JSON.",
    429: "Too many requests: the per-user rate on triggers and events.",
}


def errors(*statuses: int) -> dict[int, OpenApiResponse]:
    """The documented error answers of an operation, all in the one error shape."""
    return {code: OpenApiResponse(ErrorSerializer, description=_MEANING[code]) for code in statuses}


# Every authenticated operation; reads add 404, writes 400/403/413/415.
READ = (401, 404)
WRITE = (400, 401, 403, 413, 415)

PAGE = OpenApiParameter("page", int, OpenApiParameter.QUERY, required=False, description="1-based page number.")
IDEMPOTENCY_KEY = OpenApiParameter(
    "Idempotency-Key",
    str,
    OpenApiParameter.HEADER,
    required=False,
    description="Up to 200 characters. The same key again returns the first answer (200) and starts nothing.",
)


def paginated(name: str, item: serializers.Serializer) -> serializers.Serializer:
    """DRF's page envelope around `item`s: count, next, previous, results."""
    return type(
        name,
        (serializers.Serializer,),
        {
            "count": serializers.IntegerField(),
            "next": serializers.URLField(allow_null=True),
            "previous": serializers.URLField(allow_null=True),
            "results": item,
            "Meta": type("Meta", (), {"ref_name": name}),
        },
    )()


class EventTypeSettingsSerializer(serializers.Serializer):
    concurrency = serializers.IntegerField(min_value=1, required=False)
    description = serializers.CharField(required=False, allow_blank=True)

    class Meta:
        ref_name = "DefinitionEventType"


class NodeSpecSerializer(serializers.Serializer):
    key = serializers.RegexField(KEY_RE.pattern, help_text="Unique within the workflow.")
    kind = serializers.CharField(
        required=False, help_text="What the node does; 'task' (the default) runs a Celery task."
    )
    task = serializers.CharField(
        required=False, allow_blank=True, help_text="A registered Celery task name (for a 'task' node)."
    )
    event_type = serializers.RegexField(
        EVENT_TYPE_RE.pattern, required=False, allow_null=True, help_text="Its queue; created if new."
    )
    params = serializers.DictField(required=False, help_text="Merged over the run payload.")
    max_retries = serializers.IntegerField(min_value=0, required=False)
    retry_delay = serializers.FloatField(min_value=0, required=False, help_text="Seconds before the first retry.")
    timeout = serializers.IntegerField(min_value=1, required=False, allow_null=True, help_text="Seconds.")
    trigger_rule = serializers.ChoiceField(TriggerRule.choices, required=False)
    map_over = serializers.CharField(
        required=False,
        help_text="For a 'task' node: a CEL expression giving a list; one instance of the task runs per element.",
    )

    class Meta:
        ref_name = "DefinitionNode"


EDGE_SCHEMA = {
    "oneOf": [
        {
            "type": "array",
            "items": {"type": "string"},
            "minItems": 2,
            "maxItems": 2,
            "description": "[source key, target key]: a plain edge.",
        },
        {
            "type": "object",
            "properties": {
                "from": {"type": "string", "description": "The source node's key."},
                "to": {"type": "string", "description": "The target node's key."},
                "when": {
                    "type": "string",
                    "description": "A CEL condition on the source's `result`; the edge is taken only when true.",
                },
            },
            "required": ["from", "to"],
            "additionalProperties": False,
        },
    ]
}


@extend_schema_field(EDGE_SCHEMA)
class EdgeSpecField(serializers.Field):
    """An edge in either form of the definition format (documentation only: definitions.py reads it)."""

    def to_internal_value(self, data: Any) -> Any:
        return data

    def to_representation(self, value: Any) -> Any:
        return value


class DefinitionSerializer(serializers.Serializer):
    """A workflow definition in the import/export shape (documentation only: definitions.py validates)."""

    name = serializers.RegexField(NAME_RE.pattern, help_text="Unique slug.")
    description = serializers.CharField(required=False, allow_blank=True)
    is_active = serializers.BooleanField(required=False, help_text="Inactive workflows cannot be triggered.")
    trigger_event_types = serializers.ListField(
        child=serializers.RegexField(EVENT_TYPE_RE.pattern),
        required=False,
        help_text="Published events of these types start a run.",
    )
    event_types = serializers.DictField(
        child=EventTypeSettingsSerializer(), required=False, help_text="Event types by name."
    )
    nodes = serializers.ListField(child=NodeSpecSerializer(), min_length=1)
    edges = serializers.ListField(
        child=EdgeSpecField(),
        required=False,
        help_text="[source key, target key] pairs, or {from, to, when} objects for edges with a condition.",
    )
    version = serializers.IntegerField(read_only=True, help_text="Bumped on every change.")

    class Meta:
        ref_name = "WorkflowDefinition"


class DefinitionChangeSerializer(DefinitionSerializer):
    """The fields of a definition that a PATCH may replace; the name stays."""

    name = None

    class Meta:
        ref_name = "WorkflowDefinitionChange"


PUBLISH_EXAMPLE = OpenApiExample(
    "product created",
    value={"event_type": "product.created", "payload": {"product": "mug"}},
    request_only=True,
)


def forbid_unknown_request_fields(result: dict, generator: object, request: object, public: bool) -> dict:
    """drf-spectacular hook: every request body refuses unknown fields with a 400, so its shape says so."""
    for name, component in result.get("components", {}).get("schemas", {}).items():
        if name.endswith("Request") and component.get("type") == "object":
            component["additionalProperties"] = False
    return result
