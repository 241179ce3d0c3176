"""yt8m_nightly_inference end to end with dag.test(), after a model was trained and promoted."""

from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from storage.database import catalog
from storage.database.db import engine_for
from tasks.ingest import ingest
from tasks.synth import SynthConfig, synth
from tasks.training import evaluate_model, promote, train_and_register
from tests.support.db import in_transaction
from tests.support.env import SHARED
from tests.test_inference import TINY

pytestmark = pytest.mark.airflow


def test_nightly_dag_tags_the_videos_that_arrived(dagbag, tmp_path, monkeypatch, dag_db_url):
    db_url = dag_db_url
    monkeypatch.setenv("VTAG_EXPORTS_URI", str(tmp_path / "exports"))
    dag = dagbag.get_dag("yt8m_nightly_inference")
    night = datetime(2030, 3, 1, 2, 0, tzinfo=UTC)

    synth(str(tmp_path / "raw"), SynthConfig("frame", "train", shards=1, videos_per_shard=24, num_labels=10))
    synth(str(tmp_path / "raw"), SynthConfig("frame", "validate", shards=1, videos_per_shard=8, num_labels=10))
    parquet = str(tmp_path / "parquet")
    assert not ingest(str(tmp_path / "raw"), parquet, db_url).failed
    assert dag.test(logical_date=night).state == "success"  # no production model yet: the night is skipped

    in_transaction(db_url, catalog.load_vocabulary, str(SHARED / "yt8m" / "vocabulary.csv"))
    trained = train_and_register(
        parquet, str(tmp_path / "model"), "frame", db_url, preset="small", overrides=TINY, progress=False
    )
    evaluate_model(trained["checkpoint_uri"], parquet, db_url)
    promote(db_url, trained["version"])

    run = dag.test(logical_date=night, run_conf={"top_k": 7, "part_videos": 10, "segments": 2})
    assert run.state == "success"
    states = sorted((ti.task_id, ti.map_index, ti.state) for ti in run.get_task_instances())
    assert states == [
        ("finish_night", -1, "success"),
        ("merge_night_layers", -1, "success"),
        ("plan_night", -1, "success"),
        ("retire_old_predictions", -1, "success"),
        ("tag_part", 0, "success"),
        ("tag_part", 1, "success"),
    ]  # 24 + 8 videos: two parts
    with engine_for(db_url).connect() as conn:
        per_video = conn.execute(
            text("SELECT video_id, COUNT(*), COUNT(label_name) FROM production_labels GROUP BY video_id")
        ).all()
        status = conn.execute(
            text("SELECT status, videos_done, rows_written, airflow_run_id FROM inference_runs")
        ).one()
        segments = conn.execute(text("SELECT COUNT(DISTINCT video_id), COUNT(*) FROM segment_predictions")).one()
    assert len(per_video) == 32 and {(n, named) for _, n, named in per_video} == {(7, 7)}
    assert status[:3] == ("succeeded", 32, 224) and status[3] == run.run_id
    export = tmp_path / "exports" / "2030-03-01T020000"
    assert len((export / "predictions.csv").read_text().splitlines()) == 33
    assert tuple(segments) == (32, 64)  # each video's best 2 segments, from both parts
    submission = (export / "segments.csv").read_text().splitlines()
    assert submission[0] == "Class,Segments" and sum(len(line.split(",")[1].split()) for line in submission[1:]) == 64
    assert len(list((export / "parts").iterdir())) == 6  # each part's own fragments
