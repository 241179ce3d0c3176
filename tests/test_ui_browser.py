"""The product's window in headless Chromium against a real local Airflow (`make airflow`: API server,
scheduler, DAG processor, triggerer): the Video tags pages, the human gate on promotion, the night's
deadline, and Airflow's own trigger form setting the nightly DAG's k.

One Airflow for the module. Its VTAG_HOME is filled first through our own task functions (synthetic shards
ingested, a TINY model trained, evaluated and promoted, one night scored into the DAG's export folder), so
the pages have real rows and files to show; the figures the pages show are checked against the database.
Screenshots of each page go to $VTAG_TEST_OUTPUT (`make screenshots` regenerates docs/screenshots), else
to the test's tmp_path; their paths are printed.
"""

import csv
import re
import time
from dataclasses import replace
from datetime import UTC, datetime
from urllib.parse import quote

import pytest

from storage.database import registry, reviews
from storage.formats.exports import night_folder
from tasks import queries, settings
from tasks.inference import run_inference
from tests.support.airflow_stack import wait_for
from tests.support.airflow_ui import CHROMIUM_ARGS, chromium, local_airflow, log_in, new_page, screenshot_dir
from tests.support.db import in_transaction, migrated
from tests.support.worlds import NIGHT, build_world, inference_shards, row, rows

pytestmark = pytest.mark.stack

NO_ROLE = "nobody"
NIGHT_DEADLINE = "20s"  # the nightly DAG's, in this Airflow: a queued run misses it within the test


def _seed(vtag_home) -> dict:
    """A production model and one night in the stores and database the local Airflow will use."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VTAG_HOME", str(vtag_home))
        for name in ("VTAG_DB_URL", "VTAG_EXPORTS_URI", "VTAG_MODELS_URI"):
            env.delenv(name, raising=False)
        db_url = migrated(settings.default_db_url())
        world = build_world(inference_shards(vtag_home / "raw"), vtag_home, db_url)
        exports = night_folder(settings.default_exports_uri(), NIGHT)
        run_inference(db_url, NIGHT, top_k=5, exports_uri=exports)
    run_id = row(db_url, "SELECT MAX(run_id) FROM inference_runs")[0]
    return {**world, "run_id": run_id}


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    seeded = _seed(root / "vtag")
    # No schedules: a scheduled night of today would become the seeded night's "night before" on its page.
    # and a user without a role beside the admin the tests log in as (the simple auth manager's passwords file
    # gets one for each)
    with local_airflow(
        root,
        VTAG_NIGHT_DEADLINE=NIGHT_DEADLINE,
        VTAG_NIGHTLY_CRON="",
        VTAG_INGEST_CRON="",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=f"admin:admin,{NO_ROLE}:",
    ) as running:
        yield running, seeded


@pytest.fixture(scope="module")
def browser(airflow):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(airflow, browser):
    running, _ = airflow
    opened = new_page(browser)
    log_in(opened, running)
    yield opened
    opened.context.close()


def _shot(page, tmp_path, name: str):
    path = screenshot_dir(tmp_path) / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def test_pages_refuse_a_browser_that_has_not_logged_in(airflow, browser):
    running, seeded = airflow
    context = browser.new_context()
    try:
        anonymous = context.new_page()
        gap = row(seeded["db"], f"SELECT gap FROM evaluations WHERE model_version = {seeded['version']}")[0]
        for path in ("/video-tags/", "/video-tags/models", f"/video-tags/models/{seeded['version']}"):
            response = anonymous.goto(running.url + path)
            assert response.status == 401, (path, response.status)
            assert f"{gap:.4f}" not in anonymous.content() and "Not authenticated" in anonymous.content()
    finally:
        context.close()


def test_pages_refuse_a_user_airflow_gives_no_dag_permissions(airflow, browser):
    """Logged in through Airflow's own form, as a user without a role: the pages answer 403 and show nothing."""
    import json

    running, seeded = airflow
    assert running.user != NO_ROLE
    passwords = json.loads((running.airflow_home / "simple_auth_manager_passwords.json.generated").read_text())
    nobody = new_page(browser)
    try:
        log_in(nobody, replace(running, user=NO_ROLE, password=passwords[NO_ROLE]))
        gap = row(seeded["db"], f"SELECT gap FROM evaluations WHERE model_version = {seeded['version']}")[0]
        for path in ("/video-tags/", "/video-tags/models", f"/video-tags/nights/{seeded['run_id']}"):
            response = nobody.goto(running.url + path)
            assert response.status == 403, (path, response.status)
            assert f"{gap:.4f}" not in nobody.content()
    finally:
        nobody.context.close()


def test_a_user_reaches_the_pages_and_sees_what_the_database_holds(airflow, page, tmp_path):
    from playwright.sync_api import expect

    running, seeded = airflow
    db_url, version, run_id = seeded["db"], seeded["version"], seeded["run_id"]

    # As a user finds it: Browse -> Video tags, the plugin's pages inside Airflow's own frame.
    page.get_by_role("button", name="Browse").click()
    page.get_by_role("menuitem", name="Video tags").click()
    page.wait_for_url(re.compile(r"/plugin/video-tags"))
    frame = page.frame_locator("iframe")
    frame.get_by_role("link", name="Models").first.click()
    expect(frame.get_by_role("heading", name="Models", exact=True)).to_be_visible()
    _shot(page, tmp_path, "nav.png")

    page.goto(f"{running.url}/video-tags/models")
    gap = row(db_url, f"SELECT gap FROM evaluations WHERE model_version = {version} ORDER BY id DESC")[0]
    registry_row = page.locator("table.registry").locator("tr", has=page.locator(f'a[href$="/models/{version}"]'))
    expect(registry_row).to_contain_text("production")
    expect(registry_row.locator("td.gap")).to_have_text(f"{gap:.4f}")
    _shot(page, tmp_path, "models.png")

    page.goto(f"{running.url}/video-tags/models/{version}")
    expect(page.locator("td.gap").first).to_have_text(f"{gap:.4f}")
    images = page.locator("img")
    expect(images).to_have_count(2)  # the evaluation's precision/recall plot and the loss curve
    for image in images.all():
        image.scroll_into_view_if_needed()
        wait_for(lambda image=image: image.evaluate("i => i.complete && i.naturalWidth > 0"), 30, "a plot to load")
    _shot(page, tmp_path, "model.png")

    page.goto(f"{running.url}/video-tags/nights")
    expect(page.locator(f'a[href$="/nights/{run_id}"]')).to_be_visible()
    _shot(page, tmp_path, "nights.png")

    done, total = row(db_url, f"SELECT videos_done, videos_total FROM inference_runs WHERE run_id = {run_id}")
    page.goto(f"{running.url}/video-tags/nights/{run_id}")
    expect(page.locator("table.progress .videos")).to_have_text(f"{done:,} of {total:,}")
    assert total > 0 and page.locator("svg rect").count() > 0
    expect(page.get_by_role("link", name="predictions.csv")).to_be_visible()
    _shot(page, tmp_path, "night.png")

    video = row(db_url, "SELECT MIN(video_id) FROM predictions")[0]
    _, expected = queries.run(db_url, "video_top_labels", {"video_id": video, "k": 50})
    page.goto(f"{running.url}/video-tags/tags?video={quote(video)}")  # opens the video's page
    expect(page.get_by_role("heading", name=f"Video {video}")).to_be_visible()
    assert expected and _table(page, "labels") == [
        [str(rank), name or f"label {label}", str(label), f"{score:.3f}", str(version)]
        for rank, label, name, score, version in expected
    ]
    _shot(page, tmp_path, "tags_video.png")

    # the CSV a person downloads holds exactly the query's rows
    with page.expect_download() as download:
        page.get_by_role("link", name="download CSV").first.click()
    got = list(csv.reader(open(download.value.path(), newline="")))
    columns, _ = queries.run(db_url, "video_top_labels", {"video_id": video, "k": 50})
    assert got[0] == columns and got[1:] == [["" if v is None else str(v) for v in r] for r in expected]

    # video -> label -> back to the video, by the links a person clicks
    label, name = expected[0][1], expected[0][2]
    page.locator("table.labels a", has_text=name).first.click()
    expect(page.get_by_role("heading", name=name)).to_be_visible()
    _, top = queries.run(db_url, "label_top_videos", {"label_id": label, "limit": 50})
    shown = [[v, f"{score:.3f}", str(rank)] for v, score, rank in top]
    assert top and _table(page, "top", all_pages=True) == shown
    _shot(page, tmp_path, "tags_label.png")
    # sortable: a click on "score" sorts ascending; paged: 25 rows a page when there are more
    page.locator("table.top th", has_text="score").click()
    assert _table(page, "top", all_pages=True) == [r for _, r in sorted(zip(top, shown), key=lambda p: p[0][1])]
    if len(top) > 25:
        expect(page.locator(".pager .where").first).to_contain_text(f"page 1 of 2 ({len(top)} rows)")
        assert len(_table(page, "top")) == 25
    back = page.locator("table.top a", has_text=video).first.get_attribute("href")  # its row may be paged out
    assert back == f"/video-tags/tags/videos/{video}"
    page.goto(f"{running.url}{back}")
    expect(page.get_by_role("heading", name=f"Video {video}")).to_be_visible()

    # search with suggestions as one types
    page.goto(f"{running.url}/video-tags/tags")
    page.locator("#q").press_sequentially(name[:3])
    wait_for(lambda: name in page.locator("#suggestions option").evaluate_all("os => os.map(o => o.value)"), 15,
             "the label among the suggestions")  # fmt: skip
    page.locator("#q").fill(name)
    page.get_by_role("button", name="open").click()
    expect(page.get_by_role("heading", name=name)).to_be_visible()


def _table(page, kind: str, all_pages: bool = False) -> list[list[str]]:
    """The cells of `table.data.<kind>` as the browser renders them (those shown, or all pages' rows)."""
    return page.locator(f"table.data.{kind}").evaluate(
        "(t, all) => [...t.querySelectorAll('tr')].slice(1).filter(r => all || r.style.display !== 'none')"
        ".map(r => [...r.querySelectorAll('td')].map(c => c.innerText.trim()))",
        all_pages,
    )


def _train_for_review(running, rest, parquet: str, **conf) -> str:
    """Trigger yt8m_train with require_approval; returns its run id once `review` waits for a person."""
    body = {"logical_date": None, "conf": {"data": parquet, "preset": "small", "epochs": 1, "batch_size": 8,
            "max_frames": 20, "require_approval": True, **conf}}  # fmt: skip
    run_id = rest.ok("POST", "/dags/yt8m_train/dagRuns", body)["dag_run_id"]

    def waiting():
        states = _states(rest, "yt8m_train", run_id)
        failed = {"failed", "upstream_failed"} & set(states.values())
        assert not failed, f"{states}\n{running.run_report('yt8m_train', run_id)}"
        return states.get("review") == "awaiting_input"

    wait_for(waiting, 300, f"yt8m_train {run_id} to ask for a review", every=2)
    return run_id


def _states(rest, dag_id: str, run_id: str) -> dict:
    found = rest.ok("GET", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances")
    return {ti["task_id"]: ti["state"] for ti in found["task_instances"]}


def _answer_in_the_ui(page, running, run_id: str, option: str, expected: list[str], shot: str | None, tmp_path):
    """Open the run's review in Required actions, check it shows `expected`, and click `option`."""
    from playwright.sync_api import expect

    page.goto(f"{running.url}/dags/yt8m_train/runs/{quote(run_id, safe='')}/tasks/review/required_actions")
    button = page.get_by_test_id(f"hitl-option-{option}")
    expect(button).to_be_enabled()
    for text in expected:
        expect(page.get_by_text(text).first).to_be_visible()
    if shot:
        _shot(page, tmp_path, shot)
    button.click()


def _finished(running, rest, dag_id: str, run_id: str, seconds: float = 180) -> dict:
    def done():
        run = rest.ok("GET", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}")
        return run if run["state"] in ("success", "failed") else None

    run = wait_for(done, seconds, f"{dag_id} {run_id} to finish", every=2)
    assert run["state"] == "success", f"{_states(rest, dag_id, run_id)}\n{running.run_report(dag_id, run_id)}"
    return run


def _version_of_run(db_url: str, run_id: str) -> int:
    return row(db_url, f"SELECT version FROM model_versions WHERE run_id = '{run_id}'")[0]


def test_a_person_approves_one_candidate_and_rejects_another_in_the_ui(airflow, page, tmp_path):
    from playwright.sync_api import expect

    running, seeded = airflow
    rest, db_url = running.rest(), seeded["db"]
    production = seeded["version"]
    production_gap = row(db_url, f"SELECT gap FROM evaluations WHERE model_version = {production} ORDER BY id")[0]

    approved_run = _train_for_review(running, rest, seeded["parquet"])
    candidate = _version_of_run(db_url, approved_run)
    asked = in_transaction(db_url, reviews.latest_by_version, [candidate])[candidate]
    gap = row(db_url, f"SELECT gap FROM evaluations WHERE id = {asked['evaluation_id']}")[0]
    page.goto(f"{running.url}/video-tags/models")
    expect(page.locator("a.pending").first).to_have_text("awaiting review")
    shown = [f"Promote model version {candidate} to production?", f"{gap:.4f}", f"{production_gap:.4f}"]
    _answer_in_the_ui(page, running, approved_run, "Approve", shown, "review.png", tmp_path)
    _finished(running, rest, "yt8m_train", approved_run)
    assert in_transaction(db_url, registry.production, "frame")["version"] == candidate
    assert in_transaction(db_url, registry.get_version, production)["status"] == "archived"
    decided = in_transaction(db_url, reviews.review, asked["id"])
    assert (decided["decision"], decided["decided_by"]) == ("approved", running.user)

    rejected_run = _train_for_review(running, rest, seeded["parquet"])
    rejected = _version_of_run(db_url, rejected_run)
    _answer_in_the_ui(page, running, rejected_run, "Reject", [f"model version {rejected}"], None, tmp_path)
    _finished(running, rest, "yt8m_train", rejected_run)
    assert in_transaction(db_url, registry.get_version, rejected)["status"] == "rejected"
    assert in_transaction(db_url, registry.production, "frame")["version"] == candidate
    assert in_transaction(db_url, reviews.latest_by_version, [rejected])[rejected]["decided_by"] == running.user

    page.goto(f"{running.url}/video-tags/models/{candidate}")
    expect(page.get_by_text(f"approved by {running.user}")).to_be_visible()
    review_row = page.locator("table.reviews tr", has=page.locator("td.who"))
    expect(review_row.locator("td.who")).to_have_text(running.user)  # who took the decision, and when
    expect(review_row.locator("time").last).to_have_attribute("datetime", re.compile(r"^\d{4}-\d\d-\d\dT"))
    _shot(page, tmp_path, "model_reviewed.png")


def test_a_night_still_queued_at_its_deadline_is_recorded(airflow):
    """The DAG's DeadlineAlert in a real scheduler and triggerer: the nightly DAG paused (as an operator
    might), a run triggered stays queued past VTAG_NIGHT_DEADLINE, and the callback records the miss."""
    running, seeded = airflow
    rest = running.rest()
    rest.ok("PATCH", "/dags/yt8m_nightly_inference", {"is_paused": True})
    run_id = None
    try:
        queued_at = datetime.now(UTC)
        body = {"logical_date": queued_at.isoformat()}
        run_id = rest.ok("POST", "/dags/yt8m_nightly_inference/dagRuns", body)["dag_run_id"]
        started = time.monotonic()
        miss = wait_for(lambda: _deadline_miss(seeded["db"], run_id), 180, f"a deadline miss for {run_id}", every=2)
        print(
            f"deadline miss recorded {time.monotonic() - started:.0f} s after the trigger ({NIGHT_DEADLINE} deadline)"
        )
        assert miss["dag_id"] == "yt8m_nightly_inference"
        deadline_time = miss["deadline_time"]
        deadline_time = deadline_time if deadline_time.tzinfo else deadline_time.replace(tzinfo=UTC)
        expected = settings.night_deadline(NIGHT_DEADLINE).total_seconds()
        assert abs((deadline_time - queued_at).total_seconds() - expected) < 15, (deadline_time, queued_at)
        assert rest.ok("GET", f"/dags/yt8m_nightly_inference/dagRuns/{quote(run_id, safe='')}")["state"] == "queued"
    finally:  # as found: the DAG unpaused, without this run (marked failed: it was never meant to score)
        if run_id is not None:
            rest.ok("PATCH", f"/dags/yt8m_nightly_inference/dagRuns/{quote(run_id, safe='')}", {"state": "failed"})
        rest.ok("PATCH", "/dags/yt8m_nightly_inference", {"is_paused": False})


def _deadline_miss(db_url: str, run_id: str) -> dict | None:
    from sqlalchemy import select

    from storage.database.db import engine_for
    from storage.database.schema import night_deadline_misses

    with engine_for(db_url).connect() as conn:
        found = conn.execute(select(night_deadline_misses).where(night_deadline_misses.c.dag_run_id == run_id)).first()
    return found._asdict() if found else None


def _required_but_empty(rest, dag_id: str) -> list[str]:
    """The UI's rule for blocking the trigger form: a param whose schema has a type without "null" and
    whose value is None or ""."""
    details = rest.ok("GET", f"/dags/{dag_id}/details")
    blocked = []
    for name, param in (details.get("params") or {}).items():
        kind = (param.get("schema") or {}).get("type")
        if kind and not (isinstance(kind, list) and "null" in kind) and param.get("value") in (None, ""):
            blocked.append(name)
    return blocked


def test_the_trigger_form_sets_k_for_a_night(airflow, page, tmp_path):
    """Airflow's trigger dialog for yt8m_nightly_inference: the params form shows k's default, takes 7,
    and the run it starts carries top_k 7 (checked through the REST API with the same login). Last in
    the module: the run is marked failed straight away, so that it scores nothing behind another test."""
    from playwright.sync_api import expect

    running, _ = airflow
    dag_id, top_k = "yt8m_nightly_inference", 7  # not the param's default (20)
    rest = running.rest()
    page.set_viewport_size({"width": 1280, "height": 1500})  # tall: the whole dialog in one shot
    page.goto(f"{running.url}/dags/{dag_id}")
    page.get_by_test_id("trigger-dag-button").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text(f"Trigger Dag - {dag_id}")
    field = dialog.get_by_label("Labels kept per video (k)")
    expect(field).to_have_value("20")  # the param's default, rendered from the DAG
    field.fill(str(top_k))
    expect(field).to_have_value(str(top_k))
    screenshot = _shot(page, tmp_path, "trigger_form_top_k.png")

    submit = dialog.get_by_test_id("trigger-dag-submit")
    try:
        expect(submit).to_be_enabled(timeout=10_000)
    except AssertionError:
        pytest.fail(
            f"the Trigger button stays disabled after setting k (see {screenshot}); params the form "
            f"takes as required (a type without 'null') and finds empty: {_required_but_empty(rest, dag_id)}"
        )
    with page.expect_response(
        lambda r: r.request.method == "POST" and r.url.endswith(f"/dags/{dag_id}/dagRuns")
    ) as posted:
        submit.click()
    assert posted.value.status == 200, posted.value.text()
    run_id = posted.value.json()["dag_run_id"]
    page.wait_for_url(re.compile(r"/runs/"))  # the UI moves on to the new run
    rest.ok("PATCH", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}", {"state": "failed"})

    runs = rest.ok("GET", f"/dags/{dag_id}/dagRuns?limit=100")["dag_runs"]
    ours = [run for run in runs if (run.get("conf") or {}).get("top_k") == top_k]
    assert [run["dag_run_id"] for run in ours] == [run_id], runs
    assert ours[0]["run_type"] == "manual" and ours[0]["triggered_by"] == "ui", ours[0]


def test_a_running_nights_page_moves_with_its_parts(airflow, page, tmp_path):
    """Opened while a night runs, the page follows it without a reload: a part done moves the parts, videos
    and rows shown; once the night has finished the page reloads itself with its duration and the deadline met.
    (A rescoring of given videos: its exports are not the night's, so the page lists none.)"""
    from datetime import timedelta

    from playwright.sync_api import expect

    from tasks.inference import finish_night, plan_night, tag_part

    running, seeded = airflow
    db_url = seeded["db"]
    videos = [r[0] for r in rows(db_url, "SELECT DISTINCT video_id FROM videos ORDER BY video_id")]
    plan = plan_night(
        db_url,
        NIGHT + timedelta(days=30),  # its own date: no other test's night is its night before
        top_k=5,
        video_ids=videos,
        part_videos=20,
        exports_uri=str(tmp_path / "exports"),
    )
    assert len(plan.parts) >= 2
    page.goto(f"{running.url}/video-tags/nights/{plan.run_id}")
    progress = page.locator("table.progress")
    expect(progress.locator("[data-progress=parts]")).to_have_text(f"0 of {len(plan.parts)}")
    expect(progress.locator("[data-progress=status]")).to_have_text("running")

    tag_part(db_url, plan, plan.parts[0])
    first = row(db_url, f"SELECT videos_done FROM inference_parts WHERE run_id = {plan.run_id} AND part = 0")[0]
    expect(progress.locator("[data-progress=parts]")).to_have_text(f"1 of {len(plan.parts)}", timeout=20_000)
    expect(progress.locator(".videos")).to_have_text(f"{first:,} of {len(videos):,}")
    expect(progress.locator("[data-progress=eta]")).to_contain_text("in ")  # an estimate, in the future
    expect(page.locator("tr[data-part='0'] .status")).to_have_text("succeeded")
    _shot(page, tmp_path, "night_running.png")

    for part in plan.parts[1:]:
        tag_part(db_url, plan, part)
    finish_night(db_url, plan)
    expect(progress.locator("[data-progress=status]")).to_have_text("succeeded", timeout=20_000)  # reloaded
    expect(page.locator("th", has_text="duration")).to_be_visible()
    expect(progress.locator("[data-progress=deadline]")).to_contain_text("met: due")


def test_a_label_name_holding_markup_is_shown_as_text(airflow, page):
    """A name with HTML and script (the vocabulary is data) on the label page and in the search's suggestions:
    shown as its characters, never run."""
    from playwright.sync_api import expect

    running, seeded = airflow
    db_url = seeded["db"]
    hostile = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>Hostile'
    label = 3861  # a label none of the fixture's videos has: no other test shows its name
    in_transaction(db_url, lambda conn: conn.exec_driver_sql(
        "UPDATE labels SET name = ? WHERE label_id = ?", (hostile, label)))  # fmt: skip
    page.goto(f"{running.url}/video-tags/tags/labels/{label}")
    expect(page.get_by_role("heading", name=hostile)).to_be_visible()
    page.goto(f"{running.url}/video-tags/tags")
    page.locator("#q").press_sequentially("<img")
    wait_for(lambda: hostile in page.locator("#suggestions option").evaluate_all("os => os.map(o => o.value)"), 15,
             "the hostile name among the suggestions")  # fmt: skip
    assert page.evaluate("window.pwned") is None and page.locator("img[src=x]").count() == 0
