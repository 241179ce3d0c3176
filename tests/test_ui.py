"""The Airflow UI in headless Chromium: log in, trigger yt8m_nightly_inference through its params form.

Starts a local Airflow exactly as `make airflow` does (`python -m tasks.local_airflow`, its own
AIRFLOW_HOME and VTAG_HOME, the nightly DAG starting today), logs in through the real login form,
sets "Labels kept per video (k)" in the trigger form, screenshots the filled form, submits it, and
checks through the REST API that the run carries top_k = 7. The run itself may skip or fail (no model
here): the test is about the form. Every process it started must be gone afterwards.

The screenshot goes to $VTAG_TEST_OUTPUT (default: the test's tmp_path); its path is printed.
Chromium: $VTAG_CHROMIUM, else `chromium` on PATH (Debian's), driven by the `playwright` package.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.airflow_stack import AirflowRest, processes_with_env, wait_for
from tests.support.env import BIN, REPO, free_port

DAGS = REPO / "dags"
DAG_ID = "yt8m_nightly_inference"
TOP_K = 7  # not the param's default (20)
UP_LINE = re.compile(r"Airflow is up at (?P<url>http://\S+)\s+\(login: (?P<user>\S+) / (?P<password>\S+)\)")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STARTUP_S = 420  # migrate + standalone + DAG parsing: 30 s on an idle 2-core VM, minutes on a busy one
UI_TIMEOUT_MS = 60_000

pytestmark = pytest.mark.stack


def _airflow_processes(airflow_home: Path) -> list[str]:
    """Live processes whose environment carries this AIRFLOW_HOME (the API server, scheduler, task runners...)."""
    return [f"{pid}: {cmdline}" for pid, cmdline in processes_with_env("AIRFLOW_HOME", str(airflow_home)).items()]


@pytest.fixture
def local_airflow(tmp_path):
    """`make airflow` on a free port under tmp_path; yields (url, user, password), then stops it all."""
    started = time.monotonic()
    airflow_home, vtag_home = tmp_path / "airflow", tmp_path / "vtag"
    vtag_home.mkdir()
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(airflow_home),
        "VTAG_HOME": str(vtag_home),
        "AIRFLOW__API__PORT": str(free_port()),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "VTAG_NIGHTLY_START": datetime.now(UTC).strftime("%Y-%m-%d"),  # as `make airflow`: no catchup flood
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("VTAG_DB_URL", None)
    log_path = tmp_path / "local_airflow.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tasks.local_airflow"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )

    def log_tail() -> str:
        text = log_path.read_text(errors="replace")
        standalone = airflow_home / "standalone.log"
        if standalone.exists():
            text += "\n--- standalone.log ---\n" + standalone.read_text(errors="replace")[-4000:]
        return text[-6000:]

    def up():
        if proc.poll() is not None:
            raise RuntimeError(f"tasks.local_airflow exited with {proc.returncode}:\n{log_tail()}")
        return UP_LINE.search(log_path.read_text(errors="replace"))

    try:
        try:
            match = wait_for(up, STARTUP_S, "local Airflow up")
        except TimeoutError as exc:
            pytest.fail(f"{exc}\n{log_tail()}")
        print(
            f"\nlocal Airflow up at {match['url']} after {time.monotonic() - started:.0f} s (AIRFLOW_HOME={airflow_home})"
        )
        yield match["url"], match["user"], match["password"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # local_airflow stops its whole process group on SIGTERM
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            pytest.fail(f"tasks.local_airflow did not exit within 90 s of SIGTERM:\n{log_tail()}")
        try:
            wait_for(lambda: not _airflow_processes(airflow_home), 60, "Airflow processes gone", every=1)
        except TimeoutError:
            left = _airflow_processes(airflow_home)
            for line in left:
                try:
                    os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
                except OSError:
                    pass
            pytest.fail("processes left running after tasks.local_airflow stopped:\n" + "\n".join(left))
        print(
            f"local Airflow stopped (exit {proc.returncode}); nothing left of {airflow_home}; "
            f"test took {time.monotonic() - started:.0f} s"
        )


def _required_but_empty(rest: AirflowRest) -> list[str]:
    """The UI's rule for blocking the trigger form: a param whose schema has a type without "null" and
    whose value is None or ""."""
    details = rest.ok("GET", f"/dags/{DAG_ID}/details")
    blocked = []
    for name, param in (details.get("params") or {}).items():
        kind = (param.get("schema") or {}).get("type")
        if kind and not (isinstance(kind, list) and "null" in kind) and param.get("value") in (None, ""):
            blocked.append(name)
    return blocked


def test_trigger_form_sets_top_k(local_airflow, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, user, password = local_airflow
    chromium = os.environ.get("VTAG_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).is_file():
        pytest.fail(f"no Chromium at {chromium} (Debian's `chromium` package, or set VTAG_CHROMIUM)")
    out_dir = Path(os.environ.get("VTAG_TEST_OUTPUT") or tmp_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    screenshot = out_dir / "trigger_form_top_k.png"
    rest = AirflowRest(url, user, password)
    rest.token()  # the REST API's JWT, for the same login

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1500})  # tall: the whole form in one shot
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.set_default_navigation_timeout(UI_TIMEOUT_MS)

            # The real login form (simple auth manager), which the UI redirects to.
            page.goto(url)
            page.wait_for_url(re.compile(r"/auth/login"))
            page.get_by_label("Username").fill(user)
            page.get_by_label("Password").fill(password)
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url(lambda u: "/auth/login" not in u)

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
