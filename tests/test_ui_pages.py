"""The Video tags pages in-process, through Airflow's real API app (create_app) and its simple auth manager:
refused without a token, and with one showing what the database and object store hold."""

import json
import re
from html import escape as html_escape
from pathlib import Path

import pytest

from storage.objectstore import join
from tasks import queries
from tasks.inference import run_inference
from tests.support.worlds import NIGHT, build_world, row

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
    assert re.search(rf'class="videos">{done}/{total}<', html.text) and total > 0
    assert "<svg" in html.text and "<rect" in html.text
    listing = test_client.get("/video-tags/nights", headers=auth).text
    assert f"/video-tags/nights/{night['run_id']}" in listing
    export = join(night["exports"], f"{NIGHT:%Y-%m-%dT%H%M%S}", "predictions.csv")
    got = test_client.get(f"/video-tags/nights/{night['run_id']}/exports/predictions.csv", headers=auth)
    assert got.status_code == 200 and got.content == Path(export).read_bytes()
    for bad in ("..%2Fpredictions.csv", "parts"):
        assert test_client.get(f"/video-tags/nights/{night['run_id']}/exports/{bad}", headers=auth).status_code == 404


def _cells(html: str) -> list[list[str]]:
    body = html.split("<table>", 1)[1]
    return [re.findall(r"<td>(.*?)</td>", tr) for tr in re.findall(r"<tr>(.*?)</tr>", body, re.S)[1:]]


def test_tags_pages_match_the_shared_queries(client, night):
    test_client, auth = client
    video = row(night["db"], "SELECT MIN(video_id) FROM predictions")[0]
    _, expected = queries.run(night["db"], "video_top_labels", {"video_id": video, "k": 50})
    html = test_client.get(f"/video-tags/tags?video={video}", headers=auth).text
    assert expected and _cells(html) == [[str(v) for v in r] for r in expected]
    label = expected[0][1]
    _, top = queries.run(night["db"], "label_top_videos", {"label_id": label, "limit": 50})
    html = test_client.get(f"/video-tags/tags?label={label}", headers=auth).text
    assert top and _cells(html) == [[str(v) for v in r] for r in top]
    by_name = test_client.get("/video-tags/tags", params={"label": expected[0][2]}, headers=auth).text
    assert _cells(by_name) == [[str(v) for v in r] for r in top]
    bad = test_client.get("/video-tags/tags?label=-5", headers=auth)
    assert bad.status_code == 200 and "parameter label_id must be" in bad.text


def test_tags_page_shows_a_videos_segments_on_a_timeline(client, night):
    test_client, auth = client
    video = row(night["db"], "SELECT MIN(video_id) FROM predictions")[0]
    html = test_client.get(f"/video-tags/tags?video={video}", headers=auth).text
    assert "no segments" in html  # the night kept none
    exports = join(night["exports"], "rescored")
    run_inference(night["db"], NIGHT, top_k=5, video_ids=[video], segments=4, exports_uri=exports)
    _, expected = queries.run(night["db"], "video_segments", {"video_id": video})
    html = test_client.get(f"/video-tags/tags?video={video}", headers=auth).text
    timeline = re.search(r'<svg[^>]*class="timeline".*?</svg>', html, re.S).group(0)
    hovers = re.findall(r'<rect class="segment"[^>]*><title>(.*?)</title>', timeline)
    assert len(expected) == 4 and sorted(hovers) == sorted(
        html_escape(f"{name}: {start}-{end} s, score {score:.3f}") for _, start, end, _, name, score, _ in expected
    )
    segment_table = html.split('<table class="segments">', 1)[1].split("</table>", 1)[0]
    cells = [re.findall(r"<td>(.*?)</td>", tr) for tr in re.findall(r"<tr>(.*?)</tr>", segment_table, re.S)[1:]]
    assert cells == [[str(v) for v in r] for r in expected]


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
