"""The Video tags pages in-process, through Airflow's real API app (create_app) and its simple auth manager:
refused without a token, and with one showing what the database and object store hold."""

import csv
import io
import json
import re
from html import escape as html_escape
from pathlib import Path

import pytest

from storage.objectstore import join
from tasks import queries
from tasks.inference import run_inference
from tests.support.worlds import NIGHT, build_world, row, rows

PAGES = ["/video-tags/", "/video-tags/models", "/video-tags/nights", "/video-tags/tags?video=x"]


@pytest.fixture
def client(airflow_api):
    return airflow_api


@pytest.fixture
def night(raw_shards, tiny_checkpoint, tmp_path, db_url, monkeypatch):
    """A production model and a night scored into the exports folder the DAG would use."""
    world = build_world(raw_shards, tmp_path, db_url, checkpoint=tiny_checkpoint)
    monkeypatch.setenv("VTAG_DB_URL", db_url)
    monkeypatch.setenv("VTAG_EXPORTS_URI", world["exports"])
    report = run_inference(db_url, NIGHT, top_k=5, exports_uri=join(world["exports"], f"{NIGHT:%Y-%m-%dT%H%M%S}"))
    run_id = row(db_url, "SELECT MAX(run_id) FROM inference_runs")[0]
    return {**world, "run_id": run_id, "report": report}


def test_pages_refuse_requests_without_a_valid_token(client):
    test_client, _ = client
    for page in PAGES + ["/video-tags/models/1/plots/loss.png", "/video-tags/nights/1/exports/predictions.csv"]:
        assert test_client.get(page).status_code == 401, page
        assert test_client.get(page, headers={"Authorization": "Bearer nonsense"}).status_code == 403, page


def test_pages_refuse_a_user_without_the_viewers_dag_permissions(client, night):
    """Logged in, but given no role: Airflow's own REST API refuses them its DAGs, and so does every page."""
    from tests.support.airflow_ui import NO_ROLE_USER

    test_client, admin = client
    ((username, password),) = NO_ROLE_USER.items()
    token = test_client.post("/auth/token", json={"username": username, "password": password})
    assert token.status_code == 201, token.text
    nobody = {"Authorization": f"Bearer {token.json()['access_token']}"}
    assert test_client.get("/api/v2/dags", headers=nobody).status_code == 403
    for page in PAGES + ["/video-tags/tags/suggest?q=a", f"/video-tags/nights/{night['run_id']}/progress"]:
        assert test_client.get(page, headers=nobody).status_code == 403, page
        assert test_client.get(page, headers=admin).status_code in (200, 404), page  # the same pages: allowed


def test_plugin_is_listed_in_the_ui_navigation(client):
    test_client, auth = client
    plugins = test_client.get("/api/v2/plugins", headers=auth).json()["plugins"]
    ours = next(p for p in plugins if p["name"] == "video_tags")
    view = ours["external_views"][0]
    assert (view["href"], view["url_route"], view["destination"], view["category"]) == (
        "/video-tags/",
        "video-tags",
        "nav",
        "browse",
    )


def test_models_page_shows_the_evaluated_gap(client, night):
    test_client, auth = client
    gap = row(night["db"], f"SELECT gap FROM evaluations WHERE model_version = {night['version']} ORDER BY id DESC")[0]
    for page in ("/video-tags/models", f"/video-tags/models/{night['version']}"):
        html = test_client.get(page, headers=auth)
        assert html.status_code == 200, html.text
        assert f"{gap:.4f}" in html.text
    assert "production" in html.text


def test_models_pages_put_a_candidate_beside_production_class_by_class(client, night):
    """A candidate (production's weights, perturbed) evaluated on the same videos: the Models page charts both
    versions on that yardstick, and it and the candidate's page show both evaluations side by side and name
    the classes that gained and lost most, with the APs evaluate_model recorded for each."""
    import torch

    from model import checkpoint
    from tasks.training import evaluate_model

    test_client, auth = client
    db_url, production = night["db"], night["version"]
    state = checkpoint.load(night["checkpoint"])
    torch.manual_seed(0)
    weights = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state["model"].items()}
    checkpoint.save(night["checkpoint"] + ".candidate", {**state, "model": weights, "step": state.get("step", 0) + 7})
    candidate = evaluate_model(night["checkpoint"] + ".candidate", night["parquet"], db_url)["version"]
    assert candidate == production + 1

    # What the pages must show, from the recorded per-class APs (their mean is each evaluation's mAP).
    deltas = rows(
        db_url,
        "SELECT m.label_id, l.name, m.average_precision - t.average_precision FROM evaluation_classes m "
        "JOIN evaluation_classes t ON t.label_id = m.label_id "
        "JOIN evaluations em ON em.id = m.evaluation_id JOIN evaluations et ON et.id = t.evaluation_id "
        "JOIN labels l ON l.label_id = m.label_id "
        f"WHERE em.model_version = {candidate} AND et.model_version = {production} ORDER BY 3 DESC, 1",
    )
    assert deltas and any(d[2] > 0 for d in deltas) and any(d[2] < 0 for d in deltas)
    for version in (production, candidate):
        mean_ap, recorded = row(
            db_url,
            "SELECT AVG(c.average_precision), MIN(e.map) FROM evaluation_classes c JOIN evaluations e "
            f"ON e.id = c.evaluation_id WHERE e.model_version = {version}",
        )
        assert mean_ap == pytest.approx(recorded, abs=1e-9)
    best, worst = deltas[0], min(deltas, key=lambda d: (d[2], d[0]))

    models = test_client.get("/video-tags/models", headers=auth).text
    assert models.count("<polyline") == 4 and models.count("<circle") == 8  # 4 metrics x 2 versions
    for html in (models, test_client.get(f"/video-tags/models/{candidate}", headers=auth).text):
        gained = _cells(html, "classes gained")
        lost = _cells(html, "classes lost")
        assert gained[0][0] == html_escape(best[1]) and gained[0][-1] == f"{best[2]:+.3f}"
        assert lost[0][0] == html_escape(worst[1]) and lost[0][-1] == f"{worst[2]:+.3f}"
        assert f'href="/video-tags/tags/labels/{best[0]}"' in html
        assert f'production, <a href="/video-tags/models/{production}">version {production}</a>' in html
    own = test_client.get(f"/video-tags/models/{production}", headers=auth).text
    assert "Against production" not in own  # production is not compared with itself


def test_model_plots_stream_the_stored_bytes(client, night):
    test_client, auth = client
    plot_uri = row(night["db"], f"SELECT plot_uri FROM evaluations WHERE model_version = {night['version']}")[0]
    name = plot_uri.rsplit("/", 1)[-1]
    html = test_client.get(f"/video-tags/models/{night['version']}", headers=auth).text
    assert f"/plots/{name}" in html
    got = test_client.get(f"/video-tags/models/{night['version']}/plots/{name}", headers=auth)
    assert got.status_code == 200 and got.content == Path(plot_uri).read_bytes()
    for bad in ("..%2F..%2Fetc%2Fpasswd", "nothing.png"):
        assert test_client.get(f"/video-tags/models/{night['version']}/plots/{bad}", headers=auth).status_code == 404
    assert test_client.get("/video-tags/models/999999", headers=auth).status_code == 404


def test_night_page_shows_its_videos_and_exports(client, night):
    test_client, auth = client
    done, total = row(
        night["db"], f"SELECT videos_done, videos_total FROM inference_runs WHERE run_id = {night['run_id']}"
    )
    html = test_client.get(f"/video-tags/nights/{night['run_id']}", headers=auth)
    assert html.status_code == 200, html.text
    assert re.search(rf'class="videos">{done:,} of {total:,}<', html.text) and total > 0
    assert "<svg" in html.text and "<rect" in html.text
    listing = test_client.get("/video-tags/nights", headers=auth).text
    assert f"/video-tags/nights/{night['run_id']}" in listing
    export = join(night["exports"], f"{NIGHT:%Y-%m-%dT%H%M%S}", "predictions.csv")
    got = test_client.get(f"/video-tags/nights/{night['run_id']}/exports/predictions.csv", headers=auth)
    assert got.status_code == 200 and got.content == Path(export).read_bytes()
    for bad in ("..%2Fpredictions.csv", "parts"):
        assert test_client.get(f"/video-tags/nights/{night['run_id']}/exports/{bad}", headers=auth).status_code == 404


def test_a_running_nights_page_follows_its_parts(client, raw_shards, tiny_checkpoint, tmp_path, db_url, monkeypatch):
    """While a night runs, its page and the figures the page polls (`/progress`) are its parts' committed
    counters: parts done of total, videos and rows so far, rate, estimated finish, the deadline; the link to
    the Airflow run that scores it. Once it has finished: its duration, no estimate."""
    from datetime import UTC, datetime, timedelta

    from tasks.inference import finish_night, plan_night, tag_part

    test_client, auth = client
    world = build_world(raw_shards, tmp_path, db_url, checkpoint=tiny_checkpoint)
    monkeypatch.setenv("VTAG_DB_URL", db_url)
    monkeypatch.setenv("VTAG_NIGHT_DEADLINE", "2h")
    plan = plan_night(
        db_url, NIGHT, top_k=5, exports_uri=world["exports"], part_videos=20, airflow_run_id="manual__2026-01-02<x>"
    )
    assert len(plan.parts) >= 2
    page = f"/video-tags/nights/{plan.run_id}"

    def figures():
        got = test_client.get(page + "/progress", headers=auth)
        assert got.status_code == 200, got.text
        return got.json()

    before = figures()
    assert (before["status"], before["parts_done"], before["videos_done"]) == ("running", 0, 0)
    assert before["eta"] is None and before["videos_total"] == 50 and before["parts_total"] == len(plan.parts)
    tag_part(db_url, plan, plan.parts[0])
    first = row(
        db_url, f"SELECT videos_done, rows_written FROM inference_parts WHERE run_id = {plan.run_id} AND part = 0"
    )
    now = figures()
    assert (now["parts_done"], now["videos_done"], now["rows_written"]) == (1, first[0], first[1]) and first[0] > 0
    assert now["shown"]["parts"] == f"1 of {len(plan.parts)}" and now["shown"]["videos"] == f"{first[0]} of 50"
    started = row(db_url, f"SELECT started_at FROM inference_runs WHERE run_id = {plan.run_id}")[0]
    started = datetime.fromisoformat(str(started)).replace(tzinfo=UTC)  # stored in UTC (SQLite: without offset)
    assert datetime.fromisoformat(now["deadline"]) == started + timedelta(hours=2)  # VTAG_NIGHT_DEADLINE
    assert now["videos_per_s"] > 0 and datetime.fromisoformat(now["eta"]) > started
    html = test_client.get(page, headers=auth).text
    assert f'data-progress="parts">1 of {len(plan.parts)}<' in html and "/progress" in html  # the page polls
    assert 'href="/dags/yt8m_nightly_inference/runs/manual__2026-01-02%3Cx%3E"' in html  # escaped in the URL
    assert "estimated finish" in html and "written when the night finishes" in html

    for part in plan.parts[1:]:
        tag_part(db_url, plan, part)
    finish_night(db_url, plan)
    done = figures()
    assert (done["status"], done["parts_done"], done["videos_done"], done["eta"]) == (
        "succeeded",
        len(plan.parts),
        50,
        None,
    )
    assert done["shown"]["deadline"].startswith("met: due ")  # finished well within VTAG_NIGHT_DEADLINE
    html = test_client.get(page, headers=auth).text
    assert "estimated finish" not in html and "<th>duration</th>" in html and "/progress" not in html


def _cells(html: str, table: str) -> list[list[str]]:
    """The text of each row's cells of `<table class="data {table}">` (links and score bars as their text)."""
    body = html.split(f'<table class="data {table}">', 1)[1].split("</table>", 1)[0]
    return [
        [re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", tr, re.S)]
        for tr in re.findall(r"<tr>(.*?)</tr>", body, re.S)[1:]
    ]


def test_tags_pages_show_the_shared_queries_rows_for_people_with_links_both_ways(client, night):
    test_client, auth = client
    db_url = night["db"]
    video = row(db_url, "SELECT MIN(video_id) FROM predictions")[0]
    _, expected = queries.run(db_url, "video_top_labels", {"video_id": video, "k": 50})
    opened = test_client.get(f"/video-tags/tags?video={video}", headers=auth, follow_redirects=False)
    assert opened.status_code == 303 and opened.headers["location"] == f"/video-tags/tags/videos/{video}"
    html = test_client.get(f"/video-tags/tags/videos/{video}", headers=auth).text
    assert expected and _cells(html, "labels") == [
        [str(rank), name or f"label {label}", str(label), f"{score:.3f}", str(version)]
        for rank, label, name, score, version in expected
    ]  # scores as people read them: 3 decimals, beside a bar
    assert all(f'href="/video-tags/tags/labels/{r[1]}"' in html for r in expected)  # video -> its labels
    assert f'href="/video-tags/nights/{night["run_id"]}"' in html  # the night that wrote them
    truth = [t for (t,) in rows(db_url, "SELECT label_id FROM video_labels WHERE video_id = :v", v=video)]
    assert truth and all(f'href="/video-tags/tags/labels/{t}"' in html.split("Ground truth", 1)[1] for t in truth)

    label = expected[0][1]
    _, top = queries.run(db_url, "label_top_videos", {"label_id": label, "limit": 50})
    html = test_client.get(f"/video-tags/tags/labels/{label}", headers=auth).text
    assert top and _cells(html, "top") == [[v, f"{score:.3f}", str(rank)] for v, score, rank in top]
    assert f'href="/video-tags/tags/videos/{video}"' in html  # label -> its videos, back to ours
    videos, judged, hits = rows(
        db_url, f"SELECT SUM(videos), SUM(judged), SUM(hits) FROM inference_label_counts WHERE label_id = {label}"
    )[0]
    night_row = _cells(html, "nights")[0]
    assert night_row[3] == f"{videos:,}" and night_row[4] == f"{judged:,}"
    assert night_row[5] == (f"{100 * hits / judged:.1f}%" if judged else "")
    assert "SELECT video_id, score, rank" in html  # the SQL that gives these rows, for psql

    # CSV downloads hold exactly the query's rows
    got = test_client.get(f"/video-tags/tags/labels/{label}/videos.csv", headers=auth)
    assert got.status_code == 200 and got.headers["content-type"].startswith("text/csv")
    assert list(csv.reader(io.StringIO(got.text))) == [["video_id", "score", "rank"]] + [
        [v, str(score), str(rank)] for v, score, rank in top
    ]
    got = test_client.get(f"/video-tags/tags/videos/{video}/labels.csv", headers=auth)
    assert list(csv.reader(io.StringIO(got.text)))[1:] == [["" if c is None else str(c) for c in r] for r in expected]

    # search: a label by name, then by id, goes to its page; a prefix gives suggestions
    name = expected[0][2]
    by_name = test_client.get("/video-tags/tags", params={"q": name}, headers=auth, follow_redirects=False)
    assert by_name.headers["location"] == f"/video-tags/tags/labels/{label}"
    by_id = test_client.get("/video-tags/tags", params={"label": str(label)}, headers=auth, follow_redirects=False)
    assert by_id.headers["location"] == f"/video-tags/tags/labels/{label}"
    offered = test_client.get("/video-tags/tags/suggest", params={"q": name[:3].lower()}, headers=auth).json()
    assert {"kind": "label", "id": label, "name": name} in offered or len(offered) == 20
    assert {"kind": "video", "id": video, "name": video} in test_client.get(
        "/video-tags/tags/suggest", params={"q": video}, headers=auth
    ).json()
    bad = test_client.get("/video-tags/tags?label=-5", headers=auth)
    assert bad.status_code == 200 and "parameter label_id must be" in bad.text
    assert test_client.get("/video-tags/tags/videos/nosuchvideo", headers=auth).status_code == 404


def test_names_holding_html_are_shown_as_text(client, night):
    test_client, auth = client
    db_url = night["db"]
    video = row(db_url, "SELECT MIN(video_id) FROM predictions")[0]
    label = row(db_url, f"SELECT label_id FROM predictions WHERE video_id = '{video}' AND rank = 1")[0]
    from sqlalchemy import text

    from storage.database.db import engine_for

    with engine_for(db_url).begin() as conn:
        conn.execute(
            text("UPDATE labels SET name = :n WHERE label_id = :l"), {"n": "<script>alert(1)</script>&", "l": label}
        )
    for page in (f"/video-tags/tags/videos/{video}", f"/video-tags/tags/labels/{label}"):
        html = test_client.get(page, headers=auth).text
        assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;&amp;" in html, page


def test_a_videos_page_shows_its_segments_on_a_timeline(client, night):
    test_client, auth = client
    video = row(night["db"], "SELECT MIN(video_id) FROM predictions")[0]
    html = test_client.get(f"/video-tags/tags/videos/{video}", headers=auth).text
    assert "no segments" in html  # the night kept none
    exports = join(night["exports"], "rescored")
    run_inference(night["db"], NIGHT, top_k=5, video_ids=[video], segments=4, exports_uri=exports)
    _, expected = queries.run(night["db"], "video_segments", {"video_id": video})
    html = test_client.get(f"/video-tags/tags/videos/{video}", headers=auth).text
    timeline = re.search(r'<svg[^>]*class="timeline".*?</svg>', html, re.S).group(0)
    hovers = re.findall(r'<rect class="segment"[^>]*><title>(.*?)</title>', timeline)
    assert len(expected) == 4 and sorted(hovers) == sorted(
        html_escape(f"{name}: {start}-{end} s, score {score:.3f}") for _, start, end, _, name, score, _ in expected
    )
    assert _cells(html, "segments") == [
        [str(rank), str(start), str(end), html_escape(name), f"{score:.3f}"]
        for rank, start, end, _, name, score, _ in expected
    ]


def test_connections_resolve_from_the_metadata_db_outside_a_task(client, monkeypatch):
    """In the API server the Task SDK's lookup skips the metadata database (no supervisor comms):
    airflow_glue.config must still find a connection defined there, as the pages need it."""
    from airflow.models.connection import Connection
    from airflow.sdk import Connection as SdkConnection
    from airflow.sdk.exceptions import AirflowNotFoundException
    from airflow.utils.session import create_session

    from airflow_glue import config as airflow_config

    monkeypatch.delenv("AIRFLOW_CONN_YT8M_DB", raising=False)
    with create_session() as session:
        session.add(
            Connection(conn_id="yt8m_db", conn_type="sqlite", extra=json.dumps({"sqlalchemy_url": "sqlite:////x.db"}))
        )
    try:
        with pytest.raises(AirflowNotFoundException):
            SdkConnection.get("yt8m_db")
        assert airflow_config.db_url() == "sqlite:////x.db"
    finally:
        with create_session() as session:
            session.query(Connection).filter(Connection.conn_id == "yt8m_db").delete()
    monkeypatch.setenv("VTAG_DB_URL", "sqlite:////fallback.db")
    assert airflow_config.db_url() == "sqlite:////fallback.db"
