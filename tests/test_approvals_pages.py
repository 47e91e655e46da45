"""The pages of nodes that wait: /approvals/, Approve and Reject as page forms, and a waiting node on the run page."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission
from django.db.models import F
from django.test import Client, override_settings
from django.urls import reverse

from tests import factories
from tests.test_pages import _queries, section, start, svg_node, svg_nodes, table_nodes
from workflows_app import engine, graph_svg
from workflows_app.models import TaskRun, WorkflowRun

pytestmark = pytest.mark.django_db

ECHO = "workflows_app.tasks.echo"
REVIEW = {"key": "review", "kind": "approval", "event_type": None, "timeout": 3600}


@pytest.fixture
def approver(client, django_user_model):
    """A client signed in as a user who may approve and reject, and nothing more."""
    user = django_user_model.objects.create_user(username="reviewer", password="pw-reviewer-123")
    user.user_permissions.add(Permission.objects.get(codename="approve_workflowrun"))
    client.force_login(user)
    return client


@pytest.fixture
def browser(client, user):
    client.force_login(user)
    return client


def review_workflow(name: str = "review"):
    """review (an approval, reached at the start) -> publish."""
    return factories.workflow(factories.spec(name, [REVIEW, ("publish", ECHO)], [["review", "publish"]]))


def waiting_workflow(name: str = "waits"):
    """Three roots that wait, one of each kind, each before an echo: moderated (an event of
    marketplace.moderated keyed by the payload's sku), cool_down (a delay) and review (an approval)."""
    return factories.workflow(
        factories.spec(
            name,
            [
                {
                    "key": "moderated",
                    "kind": "wait_event",
                    "event_type": "marketplace.moderated",
                    "event_key": "payload.sku",
                    "timeout": 600,
                },
                {"key": "cool_down", "kind": "delay", "event_type": None, "seconds": 600},
                REVIEW,
                ("after", ECHO),
            ],
            [["moderated", "after"], ["cool_down", "after"], ["review", "after"]],
        )
    )


def status(run: WorkflowRun, key: str) -> str:
    return TaskRun.objects.get(run=run, node_key=key, map_index=None).status


def approval_rows(html: str) -> list[tuple[str, str]]:
    return re.findall(r'<tr data-trace-id="([^"]+)" data-node="([^"]+)" data-status="DEFERRED">', html)


def decide_url(run: WorkflowRun, verb: str, key: str = "review") -> str:
    return reverse(f"workflows_app:run-node-{verb}", args=[run.trace_id, key])


# --------------------------------------------------------------------------- the list


def test_the_list_shows_waiting_approvals_only_newest_first(browser):
    waits = waiting_workflow()
    newer, older = start(review_workflow()), start(waits, {"sku": "A-1"})
    decided = start(review_workflow("decided"))
    engine.task_run_decide(trace_id=str(decided.trace_id), node="review", approve=True, user=None)
    # A delay waits without an event type too: only the version's graph tells it from an approval.
    assert status(older, "cool_down") == status(older, "moderated") == "DEFERRED"
    # Reached in the opposite order to their ids: the list follows when each was reached.
    TaskRun.objects.filter(run=older).update(queued_at=F("queued_at") + timedelta(seconds=1))
    TaskRun.objects.filter(run=newer).update(queued_at=F("queued_at") + timedelta(seconds=2))

    html = browser.get(reverse("workflows_app:approval-list")).content.decode()

    assert approval_rows(html) == [(str(newer.trace_id), "review"), (str(older.trace_id), "review")]
    assert f'href="{reverse("workflows_app:run-detail", args=[newer.trace_id])}"' in html
    assert f'href="{reverse("workflows_app:run-node", args=[older.trace_id, "review"])}"' in html
    assert 'href="/workflows/waits/"' in html and "2 waiting" in html
    assert "data-due" in html  # the approval's timeout
    # Only a user who may decide gets the buttons.
    assert 'data-action="approve"' not in html and "Can approve or reject" in html


def test_the_list_offers_approve_and_reject_with_a_comment_and_csrf(approver):
    run = start(review_workflow())

    html = approver.get(reverse("workflows_app:approval-list")).content.decode()

    for verb in ("approve", "reject"):
        form = section(html, f'action="{decide_url(run, verb)}"', "</form>")
        assert 'name="comment"' in form and "csrfmiddlewaretoken" in form
        assert f'data-action="{verb}"' in form and 'name="next" value="/approvals/"' in form


def test_the_list_is_in_the_navigation_and_needs_a_login(client, browser):
    html = browser.get(reverse("workflows_app:run-list")).content.decode()
    page = browser.get(reverse("workflows_app:approval-list")).content.decode()
    client.logout()
    anonymous = client.get(reverse("workflows_app:approval-list"))
    with override_settings(EVENTFLOW={**settings.EVENTFLOW, "PUBLIC_PAGES": True}):
        public = client.get(reverse("workflows_app:approval-list"))

    assert 'href="/approvals/"' in html
    assert re.search(r'href="/approvals/" class="active"', page) and "No approval is waiting." in page
    assert anonymous.status_code == 302 and anonymous["Location"].startswith(reverse("admin:login"))
    assert public.status_code == 200


def test_the_list_query_count_does_not_grow_with_the_approvals(approver):
    workflows = [review_workflow("one"), waiting_workflow("two")]
    for workflow in workflows:
        start(workflow, {"sku": "A-1"})
    url = reverse("workflows_app:approval-list")
    approver.get(url)  # each version's graph is read once per process, then cached
    before = _queries(approver, url)

    for _ in range(20):
        for workflow in workflows:
            start(workflow, {"sku": "A-1"})
    after = _queries(approver, url)

    assert len(approval_rows(approver.get(url).content.decode())) == 42
    assert before == after


# --------------------------------------------------------------------------- the buttons


def test_deciding_needs_the_permission_and_changes_nothing_without_it(client, browser, trigger_user):
    run = start(review_workflow())

    denied = browser.post(decide_url(run, "approve"), {"comment": "ok"})
    client.force_login(trigger_user)  # may cancel and retry runs, not decide approvals
    operator = client.post(decide_url(run, "reject"))
    client.logout()
    anonymous = client.post(decide_url(run, "approve"))

    assert denied.status_code == operator.status_code == anonymous.status_code == 403
    assert "Can approve or reject a run" in denied.content.decode()
    assert "Traceback" not in denied.content.decode()
    assert status(run, "review") == "DEFERRED"


def test_approve_decides_and_goes_back_to_the_run(approver):
    run = start(review_workflow())

    response = approver.post(decide_url(run, "approve"), {"comment": "  looks good "}, follow=True)

    run_url = reverse("workflows_app:run-detail", args=[run.trace_id])
    assert response.redirect_chain == [(run_url, 302)]
    task = TaskRun.objects.get(run=run, node_key="review", map_index=None)
    assert task.status == "SUCCESS"
    assert (task.result["approved"], task.result["by"], task.result["comment"]) == (True, "reviewer", "looks good")
    assert status(run, "publish") == "QUEUED"
    html = response.content.decode()
    assert "Approved review of run" in html and "looks good" in html
    assert svg_nodes(html)["review"] == "SUCCESS"


def test_reject_decides_and_goes_back_to_a_safe_next_only(approver):
    run, other = start(review_workflow()), start(review_workflow())

    response = approver.post(decide_url(run, "reject"), {"comment": "wrong price", "next": "/approvals/"})
    outside = approver.post(decide_url(other, "reject"), {"next": "https://evil.example/"})

    assert response.status_code == 302 and response["Location"] == "/approvals/"
    assert outside["Location"] == reverse("workflows_app:run-detail", args=[other.trace_id])
    task = TaskRun.objects.get(run=run, node_key="review", map_index=None)
    assert (task.status, task.error) == ("FAILURE", "rejected by reviewer: wrong price")
    assert WorkflowRun.objects.get(pk=run.pk).status == WorkflowRun.Status.FAILED
    assert TaskRun.objects.get(run=other, node_key="review", map_index=None).error == "rejected by reviewer"


def test_deciding_twice_or_what_is_no_approval_is_a_message_not_an_error(approver):
    run = start(waiting_workflow(), {"sku": "A-1"})
    approver.post(decide_url(run, "approve"))

    twice = approver.post(decide_url(run, "reject"), {"comment": "too late"}, follow=True)
    delay = approver.post(decide_url(run, "approve", "cool_down"), follow=True)
    unknown = approver.post(decide_url(run, "approve", "nope"))
    long = approver.post(decide_url(start(review_workflow()), "approve"), {"comment": "x" * 2001}, follow=True)

    assert twice.status_code == delay.status_code == 200
    assert "Nothing decided: node &#x27;review&#x27;" in twice.content.decode()
    assert 'class="warning"' in twice.content.decode()
    assert "is not a waiting approval (it is DEFERRED)" not in twice.content.decode()
    assert "is not a waiting approval" in delay.content.decode()
    assert unknown.status_code == 404
    assert "at most 2,000 characters" in long.content.decode()
    assert status(run, "review") == "SUCCESS" and status(run, "cool_down") == "DEFERRED"


def test_deciding_is_post_only_with_csrf(django_user_model):
    run = start(review_workflow())
    user = django_user_model.objects.create_user(username="strict", password="pw-strict-123")
    user.user_permissions.add(Permission.objects.get(codename="approve_workflowrun"))
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(user)

    assert strict.get(decide_url(run, "approve")).status_code == 405
    assert strict.post(decide_url(run, "approve")).status_code == 403
    assert status(run, "review") == "DEFERRED"


# --------------------------------------------------------------------------- the run page


def test_run_page_draws_waiting_nodes_amber_and_dashed_and_says_what_each_waits_for(browser):
    run = start(waiting_workflow(), {"sku": "A-1"})

    html = browser.get(reverse("workflows_app:run-detail", args=[run.trace_id])).content.decode()

    waiting = {"moderated": "DEFERRED", "cool_down": "DEFERRED", "review": "DEFERRED"}
    assert svg_nodes(html) == {**waiting, "after": "WAITING"}
    assert table_nodes(html)["review"] == "DEFERRED"
    fill = graph_svg.STATUS_COLOURS["DEFERRED"][0]
    for key in ("moderated", "cool_down", "review"):
        box = svg_node(html, key)
        assert f'fill="{fill}"' in box and "stroke-dasharray" in box and graph_svg.WAIT_STROKE in box
    assert "waits for key A-1" in svg_node(html, "moderated")
    assert "waits for an approval" in svg_node(html, "review")
    assert "until " in svg_node(html, "cool_down")
    legend = section(html, '<div class="legend"', "</div>")
    assert 'class="badge st-DEFERRED"' in legend
    rows = section(html, '<table class="grid tasks">', "</table>")
    assert re.search(r'data-waits="wait_event">waits for event marketplace\.moderated with key A-1 until <time', rows)
    assert 'data-waits="approval">waits for an approval until <time' in rows
    assert 'data-waits="delay">waits for its delay to end until <time' in rows
    assert '<td class="muted">approval</td>' in rows and '<td class="muted">delay</td>' in rows


def test_node_detail_of_a_waiting_approval_offers_the_buttons_to_those_allowed(browser, approver, client, user):
    run = start(review_workflow())
    url = reverse("workflows_app:run-node", args=[run.trace_id, "review"])

    allowed = approver.get(url, {"fragment": "1"}).content.decode()
    client.force_login(user)
    plain = client.get(url, {"fragment": "1"}).content.decode()

    assert 'data-waits="approval"' in allowed and "waits for" in allowed and "data-due" in allowed
    run_url = reverse("workflows_app:run-detail", args=[run.trace_id])
    for verb in ("approve", "reject"):
        form = section(allowed, f'action="{decide_url(run, verb)}"', "</form>")
        assert 'name="comment"' in form and "csrfmiddlewaretoken" in form and f'value="{run_url}"' in form
    assert 'data-action="approve"' not in plain and "Can approve or reject" in plain


def test_node_detail_of_a_wait_event_says_its_event_and_key(browser):
    run = start(waiting_workflow(), {"sku": "A-1"})

    html = browser.get(reverse("workflows_app:run-node", args=[run.trace_id, "moderated"])).content.decode()

    assert re.search(r'data-waits="wait_event"><strong>event marketplace\.moderated with key A-1</strong> until', html)
    assert "(then failed)" in html


def test_a_decided_approval_says_who_decided_when_and_why(approver):
    approved, rejected = start(review_workflow()), start(review_workflow())
    approver.post(decide_url(approved, "approve"), {"comment": "ship it"})
    approver.post(decide_url(rejected, "reject"), {"comment": "wrong <price>"})

    yes = approver.get(reverse("workflows_app:run-node", args=[approved.trace_id, "review"])).content.decode()
    no = approver.get(reverse("workflows_app:run-node", args=[rejected.trace_id, "review"])).content.decode()
    page = approver.get(reverse("workflows_app:run-detail", args=[rejected.trace_id])).content.decode()

    assert re.search(r'data-decision="approved">approved by <strong>reviewer</strong> at <time[^>]*>[^<]+</time>', yes)
    assert '<q class="comment">ship it</q>' in yes
    assert re.search(r'data-decision="rejected">rejected by <strong>reviewer</strong> at <time', no)
    assert '<q class="comment">wrong &lt;price&gt;</q>' in no
    assert 'data-action="approve"' not in yes + no
    assert "rejected by reviewer: wrong &lt;price&gt;" in section(page, '<table class="grid tasks">', "</table>")
    assert "rejected by reviewer" in svg_node(page, "review")
