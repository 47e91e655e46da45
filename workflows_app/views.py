"""Server-rendered status pages (placeholder until the pages land)."""

from django.http import HttpResponse
from django.shortcuts import redirect
from django.views import View


def home(request):
    return redirect("workflows_app:run-list")


class _Stub(View):
    def get(self, request, **kwargs):
        return HttpResponse("ok")


RunListView = RunDetailView = RunLiveFragmentView = WorkflowDetailView = QueueListView = _Stub
