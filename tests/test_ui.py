"""The Airflow UI in headless Chromium: log in, trigger yt8m_nightly_inference through its params form.

Starts a local Airflow exactly as `make airflow` does (`python -m tasks.local_airflow`, its own
AIRFLOW_HOME and VTAG_HOME, the nightly DAG starting today), logs in through the real login form,
sets "Labels kept per video (k)" in the trigger form, screenshots the filled form, submits it, and
checks through the REST API that the run carries top_k = 7. The run itself may skip or fail (no model
here): the test is about the form. Every process it started must be gone afterwards.

The screenshot goes to $VTAG_TEST_OUTPUT (default: the test's tmp_path); its path is printed.
Chromium: $VTAG_CHROMIUM, else `chromium` on PATH (Debian's), driven by the `playwright` package.
"""

import re

import pytest

from tests.support.airflow_ui import CHROMIUM_ARGS, chromium, local_airflow, log_in, new_page, screenshot_dir

DAG_ID = "yt8m_nightly_inference"
TOP_K = 7  # not the param's default (20)

pytestmark = pytest.mark.stack


@pytest.fixture
def airflow(tmp_path):
    with local_airflow(tmp_path) as running:
        yield running


def _required_but_empty(rest) -> list[str]:
    """The UI's rule for blocking the trigger form: a param whose schema has a type without "null" and
    whose value is None or ""."""
    details = rest.ok("GET", f"/dags/{DAG_ID}/details")
    blocked = []
    for name, param in (details.get("params") or {}).items():
        kind = (param.get("schema") or {}).get("type")
        if kind and not (isinstance(kind, list) and "null" in kind) and param.get("value") in (None, ""):
            blocked.append(name)
    return blocked


def test_trigger_form_sets_top_k(airflow, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url = airflow.url
    screenshot = screenshot_dir(tmp_path) / "trigger_form_top_k.png"
    rest = airflow.rest()  # the REST API's JWT, for the same login

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = new_page(browser, height=1500)  # tall: the whole form in one shot
            log_in(page, airflow)

            # DAG page -> "Trigger" -> the dialog with the params form.
            page.goto(f"{url}/dags/{DAG_ID}")
            page.get_by_test_id("trigger-dag-button").click()
            dialog = page.get_by_role("dialog")
            expect(dialog).to_contain_text(f"Trigger Dag - {DAG_ID}")
            top_k = dialog.get_by_label("Labels kept per video (k)")
            expect(top_k).to_have_value("20")  # the param's default, rendered from the DAG
            top_k.fill(str(TOP_K))
            expect(top_k).to_have_value(str(TOP_K))
            page.screenshot(path=str(screenshot), full_page=True)
            print(f"screenshot of the filled trigger form: {screenshot}")

            submit = dialog.get_by_test_id("trigger-dag-submit")
            try:
                expect(submit).to_be_enabled(timeout=10_000)
                blocked = None
            except AssertionError:
                blocked = _required_but_empty(rest)
            if blocked is not None:
                pytest.fail(
                    f"the Trigger button stays disabled after setting k (see {screenshot}); params the form "
                    f"takes as required (a type without 'null') and finds empty: {blocked}"
                )
            with page.expect_response(
                lambda r: r.request.method == "POST" and r.url.endswith(f"/dags/{DAG_ID}/dagRuns")
            ) as posted:
                submit.click()
            assert posted.value.status == 200, posted.value.text()
            run_id = posted.value.json()["dag_run_id"]
            page.wait_for_url(re.compile(r"/runs/"))  # the UI moves on to the new run
        finally:
            browser.close()

    # The run, as the REST API sees it, with the same login.
    response = rest.api("GET", f"/dags/{DAG_ID}/dagRuns?limit=100")
    assert response.status_code == 200, response.text
    runs = response.json()
    ours = [run for run in runs["dag_runs"] if (run.get("conf") or {}).get("top_k") == TOP_K]
    assert [run["dag_run_id"] for run in ours] == [run_id], runs
    assert ours[0]["run_type"] == "manual" and ours[0]["triggered_by"] == "ui", ours[0]
