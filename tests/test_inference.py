"""Nightly inference, the predictions schema and the SQL users run, on SQLite and PostgreSQL."""

import csv
import pickle
import threading
from datetime import timedelta

import pytest
from sqlalchemy import text

from storage.database import catalog, prediction_writes
from storage.database.db import engine_for
from tasks import queries
from tasks.inference import InferenceError, NoProductionModel, run_inference
from tests.support.db import in_transaction
from tests.support.env import SHARED
from tests.support.worlds import NIGHT, TINY, stored_rows  # noqa: F401 (TINY, for test_dag_*)
from tests.support.worlds import build_world as _world
from tests.support.worlds import count as _count
from tests.support.worlds import row as _row
from tests.support.worlds import rows as _rows


@pytest.fixture
def world(raw_shards, tmp_path, db_url):
    """A database with the vocabulary, 50 ingested videos and a production model (raw_shards: conftest)."""
    return _world(raw_shards, tmp_path, db_url)


def test_vocabulary_loads_all_real_labels(db_url):
    from storage.database import db

    db.upgrade(db_url)
    assert in_transaction(db_url, catalog.load_vocabulary, str(SHARED / "yt8m" / "vocabulary.csv")) == 3862
    assert (
        in_transaction(db_url, catalog.load_vocabulary, str(SHARED / "yt8m" / "vocabulary.csv")) == 3862
    )  # a reload, no duplicates
    assert _count(db_url, "SELECT COUNT(*) FROM labels") == 3862
    assert _count(db_url, "SELECT COUNT(*) FROM labels WHERE name = ''") == 56
    assert _count(db_url, "SELECT name FROM labels WHERE label_id = 0") == "Game"


def test_nightly_run_writes_k_rows_per_video_and_reruns_replace(world):
    db_url = world["db"]
    report = run_inference(db_url, NIGHT, top_k=5, exports_uri=world["exports"])
    assert report.videos == 50 and report.rows_written == 250
    assert _count(db_url, "SELECT COUNT(*) FROM predictions") == 250
    assert _count(db_url, "SELECT COUNT(DISTINCT video_id) FROM predictions WHERE rank = 5") == 50
    assert _count(db_url, "SELECT COUNT(*) FROM production_labels WHERE label_name IS NULL") == 0
    assert _count(db_url, "SELECT status FROM inference_runs WHERE run_id = :r", r=report.run_id) == "succeeded"

    again = run_inference(db_url, NIGHT, top_k=5, exports_uri=world["exports"])
    assert again.run_id == report.run_id and again.rows_written == 250
    assert _count(db_url, "SELECT COUNT(*) FROM predictions") == 250  # replaced, never duplicated
    # The next night has nothing new to score: a night costs what arrived.
    assert run_inference(db_url, NIGHT + timedelta(days=1), top_k=5, exports_uri=world["exports"]).videos == 0


def test_exports_have_googles_csv_and_the_seeds_pickle(world):
    report = run_inference(world["db"], NIGHT, top_k=3, exports_uri=world["exports"])
    with open(report.exports[0], newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["VideoId", "LabelConfidencePairs"] and len(rows) == 51
    pairs = rows[1][1].split(" ")
    assert len(pairs) == 40  # top 20, label then score
    scores = [float(s) for s in pairs[1::2]]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    assert all(0 <= int(label) < 3862 for label in pairs[0::2])
    assert pairs[1] == f"{scores[0]:g}"
    with open(report.exports[1], "rb") as f:
        results = pickle.load(f)
    assert len(results) == 50 and len(results[0][1]) == 3 and results[0][0] == rows[1][0]


def test_a_run_killed_mid_write_is_not_complete_and_its_retry_finishes(world, monkeypatch):
    real_write, calls = prediction_writes.write_chunk, {"n": 0}

    def dies_on_third_chunk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ConnectionError("database went away mid-write")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(prediction_writes, "write_chunk", dies_on_third_chunk)
    with pytest.raises(ConnectionError):
        run_inference(world["db"], NIGHT, top_k=4, exports_uri=world["exports"], chunk_videos=8)
    run = dict(
        zip(
            ("status", "videos_done", "rows_written"),
            _row(world["db"], "SELECT status, videos_done, rows_written FROM inference_runs"),
        )
    )
    assert run["status"] == "failed" and run["rows_written"] == stored_rows(world["db"]) > 0

    monkeypatch.setattr(prediction_writes, "write_chunk", real_write)
    retry = run_inference(world["db"], NIGHT, top_k=4, exports_uri=world["exports"], chunk_videos=8)
    assert retry.videos == 50 and _count(world["db"], "SELECT COUNT(*) FROM predictions") == 200
    assert _row(world["db"], "SELECT status, videos_done, rows_written FROM inference_runs") == ("succeeded", 50, 200)


def test_two_dates_at_once_do_not_interfere(world):
    errors = []

    def night(day):
        try:
            run_inference(world["db"], NIGHT + timedelta(days=day), top_k=2, exports_uri=f"{world['exports']}/{day}")
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=night, args=(d,)) for d in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert _count(world["db"], "SELECT COUNT(*) FROM predictions") == 100  # each video once, whichever run got it
    assert _count(world["db"], "SELECT COUNT(*) FROM inference_runs WHERE status = 'succeeded'") == 2


def test_rescoring_given_videos_and_bad_requests(world):
    db_url = world["db"]
    run_inference(db_url, NIGHT, top_k=2, exports_uri=world["exports"])
    some = [r[0] for r in _rows(db_url, "SELECT video_id FROM videos ORDER BY video_id LIMIT 3")]
    rescored = run_inference(db_url, NIGHT + timedelta(hours=1), top_k=2, video_ids=some, exports_uri=world["exports"])
    assert rescored.videos == 3 and _count(db_url, "SELECT COUNT(*) FROM predictions") == 100
    assert run_inference(db_url, NIGHT, dry_run=True, video_ids=some).videos == 3
    with pytest.raises(InferenceError, match="never ingested at frame level: nope"):
        run_inference(db_url, NIGHT, video_ids=["nope"])
    with pytest.raises(InferenceError, match="top_k must be in 1..3862"):
        run_inference(db_url, NIGHT, top_k=0)
    from storage.database.registry import RegistryError

    with pytest.raises(RegistryError, match="model version 99 does not exist"):
        run_inference(db_url, NIGHT, model_version=99)
    with pytest.raises(NoProductionModel, match="no production model for level 'video'"):
        run_inference(db_url, NIGHT, level="video")


def test_every_query_runs_as_written(world):
    db_url = world["db"]
    first = run_inference(db_url, NIGHT, top_k=5, exports_uri=world["exports"])
    video = _rows(db_url, "SELECT video_id FROM videos WHERE split = 'validate' ORDER BY video_id LIMIT 1")[0][0]

    columns, rows = queries.run(db_url, "video_top_labels", {"video_id": video, "k": "3"})
    assert columns[:3] == ["rank", "label_id", "label_name"] and [r[0] for r in rows] == [1, 2, 3]
    assert [r[1] for r in rows] == [
        r[0]
        for r in _rows(db_url, "SELECT label_id FROM predictions WHERE video_id = :v ORDER BY rank LIMIT 3", v=video)
    ]

    top_label = rows[0][1]
    _, rows = queries.run(db_url, "label_top_videos", {"label_id": str(top_label), "limit": "100"})
    assert video in [r[0] for r in rows] and [r[1] for r in rows] == sorted((r[1] for r in rows), reverse=True)

    _, rows = queries.run(db_url, "run_label_counts", {"run_id": str(first.run_id), "k": "1", "limit": "1000"})
    assert sum(r[2] for r in rows) == 50

    _, rows = queries.run(db_url, "tagged_videos", {"limit": "6"})
    assert [r[1] for r in rows] == [1, 2, 3, 1, 2, 3] and all(r[3] for r in rows)  # label names resolved

    _, rows = queries.run(db_url, "runs", {"limit": "5"})
    assert rows[0][0] == first.run_id and rows[0][4] == "succeeded"

    _, rows = queries.run(db_url, "precision_at_k", {"model_version": str(world["version"]), "k": "1"})
    expected = (
        _count(
            db_url,
            "SELECT COUNT(*) FROM predictions p JOIN video_labels t ON t.video_id = p.video_id "
            "AND t.label_id = p.label_id WHERE p.rank = 1",
        )
        / 50
    )
    assert rows[0][0] == 50 and rows[0][1] == pytest.approx(expected)

    # At k = 3, against the definition itself: each video's share of true labels among its top 3, averaged
    # over the videos with ground truth.
    def by_definition():
        truth = {}
        for video, label in _rows(db_url, "SELECT video_id, label_id FROM video_labels"):
            truth.setdefault(video, set()).add(label)
        top = {}
        for video, label in _rows(db_url, "SELECT video_id, label_id FROM predictions WHERE rank <= 3"):
            top.setdefault(video, []).append(label)
        shares = [sum(label in truth[v] for label in labels) / 3 for v, labels in top.items() if v in truth]
        return len(shares), sum(shares) / len(shares)

    judged, expected = by_definition()
    _, rows = queries.run(db_url, "precision_at_k", {"model_version": str(world["version"]), "k": "3"})
    assert rows[0][0] == judged == 50 and rows[0][1] == pytest.approx(expected)
    # Judged as scored: a video's truth removed afterwards changes nothing until the video is scored again,
    # when its rows replace the old ones in the totals (and it leaves the average).
    gone = _rows(db_url, "SELECT MIN(video_id) FROM videos")[0][0]
    with engine_for(db_url).begin() as conn:
        conn.execute(text("DELETE FROM video_labels WHERE video_id = :v"), {"v": gone})
    assert queries.run(db_url, "precision_at_k", {"model_version": str(world["version"]), "k": "3"})[1] == rows
    run_inference(
        db_url, NIGHT + timedelta(hours=1), top_k=5, video_ids=[gone], exports_uri=world["exports"] + "/again"
    )
    assert _rows(db_url, "SELECT DISTINCT hit FROM predictions WHERE video_id = :v", v=gone) == [(None,)]
    judged, expected = by_definition()
    _, rows = queries.run(db_url, "precision_at_k", {"model_version": str(world["version"]), "k": "3"})
    assert rows[0][0] == judged == 49 and rows[0][1] == pytest.approx(expected)
    # A second model version with a different top label for some videos.
    with engine_for(db_url).begin() as conn:
        conn.execute(
            text(
                "INSERT INTO model_versions (level, preset, checkpoint_uri, config, data_uri, train_split, epochs, "
                "steps, status, created_at) VALUES ('frame', 'small', '/elsewhere/last.pt', '{}', '', 'train', 1, 1, "
                "'trained', CURRENT_TIMESTAMP)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO predictions (video_id, model_version, rank, label_id, score, run_id) "
                "SELECT video_id, :new, rank, CASE WHEN video_id = :v THEN label_id + 1 ELSE label_id END, score, run_id "
                "FROM predictions WHERE model_version = :old"
            ),
            {"new": world["version"] + 1, "old": world["version"], "v": video},
        )
    _, rows = queries.run(
        db_url, "top_label_changes", {"old_version": str(world["version"]), "new_version": str(world["version"] + 1)}
    )
    assert [(r[0], r[1], r[4]) for r in rows] == [(video, top_label, top_label + 1)]

    with pytest.raises(queries.QueryError, match="needs k="):
        queries.run(db_url, "video_top_labels", {"video_id": video})
    with pytest.raises(queries.QueryError, match="must be an integer"):
        queries.run(db_url, "video_top_labels", {"video_id": video, "k": "3; DROP TABLE predictions"})
    # Parameters are bound, never pasted into SQL: a hostile id is just an id that matches nothing.
    assert queries.run(db_url, "video_top_labels", {"video_id": "x' OR '1'='1", "k": "3"})[1] == []
