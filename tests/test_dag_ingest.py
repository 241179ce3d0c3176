"""The yt8m_ingest DAG run end to end with dag.test(): mapped batches, quarantine, manifest, asset event."""

import re

import pytest

from storage.database import manifest
from tasks.synth import SynthConfig, synth
from tests.support.db import in_transaction
from tests.support.shards import flip_byte, record_offsets, write_tiny_shards

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
        query = (
            select(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetModel.name == "yt8m_parquet")
        )
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
    assert [states[("convert_batch", i)] for i in range(3)] == ["success", "failed", "success"]  # only the bad shard
    names = {ti.map_index: ti.rendered_map_index for ti in run.get_task_instances() if ti.task_id == "convert_batch"}
    assert names == {i: f"train000{i}.tfrecord" for i in range(3)}  # few shards: one a batch, named by it
    assert states[("publish_asset", -1)] == "success"
    assert states[("all_shards_converted", -1)] == "upstream_failed"
    assert run.state == "failed"  # the run shows that a shard was quarantined

    assert sorted(p.name for p in dest.rglob("*.parquet")) == ["train0000.parquet", "train0002.parquet"]
    rows = {r["source_uri"].rsplit("/", 1)[-1]: r for r in in_transaction(db_url, manifest.rows, str(dest))}
    assert rows["train0001.tfrecord"]["status"] == "failed" and rows["train0001.tfrecord"]["error_record"] == 2
    assert rows["train0000.tfrecord"]["rows"] == 6

    events = _asset_events()
    assert len(events) == events_before + 1
    assert (events[-1]["dest"], events[-1]["shards"], events[-1]["rows"]) == (str(dest), 2, 12)
    assert sorted(events[-1]["outputs"]) == [
        f"{dest}/frame/train/train0000.parquet",
        f"{dest}/frame/train/train0002.parquet",
    ]

    # Rerun after the bad shard is replaced: only that shard is converted, and the run succeeds.
    synth(str(tmp_path / "fixed"), SynthConfig("frame", "train", shards=2, videos_per_shard=6, seed=4))
    (tmp_path / "fixed" / "train0001.tfrecord").replace(raw / "train0001.tfrecord")
    rerun = ingest_dag.test(run_conf={"src": str(raw), "dest": str(dest)})
    assert rerun.state == "success"
    assert [k for k in _states(rerun) if k[0] == "convert_batch"] == [("convert_batch", 0)]
    assert _asset_events()[-1]["outputs"] == [f"{dest}/frame/train/train0001.parquet"]
    assert len(in_transaction(db_url, manifest.rows, str(dest))) == 3


def _catalogued(db_url: str, raw) -> tuple[int, int]:
    """(rows, distinct video ids) of the catalogue's videos that came from `raw`."""
    from sqlalchemy import text

    from storage.database.db import engine_for

    with engine_for(db_url).connect() as conn:
        return tuple(
            conn.execute(
                text("SELECT COUNT(*), COUNT(DISTINCT video_id) FROM videos WHERE source_uri LIKE :raw"),
                {"raw": f"{raw}/%"},
            ).one()
        )


def _finished(db_url: str, dest) -> dict:
    return {r["source_uri"]: (r["status"], r["finished_at"]) for r in in_transaction(db_url, manifest.rows, str(dest))}


# SQLite only: 1,100 conversions take most of a minute on either database, and the end-to-end test above
# already runs the same DAG on both.
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_ingest_dag_over_more_shards_than_airflow_maps(ingest_dag, tmp_path, dag_db_url, capfd):
    """1,100 shards (Airflow maps at most 1,024 tasks), one of them bad: batches, quarantine, repair, rerun."""
    from tasks.ingest import MAX_BATCHES

    db_url, shards = dag_db_url, 1100
    raw, dest = tmp_path / "raw", tmp_path / "parquet"
    write_tiny_shards(raw, range(shards))
    bad = raw / "train0500.tfrecord"
    flip_byte(bad, 30)  # inside the first record's data: a data CRC mismatch

    run = ingest_dag.test(run_conf={"src": str(raw), "dest": str(dest)})

    batches = {ti.map_index: ti for ti in run.get_task_instances() if ti.task_id == "convert_batch"}
    assert len(batches) == MAX_BATCHES <= 1024
    failed = [ti for ti in batches.values() if ti.state != "success"]
    assert len(failed) == 1 and failed[0].state == "failed" and failed[0].try_number == 1  # bad content: no retry
    first, last, count = re.fullmatch(
        r"train(\d{4})\.tfrecord \.\. train(\d{4})\.tfrecord \((\d+) shards\)", failed[0].rendered_map_index
    ).groups()
    assert int(first) <= 500 <= int(last) and int(count) == int(last) - int(first) + 1 in (8, 9)
    assert re.search(
        rf"quarantined 1 of {count} shards:\n{re.escape(str(bad))}: record 0 at byte offset 0: .*CRC",
        capfd.readouterr().out,
    )
    states = {ti.task_id: ti.state for ti in run.get_task_instances() if ti.map_index == -1}
    assert (states["publish_asset"], states["all_shards_converted"], run.state) == (
        "success",
        "upstream_failed",
        "failed",
    )

    rows = _finished(db_url, dest)
    assert len(rows) == shards and [uri for uri, (status, _) in rows.items() if status != "succeeded"] == [str(bad)]
    assert "CRC" in in_transaction(db_url, manifest.rows, str(dest))[500]["error"]
    assert len(list(dest.rglob("*.parquet"))) == shards - 1
    event = _asset_events()[-1]  # the failed batch's 7 or 8 good shards count too
    assert (event["dest"], event["shards"], event["rows"], len(event["outputs"])) == (
        str(dest),
        shards - 1,
        shards - 1,
        100,
    )
    assert event["outputs"][0] == f"{dest}/frame/train/train0000.parquet"

    # Repaired, the bad shard alone converts; every other shard stays converted exactly once.
    write_tiny_shards(raw, [500])
    repair = ingest_dag.test(run_conf={"src": str(raw), "dest": str(dest)})
    assert repair.state == "success"
    assert [
        (ti.map_index, ti.rendered_map_index) for ti in repair.get_task_instances() if ti.task_id == "convert_batch"
    ] == [(0, "train0500.tfrecord")]
    repaired = _finished(db_url, dest)
    assert {uri for uri in rows if repaired[uri] != rows[uri]} == {str(bad)}
    assert {status for status, _ in repaired.values()} == {"succeeded"}
    assert len(list(dest.rglob("*.parquet"))) == shards
    assert _catalogued(db_url, raw) == (shards, shards)
    assert _asset_events()[-1]["outputs"] == [f"{dest}/frame/train/train0500.parquet"]

    # Nothing left to do: a rerun maps no batch and converts nothing.
    events = len(_asset_events())
    rerun = ingest_dag.test(run_conf={"src": str(raw), "dest": str(dest)})
    assert rerun.state == "success"
    assert [ti.state for ti in rerun.get_task_instances() if ti.task_id == "convert_batch"] in ([], ["skipped"])
    assert _finished(db_url, dest) == repaired and len(_asset_events()) == events
