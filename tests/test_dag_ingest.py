"""The yt8m_ingest DAG run end to end with dag.test(): mapped tasks, quarantine, manifest, asset event."""

import pytest

from storage import manifest
from tasks.synth import SynthConfig, synth
from tests.shards import flip_byte, record_offsets

pytestmark = pytest.mark.airflow


@pytest.fixture
def ingest_dag(dagbag):
    return dagbag.get_dag("yt8m_ingest")


def _states(dag_run) -> dict:
    return {(ti.task_id, ti.map_index): ti.state for ti in dag_run.get_task_instances()}


def _asset_events():
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        query = select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id).where(AssetModel.name == "yt8m_parquet")
        return [event.extra for event in session.scalars(query)]


def test_ingest_dag_end_to_end(ingest_dag, tmp_path, dag_db_url):
    db_url = dag_db_url
    raw, dest = tmp_path / "raw", tmp_path / "parquet"
    synth(str(raw), SynthConfig("frame", "train", shards=3, videos_per_shard=6, seed=4))
    flip_byte(raw / "train0001.tfrecord", record_offsets(raw / "train0001.tfrecord")[2] + 500)
    events_before = len(_asset_events())

    run = ingest_dag.test(run_conf={"src": str(raw), "dest": str(dest), "pattern": "train*.tfrecord"})

    states = _states(run)
    assert states[("list_pending_shards", -1)] == "success"
    assert [states[("convert_shard", i)] for i in range(3)] == ["success", "failed", "success"]  # only the bad shard
    assert states[("publish_asset", -1)] == "success"
    assert states[("all_shards_converted", -1)] == "upstream_failed"
    assert run.state == "failed"  # the run shows that a shard was quarantined

    assert sorted(p.name for p in dest.rglob("*.parquet")) == ["train0000.parquet", "train0002.parquet"]
    rows = {r["source_uri"].rsplit("/", 1)[-1]: r for r in manifest.rows(db_url, str(dest))}
    assert rows["train0001.tfrecord"]["status"] == "failed" and rows["train0001.tfrecord"]["error_record"] == 2
    assert rows["train0000.tfrecord"]["rows"] == 6

    events = _asset_events()
    assert len(events) == events_before + 1
    assert events[-1]["dest"] == str(dest) and events[-1]["rows"] == 12
    assert sorted(events[-1]["outputs"]) == [f"{dest}/frame/train/train0000.parquet", f"{dest}/frame/train/train0002.parquet"]

    # Rerun after the bad shard is replaced: only that shard is converted, and the run succeeds.
    synth(str(tmp_path / "fixed"), SynthConfig("frame", "train", shards=2, videos_per_shard=6, seed=4))
    (tmp_path / "fixed" / "train0001.tfrecord").replace(raw / "train0001.tfrecord")
    rerun = ingest_dag.test(run_conf={"src": str(raw), "dest": str(dest)})
    assert rerun.state == "success"
    assert [k for k in _states(rerun) if k[0] == "convert_shard"] == [("convert_shard", 0)]
    assert _asset_events()[-1]["outputs"] == [f"{dest}/frame/train/train0001.parquet"]
    assert len(manifest.rows(db_url, str(dest))) == 3
