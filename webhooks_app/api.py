"""/api/webhooks/: webhooks made, listed, changed and deleted through the API, checked by
`services.webhook_check` as the admin checks them."""

from __future__ import annotations

from typing import Any

from django.http import Http404
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import ValidationError
from rest_framework.permissions import BasePermission, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from workflows_app.api.schema import PAGE, READ, WRITE, errors, paginated
from workflows_app.api.views import PagePagination, _reject_unknown, require

from .models import Notification, Webhook
from .services import webhook_check

FIELDS = {"url", "notifications", "secret", "description", "is_active"}


class WebhookOutputSerializer(serializers.ModelSerializer):
    notifications = serializers.ListField(child=serializers.ChoiceField(choices=Notification.values))

    class Meta:
        model = Webhook
        fields = ["id", "url", "notifications", "description", "is_active", "created_at"]


class WebhookCreatedSerializer(WebhookOutputSerializer):
    secret = serializers.CharField(help_text="Shown here once: keep it to verify the signatures.")

    class Meta(WebhookOutputSerializer.Meta):
        fields = [*WebhookOutputSerializer.Meta.fields, "secret"]


class WebhookInputSerializer(serializers.Serializer):
    url = serializers.URLField(max_length=2000, help_text="http or https; not a private address unless allowed.")
    notifications = serializers.ListField(
        child=serializers.ChoiceField(choices=Notification.values), min_length=1, help_text="What it receives."
    )
    secret = serializers.CharField(
        required=False, help_text="whsec_ and base64; generated (and answered once) when omitted."
    )
    description = serializers.CharField(required=False, allow_blank=True)
    is_active = serializers.BooleanField(required=False)

    class Meta:
        ref_name = "WebhookInput"


def _checked(data: Any, *, partial: bool) -> dict[str, Any]:
    clean, wrong = webhook_check(_reject_unknown(data, FIELDS), partial=partial)
    if wrong:
        raise ValidationError({field: [error] for field, error in wrong.items()})
    return clean


class WebhookListApi(APIView):
    def get_permissions(self) -> list[BasePermission]:
        if self.request.method == "POST":
            return [require("webhooks_app.add_webhook")()]
        return [require("webhooks_app.view_webhook")()]

    @extend_schema(
        summary="List webhooks",
        operation_id="webhooks_list",
        parameters=[PAGE],
        responses={200: paginated("PaginatedWebhookList", WebhookOutputSerializer(many=True)), **errors(*READ, 403)},
    )
    def get(self, request: Request) -> Response:
        paginator = PagePagination()
        page = paginator.paginate_queryset(Webhook.objects.order_by("id"), request, view=self)
        return paginator.get_paginated_response(WebhookOutputSerializer(page, many=True).data)

    @extend_schema(
        summary="Create a webhook",
        description=(
            "Its notifications are signed per the Standard Webhooks specification with its secret, answered "
            "here once. A URL that is not http(s), a private address (unless EVENTFLOW_WEBHOOK_ALLOW_PRIVATE), "
            "or an unknown notification is a 400 naming it, and nothing is saved."
        ),
        request=WebhookInputSerializer,
        responses={201: WebhookCreatedSerializer, **errors(*WRITE)},
    )
    def post(self, request: Request) -> Response:
        webhook = Webhook.objects.create(**_checked(request.data, partial=False))
        return Response(WebhookCreatedSerializer(webhook).data, status=status.HTTP_201_CREATED)


class WebhookDetailApi(APIView):
    def get_permissions(self) -> list[BasePermission]:
        perm = {"PATCH": "change", "DELETE": "delete"}.get(self.request.method, "view")
        return [require(f"webhooks_app.{perm}_webhook")()] if perm != "view" else [IsAuthenticated()]

    def _get(self, pk: int) -> Webhook:
        webhook = Webhook.objects.filter(pk=pk).first()
        if webhook is None:
            raise Http404(f"webhook {pk} not found")
        return webhook

    @extend_schema(summary="Get a webhook", responses={200: WebhookOutputSerializer, **errors(*READ)})
    def get(self, request: Request, pk: int) -> Response:
        return Response(WebhookOutputSerializer(self._get(pk)).data)

    @extend_schema(
        summary="Change a webhook",
        request=WebhookInputSerializer(partial=True),
        responses={200: WebhookOutputSerializer, **errors(*WRITE, 404)},
    )
    def patch(self, request: Request, pk: int) -> Response:
        webhook = self._get(pk)
        clean = _checked(request.data, partial=True)
        Webhook.objects.filter(pk=webhook.pk).update(**clean)
        return Response(WebhookOutputSerializer(self._get(pk)).data)

    @extend_schema(summary="Delete a webhook", responses={204: None, **errors(401, 403, 404)})
    def delete(self, request: Request, pk: int) -> Response:
        self._get(pk).delete()
        return Response(status=status.HTTP_204_NO_CONTENT)
