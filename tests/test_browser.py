"""Headless Chromium on a run's status page while real workers run it: the graph follows the run without a reload."""

from __future__ import annotations

import os
import shutil

import pytest
from django.urls import reverse
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests import factories
from tests.e2e import trigger, wait_final, wait_for
from tests.test_bulk import failed_run, failing_workflow
from workflows_app import engine
from workflows_app.graph_svg import STATUS_COLOURS
from workflows_app.models import TaskRun, WorkflowRun

pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHROMIUM = os.environ.get("CHROMIUM_BIN") or shutil.which("chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER_BIN") or shutil.which("chromedriver")
SLEEP = "workflows_app.tasks.sleep"
KEYS = ["fetch", "resize", "describe", "publish"]
NODE_STATUSES = """
return Object.fromEntries(Array.from(document.querySelectorAll("svg.dag g.dag-node"))
  .map(function (g) { return [g.getAttribute("data-node"), g.getAttribute("data-status")]; }));
"""


@pytest.fixture
def chrome():
    """Debian's chromium and chromedriver, headless; nothing is downloaded."""
    if not (CHROMIUM and CHROMEDRIVER):
        message = "needs chromium and its driver: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def node_statuses(driver: WebDriver) -> dict[str, str]:
    return driver.execute_script(NODE_STATUSES)


def sign_in(chrome, wait, base_url: str, user) -> None:
    """Sign in the way an operator does: the admin login form, then on to the runs."""
    chrome.get(f"{base_url}{reverse('admin:login')}?next={reverse('workflows_app:run-list')}")
    chrome.find_element(By.NAME, "username").send_keys(user.username)
    chrome.find_element(By.NAME, "password").send_keys("pw-admin-123")
    chrome.find_element(By.CSS_SELECTOR, "form#login-form [type=submit]").click()
    wait.until(lambda d: d.current_url.endswith(reverse("workflows_app:run-list")))


def test_run_page_turns_each_node_green_live_and_opens_its_detail(
    chrome, live_server, workers, api, admin_user, tmp_path, capsys
):
    # fetch takes 2 s, so the page is open well before anything has finished; the run lasts about 4 s.
    factories.workflow(
        factories.spec(
            "browser_watch",
            [
                {"key": "fetch", "task": SLEEP, "params": {"seconds": 2}},
                {"key": "resize", "task": SLEEP, "params": {"seconds": 1}},
                {"key": "describe", "task": SLEEP, "params": {"seconds": 1}},
                {"key": "publish", "task": SLEEP, "params": {"seconds": 0.5}},
            ],
            [["fetch", "resize"], ["fetch", "describe"], ["resize", "publish"], ["describe", "publish"]],
            event_type="browser_watch",
            event_types={"browser_watch": {"concurrency": 2}},
        )
    )
    workers(["browser_watch"], concurrency=2)
    # The live fragment replaces the elements a condition reads once a second: a stale one is read again.
    wait = WebDriverWait(chrome, 60, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException])

    sign_in(chrome, wait, live_server.url, admin_user)

    trace_id = trigger(api, "browser_watch", {"product": "lamp"})
    run_url = f"{live_server.url}{reverse('workflows_app:run-detail', args=[trace_id])}"
    chrome.get(run_url)
    # Survives only if the page is never reloaded: updates must come from the live fragment.
    chrome.execute_script("window.__marker = 1;")

    at_open = node_statuses(chrome)
    assert sorted(at_open) == sorted(KEYS)
    assert "SUCCESS" not in at_open.values(), at_open

    seen: dict[str, list[str]] = {key: [] for key in KEYS}

    def all_green(driver: WebDriver) -> dict[str, str] | bool:
        now = node_statuses(driver)
        for key, status in now.items():
            if not seen[key] or seen[key][-1] != status:
                seen[key].append(status)
        return now if now and set(now.values()) == {"SUCCESS"} else False

    wait.until(all_green, message="every node of the graph to turn SUCCESS")

    assert chrome.execute_script("return window.__marker;") == 1, "the page reloaded"
    assert chrome.current_url == run_url
    fills = chrome.execute_script(
        "return Array.from(document.querySelectorAll('svg.dag g.dag-node rect')).map(r => r.getAttribute('fill'));"
    )
    assert set(fills) == {STATUS_COLOURS["SUCCESS"][0]}
    for key in KEYS:
        assert seen[key][0] != "SUCCESS" and seen[key][-1] == "SUCCESS", (key, seen[key])
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#run-live").get_attribute("data-final") == "true")

    # A click on a node of the drawing opens its detail in place.
    chrome.find_element(By.CSS_SELECTOR, 'svg.dag g.dag-node[data-node="describe"] rect').click()
    panel = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, '#node-panel .node-detail[data-node="describe"]'))
    task = TaskRun.objects.get(run_id=trace_id, node_key="describe")
    text = panel.text
    assert panel.get_attribute("data-status") == "SUCCESS"
    assert str(task.current_event_id) in text
    assert "lamp" in text and "Attempts (1)" in text
    assert chrome.execute_script("return window.__marker;") == 1
    assert chrome.current_url == run_url

    path = tmp_path / f"run-{trace_id}.png"
    assert chrome.save_screenshot(str(path))
    with capsys.disabled():
        print(f"\nscreenshot of the run page with a node's detail open: {path}")


def test_run_page_shows_a_skipped_branch_with_its_reason_and_a_mapped_node_with_its_instances(
    chrome, live_server, workers, api, admin_user, tmp_path, capsys
):
    """list -> upload, mapped over the list's six images; list -> publish_1688, taken only when the
    listing allows that marketplace, which it does not: publish_1688 ends SKIPPED and says why."""
    images = ["front.jpg", "side.jpg", "back.jpg", "top.jpg", "box.jpg", "label.jpg"]
    factories.workflow(
        factories.spec(
            "browser_branch",
            [
                {"key": "list", "task": SLEEP, "params": {"seconds": 1.5, "images": images, "allowed_1688": False}},
                {"key": "upload", "task": SLEEP, "params": {"seconds": 1}, "map_over": "upstream.list.payload.images"},
                {"key": "publish", "task": "workflows_app.tasks.echo"},
                {"key": "publish_1688", "task": "workflows_app.tasks.echo"},
            ],
            [
                ["list", "upload"],
                ["upload", "publish"],
                {"from": "list", "to": "publish_1688", "when": "result.payload.allowed_1688"},
            ],
            event_type="browser_branch",
            event_types={"browser_branch": {"concurrency": 2}},
        )
    )
    workers(["browser_branch"], concurrency=2)
    # The live fragment replaces the elements a condition reads once a second: a stale one is read again.
    wait = WebDriverWait(chrome, 60, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException])
    sign_in(chrome, wait, live_server.url, admin_user)

    trace_id = trigger(api, "browser_branch", {"product": "lamp"})
    run_url = f"{live_server.url}{reverse('workflows_app:run-detail', args=[trace_id])}"
    chrome.get(run_url)
    chrome.execute_script("window.__marker = 1;")

    # While its instances run two at a time, the mapped node's box counts them per status.
    upload_texts: list[str] = []

    def finished(driver: WebDriver) -> bool:
        # One script reads both, so the fragment cannot be replaced between them: the box's last text
        # is the final fragment's.
        final, text = driver.execute_script(
            "var g = document.querySelector('svg.dag g.dag-node[data-node=\"upload\"]');"
            "var live = document.getElementById('run-live');"
            "return [live ? live.getAttribute('data-final') === 'true' : false,"
            " g ? Array.from(g.querySelectorAll('text')).map(t => t.textContent).join(' | ') : ''];"
        )
        if text and (not upload_texts or upload_texts[-1] != text):
            upload_texts.append(text)
        return final

    wait.until(finished, message="the run to end, seen through the live fragment")

    assert chrome.execute_script("return window.__marker;") == 1, "the page reloaded"
    assert node_statuses(chrome) == {
        "list": "SUCCESS",
        "upload": "SUCCESS",
        "publish": "SUCCESS",
        "publish_1688": "SKIPPED",
    }
    assert any("running" in text for text in upload_texts), upload_texts
    assert "6 \u2713" in upload_texts[-1] and "\u00d76" in upload_texts[-1], upload_texts
    upload = chrome.find_element(By.CSS_SELECTOR, 'svg.dag g.dag-node[data-node="upload"]')
    assert upload.get_attribute("data-mapped") == "true"
    assert len(chrome.find_elements(By.CSS_SELECTOR, "table.tasks tbody tr")) == 4
    reason = "the condition of edge list -> publish_1688 (`result.payload.allowed_1688`) was false"
    skipped_row = chrome.find_element(By.CSS_SELECTOR, 'table.tasks tr[data-node="publish_1688"]')
    assert reason in skipped_row.text
    skipped_box = chrome.find_element(By.CSS_SELECTOR, 'svg.dag g.dag-node[data-node="publish_1688"] rect')
    assert (
        skipped_box.get_attribute("stroke-dasharray")
        and skipped_box.get_attribute("fill") == (STATUS_COLOURS["SKIPPED"][0])
    )
    condition = chrome.find_element(By.CSS_SELECTOR, 'svg.dag g.dag-cond[data-edge="list publish_1688"]')
    assert "result.payload.allowed_1688" in condition.get_attribute("textContent")

    # The skipped node's detail says why it did not run.
    chrome.find_element(By.CSS_SELECTOR, 'svg.dag g.dag-node[data-node="publish_1688"] a').click()
    panel = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, '#node-panel .node-detail[data-node="publish_1688"]'))
    assert "Why it did not run" in panel.text and reason in panel.text

    # The mapped node's detail lists its instances, each with its own Event.
    chrome.find_element(By.CSS_SELECTOR, 'table.tasks a[data-node-link="upload"]').click()
    panel = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, '#node-panel .node-detail[data-node="upload"]'))
    rows = panel.find_elements(By.CSS_SELECTOR, "table.instances tbody tr")
    assert [r.get_attribute("data-map-index") for r in rows] == [str(i) for i in range(len(images))]
    assert {r.get_attribute("data-status") for r in rows} == {"SUCCESS"}
    instances = TaskRun.objects.filter(run_id=trace_id, node_key="upload", map_index__isnull=False)
    assert {str(event_id) for event_id in instances.values_list("current_event_id", flat=True)} == {
        r.get_attribute("data-event-id") for r in rows
    }
    assert "6: 6 \u2713" in panel.text
    assert chrome.current_url == run_url

    path = tmp_path / f"run-{trace_id}-branch-and-map.png"
    assert chrome.save_screenshot(str(path))
    with capsys.disabled():
        print(f"\nscreenshot of a run with a skipped branch and a mapped node's detail open: {path}")


def test_an_approval_is_approved_on_the_run_page_and_another_rejected_on_the_approvals_page(
    chrome, live_server, workers, api, admin_user, tmp_path, capsys
):
    """draft -> review (an approval) -> publish, twice: the first run approved from the review node's
    detail on its run page goes on to SUCCESS; the second, rejected with a comment on /approvals/, FAILED."""
    factories.workflow(
        factories.spec(
            "browser_review",
            [
                {"key": "draft", "task": SLEEP, "params": {"seconds": 0.5}},
                {"key": "review", "kind": "approval", "event_type": None, "timeout": 3600},
                {"key": "publish", "task": "workflows_app.tasks.echo"},
            ],
            [["draft", "review"], ["review", "publish"]],
            event_type="browser_review",
        )
    )
    workers(["browser_review"], concurrency=2)
    # The live fragment replaces the elements a condition reads once a second: a stale one is read again.
    wait = WebDriverWait(chrome, 60, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException])
    sign_in(chrome, wait, live_server.url, admin_user)

    approved = trigger(api, "browser_review", {"product": "lamp"})
    run_url = f"{live_server.url}{reverse('workflows_app:run-detail', args=[approved])}"
    chrome.get(run_url)
    wait.until(lambda d: node_statuses(d).get("review") == "DEFERRED", message="the approval to be reached, seen live")
    box = chrome.find_element(By.CSS_SELECTOR, 'svg.dag g.dag-node[data-node="review"] rect')
    assert box.get_attribute("fill") == STATUS_COLOURS["DEFERRED"][0] and box.get_attribute("stroke-dasharray")
    assert "waits for an approval" in chrome.find_element(By.CSS_SELECTOR, 'table.tasks tr[data-node="review"]').text

    # Its detail, opened in place, says what it waits for and offers the two buttons.
    box.click()
    panel = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, '#node-panel .node-detail[data-node="review"]'))
    assert "waits for" in panel.text and "an approval" in panel.text
    panel.find_element(By.CSS_SELECTOR, "form.decide:has([data-action=approve]) input[name=comment]").send_keys(
        "looks good"
    )
    path = tmp_path / f"run-{approved}-approval.png"
    assert chrome.save_screenshot(str(path))
    panel.find_element(By.CSS_SELECTOR, "button[data-action=approve]").click()

    wait.until(lambda d: "Approved review" in d.find_element(By.CSS_SELECTOR, "ul.messages").text)
    assert chrome.current_url == run_url
    wait.until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#run-live").get_attribute("data-status") == "SUCCESS",
        message="the approved run to go on to SUCCESS",
    )
    assert node_statuses(chrome) == {"draft": "SUCCESS", "review": "SUCCESS", "publish": "SUCCESS"}
    result = TaskRun.objects.get(run_id=approved, node_key="review", map_index=None).result
    assert (result["approved"], result["by"], result["comment"]) == (True, "admin", "looks good")

    # The second run is rejected from the list of waiting approvals.
    rejected = trigger(api, "browser_review", {"product": "desk"})
    wait_for(
        lambda: TaskRun.objects.filter(run_id=rejected, node_key="review", status="DEFERRED").exists(),
        timeout=30,
        what="the second approval to be reached",
    )
    chrome.get(f"{live_server.url}{reverse('workflows_app:approval-list')}")
    row = chrome.find_element(By.CSS_SELECTOR, f'table.approvals tr[data-trace-id="{rejected}"]')
    assert row.get_attribute("data-node") == "review"
    assert len(chrome.find_elements(By.CSS_SELECTOR, "table.approvals tbody tr")) == 1
    row.find_element(By.CSS_SELECTOR, "form.decide:has([data-action=reject]) input[name=comment]").send_keys(
        "wrong price"
    )
    approvals_path = tmp_path / "approvals.png"
    assert chrome.save_screenshot(str(approvals_path))
    row.find_element(By.CSS_SELECTOR, "button[data-action=reject]").click()
    wait.until(lambda d: "Rejected review" in d.find_element(By.CSS_SELECTOR, "ul.messages").text)
    assert chrome.current_url == f"{live_server.url}{reverse('workflows_app:approval-list')}"
    assert "No approval is waiting." in chrome.find_element(By.TAG_NAME, "main").text

    assert wait_final([rejected]) == {rejected: "FAILED"}
    chrome.get(f"{live_server.url}{reverse('workflows_app:run-detail', args=[rejected])}")
    assert node_statuses(chrome) == {"draft": "SUCCESS", "review": "FAILURE", "publish": "UPSTREAM_FAILED"}
    review_row = chrome.find_element(By.CSS_SELECTOR, 'table.tasks tr[data-node="review"]')
    assert "rejected by admin: wrong price" in review_row.text
    chrome.find_element(By.CSS_SELECTOR, 'table.tasks a[data-node-link="review"]').click()
    panel = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, '#node-panel .node-detail[data-node="review"]'))
    decision = panel.find_element(By.CSS_SELECTOR, "[data-decision]")
    assert decision.get_attribute("data-decision") == "rejected"
    assert "rejected by admin at" in decision.text and "wrong price" in decision.text

    rejected_path = tmp_path / f"run-{rejected}-rejected.png"
    assert chrome.save_screenshot(str(rejected_path))
    with capsys.disabled():
        print(f"\nscreenshots of a waiting approval's detail, /approvals/, and a rejected approval: {path}")
        print(f"{approvals_path}\n{rejected_path}")


def test_retry_all_matching_from_the_run_list_confirms_the_count_then_retries_them(chrome, live_server, admin_user):
    workflow = failing_workflow()
    failed = [failed_run(workflow, {"sku": f"A-{i}"}) for i in range(300)]
    # Of the same workflow but not failed: the filter leaves them out.
    running = engine.workflow_run_start(workflow=workflow, payload={"sku": "B-1"})[0]
    wait = WebDriverWait(chrome, 60, poll_frequency=0.2)
    sign_in(chrome, wait, live_server.url, admin_user)

    form = chrome.find_element(By.CSS_SELECTOR, "form.filters")
    Select(form.find_element(By.NAME, "workflow")).select_by_value("bulk_fail")
    Select(form.find_element(By.NAME, "status")).select_by_value("FAILED")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(lambda d: "status=FAILED" in d.current_url)
    chrome.find_element(By.CSS_SELECTOR, '[data-bulk="retry-all"]').click()

    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-confirm-count]"))
    assert chrome.find_element(By.CSS_SELECTOR, "[data-confirm-count]").get_attribute("data-confirm-count") == "300"
    confirm = chrome.find_element(By.CSS_SELECTOR, 'button[data-confirm="retry"]')
    assert confirm.text == "Retry 300 runs"
    assert set(WorkflowRun.objects.filter(workflow=workflow).values_list("status", flat=True)) == {
        "FAILED",
        "RUNNING",
    }, "the confirmation page changed something"
    confirm.click()

    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "ul.messages li.success"))
    assert "300 of 300 matching runs retried" in chrome.find_element(By.CSS_SELECTOR, "ul.messages").text
    assert "/runs/?" in chrome.current_url and "status=FAILED" in chrome.current_url
    assert WorkflowRun.objects.filter(trace_id__in=[r.trace_id for r in failed], status="RUNNING").count() == 300
    assert WorkflowRun.objects.get(pk=running.pk).status == "RUNNING"
