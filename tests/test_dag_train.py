"""The yt8m_train DAG end to end with dag.test(): train -> register -> evaluate -> promote."""

import pytest

from storage.database import registry
from storage.database.db import engine_for
from tasks.ingest import ingest
from tasks.synth import SynthConfig, synth
from tests.support.db import in_transaction

pytestmark = pytest.mark.airflow


def test_train_dag_writes_model_versions_and_evaluations(dagbag, tmp_path, monkeypatch, dag_db_url):
    db_url = dag_db_url
    monkeypatch.setenv("VTAG_MODELS_URI", str(tmp_path / "models"))
    synth(str(tmp_path / "raw"), SynthConfig("frame", "train", shards=2, videos_per_shard=16, num_labels=10))
    synth(str(tmp_path / "raw"), SynthConfig("frame", "validate", shards=1, videos_per_shard=12, num_labels=10))
    parquet = str(tmp_path / "parquet")
    assert not ingest(str(tmp_path / "raw"), parquet, db_url).failed

    dag = dagbag.get_dag("yt8m_train")
    conf = {"data": parquet, "preset": "small", "epochs": 2, "batch_size": 8, "max_frames": 30}
    run = dag.test(run_conf=conf)
    assert run.state == "success", {ti.task_id: ti.state for ti in run.get_task_instances()}

    from sqlalchemy import text

    with engine_for(db_url).connect() as conn:
        versions = conn.execute(
            text("SELECT version, status, checkpoint_uri, epochs, run_id FROM model_versions")
        ).all()
        evaluations = conn.execute(text("SELECT model_version, split, gap, videos FROM evaluations")).all()
    assert len(versions) == 1 and versions[0].status == "production" and versions[0].epochs == 2
    assert versions[0].checkpoint_uri.startswith(str(tmp_path / "models")) and versions[0].run_id == run.run_id
    assert [(e.model_version, e.split, e.videos) for e in evaluations] == [(versions[0].version, "validate", 12)]

    # A worse model from a later run is registered but does not replace production.
    second = dag.test(run_conf={**conf, "learning_rate": 1e-7, "epochs": 1})
    assert second.state == "success"
    assert (
        in_transaction(db_url, registry.production, "frame")["version"] == versions[0].version
    )  # not better: not promoted


def test_train_dag_is_train_register_evaluate_promote(dagbag):
    dag = dagbag.get_dag("yt8m_train")
    upstream = {task.task_id: sorted(task.upstream_task_ids) for task in dag.tasks}
    assert upstream == {"train": [], "register": ["train"], "evaluate": ["register"], "promote": ["evaluate"]}
