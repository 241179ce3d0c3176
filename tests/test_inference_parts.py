"""A night in parts: planning, parts run apart and retried, exports joined in flat memory, retirement."""

import csv
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from storage.database import partitions, prediction_writes, runs
from storage.formats import exports
from tasks import queries
from tasks.inference import (
    InferenceError,
    cut_parts,
    finish_night,
    plan_night,
    retire_old_versions,
    run_inference,
    tag_part,
)
from tests.support.db import in_transaction
from tests.support.worlds import NIGHT, VIDEOS, build_world, count, rows


@pytest.fixture
def world(raw_shards, tiny_checkpoint, tmp_path, db_url):
    return build_world(raw_shards, tmp_path, db_url, checkpoint=tiny_checkpoint)


def _check_night(world, k: int, run_id: int, uris: list[str]) -> None:
    db_url = world["db"]
    per_video = rows(
        db_url,
        "SELECT video_id, COUNT(*), MIN(rank), MAX(rank), COUNT(DISTINCT run_id) FROM predictions GROUP BY video_id",
    )
    assert len(per_video) == VIDEOS and {tuple(r[1:]) for r in per_video} == {(k, 1, k, 1)}
    assert rows(db_url, "SELECT run_id, status, videos_total, videos_done, rows_written FROM inference_runs") == [
        (run_id, "succeeded", VIDEOS, VIDEOS, VIDEOS * k)
    ]
    with open(uris[0], newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == ["VideoId", "LabelConfidencePairs"] and sorted(r[0] for r in lines[1:]) == sorted(
        r[0] for r in per_video
    )
    with open(uris[1], "rb") as f:
        results = pickle.load(f)
    assert [r[0] for r in results] == [r[0] for r in lines[1:]] and {len(r[1]) for r in results} == {k}
    stored = dict(
        ((v, rank), label) for v, rank, label in rows(db_url, "SELECT video_id, rank, label_id FROM predictions")
    )
    assert all(stored[(video, rank + 1)] == label for video, pairs in results for rank, (label, _) in enumerate(pairs))
    _, counts = queries.run(db_url, "run_label_counts", {"run_id": str(run_id), "k": str(k), "limit": "5000"})
    expected = rows(db_url, "SELECT label_id, COUNT(*) FROM predictions GROUP BY label_id")
    assert sorted((r[0], r[2]) for r in counts) == sorted(expected)  # the parts' counts are the rows' counts


def test_cut_parts_is_contiguous_bounded_and_one_part_when_small():
    files = [(f"f{i:04d}", 10) for i in range(100)]
    assert [(p["first_uri"], p["last_uri"], p["videos"]) for p in cut_parts(files, 1000)] == [("f0000", "f0099", 1000)]
    parts = cut_parts(files, 25)
    assert len(parts) == 34 and {p["videos"] for p in parts[:-1]} == {30} and parts[-1]["videos"] == 10
    assert sum(p["files"] for p in parts) == 100 and [p["part"] for p in parts] == list(range(34))
    assert all(a["last_uri"] < b["first_uri"] for a, b in zip(parts, parts[1:]))
    bounded = cut_parts([(f"f{i:05d}", 530) for i in range(11_532)], 1, max_parts=512)  # the real dataset's shape
    assert len(bounded) <= 512 and sum(p["videos"] for p in bounded) == 11_532 * 530
    assert cut_parts([], 10) == []
    with pytest.raises(InferenceError, match="part_videos must be at least 1"):
        cut_parts(files, 0)


def test_a_night_in_several_parts_is_one_run_with_k_rows_per_video(world):
    report = run_inference(world["db"], NIGHT, top_k=4, exports_uri=world["exports"], part_videos=12)
    assert len(in_transaction(world["db"], runs.parts_of, report.run_id)) == 3  # three files of 20, 20 and 10 videos
    assert report.videos == VIDEOS and report.rows_written == VIDEOS * 4
    _check_night(world, 4, report.run_id, report.exports)
    assert sorted(p.name for p in (Path(world["exports"]) / "parts").iterdir()) == [  # each part's own, no temporary
        f"part-0000{i}.{kind}" for i in range(3) for kind in ("csv", "pickle-items")
    ]
    again = run_inference(
        world["db"], NIGHT, top_k=4, exports_uri=world["exports"], part_videos=30
    )  # a rerun, cut anew
    assert again.run_id == report.run_id and len(in_transaction(world["db"], runs.parts_of, report.run_id)) == 2
    _check_night(world, 4, report.run_id, again.exports)


def test_a_part_that_died_mid_write_is_retried_alone_without_duplicates(world, monkeypatch):

    db_url, k = world["db"], 3
    plan = plan_night(db_url, NIGHT, top_k=k, exports_uri=world["exports"], part_videos=12)
    assert len(plan.parts) == 3
    first = tag_part(db_url, plan, plan.parts[0], chunk_videos=4)

    real_write, calls = prediction_writes.write_chunk, {"n": 0}

    def dies_on_third_chunk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ConnectionError("worker lost mid-part")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(prediction_writes, "write_chunk", dies_on_third_chunk)
    with pytest.raises(ConnectionError):
        tag_part(db_url, plan, plan.parts[1], chunk_videos=4)
    monkeypatch.setattr(prediction_writes, "write_chunk", real_write)
    died = in_transaction(db_url, runs.parts_of, plan.run_id)[1]
    assert died["status"] == "failed" and 0 < died["rows_written"] < 20 * k and "worker lost" in died["error"]
    tag_part(db_url, plan, plan.parts[2], chunk_videos=4)
    with pytest.raises(InferenceError, match=r"parts not succeeded: 1 \(failed: ConnectionError"):
        finish_night(db_url, plan)  # what the DAG's finish task does while a part is still failed
    assert count(db_url, "SELECT status FROM inference_runs") == "failed"

    retried = tag_part(db_url, plan, plan.parts[1], chunk_videos=4)  # Airflow's retry of that mapped task alone
    assert retried.videos == 20 and first.videos == 20
    assert [p["attempts"] for p in in_transaction(db_url, runs.parts_of, plan.run_id)] == [1, 2, 1]
    report = finish_night(db_url, plan)
    _check_night(world, k, plan.run_id, report.exports)


def test_exporting_a_night_keeps_memory_flat(tmp_path):
    """The fragments stream to the store: the peak is one batch's, whether a part holds 20,000 or 200,000 videos."""
    rng = np.random.default_rng(0)
    labels = np.argsort(-rng.random((1000, 3862)), axis=1)[:, :20]
    scores = np.sort(rng.random((1000, 20)), axis=1)[:, ::-1]

    def peak(videos: int) -> int:
        out = str(tmp_path / f"exports-{videos}")
        tracemalloc.start()
        with exports.PartExports(out, 0, 20) as fragments:
            for start in range(0, videos, 1000):
                fragments.add([f"v{start + i:07d}" for i in range(1000)], labels, scores)
        exports.join_night(out, [0])
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        with open(f"{out}/{exports.PICKLE_NAME}", "rb") as f:
            assert len(pickle.load(f)) == videos
        return top

    small, large = peak(20_000), peak(200_000)
    print(
        f"peak traced memory while exporting: 20,000 videos {small / 1e6:.1f} MB, 200,000 videos {large / 1e6:.1f} MB"
    )
    assert large < 1.2 * small + 1_000_000


def _second_version(world) -> int:
    """A second version: the same weights saved again at another step (a version is its file's content)."""
    from model import checkpoint
    from tasks.training import evaluate_model

    state = checkpoint.load(world["checkpoint"])
    checkpoint.save(world["checkpoint"] + ".copy", {**state, "step": state.get("step", 0) + 1})
    version = evaluate_model(world["checkpoint"] + ".copy", world["parquet"], world["db"])["version"]
    assert version == world["version"] + 1
    return version


def test_top_label_changes_reads_the_versions_rank_one_index_alone(raw_shards, tiny_checkpoint, tmp_path, pg_url):
    """Each version's first night becomes its partition's base with the rank-1 index (migration 0014), vacuumed,
    so top_label_changes reads both versions from index-only scans in video order: no heap, no sort.
    (The planner is told to prefer indexes: with 50 videos a scan of everything costs it less.)"""
    world = build_world(raw_shards, tmp_path, pg_url, checkpoint=tiny_checkpoint)
    run_inference(pg_url, NIGHT, top_k=3, exports_uri=world["exports"])
    new = _second_version(world)
    run_inference(pg_url, NIGHT, top_k=3, model_version=new, exports_uri=world["exports"] + "/2")
    for version in (world["version"], new):
        table = partitions.base_name(version)
        assert rows(
            pg_url,
            "SELECT indexdef LIKE '%INCLUDE (label_id, score) WHERE (rank = 1)' FROM pg_indexes "
            "WHERE tablename = :t AND indexdef LIKE '%(video_id, model_version)%'",
            t=table,
        ) == [(True,)]
        assert count(pg_url, "SELECT relallvisible FROM pg_class WHERE relname = :t", t=table) > 0  # vacuumed

    sql = queries.available()["top_label_changes"].read_text()
    params = {"old_version": world["version"], "new_version": new}
    from sqlalchemy import text

    from storage.database.db import engine_for

    with engine_for(pg_url).begin() as conn:
        for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort", "enable_hashjoin"):
            conn.exec_driver_sql(f"SET LOCAL {setting} = off")
        plan = conn.execute(text("EXPLAIN (ANALYZE, FORMAT JSON) " + sql), params).scalar()[0]["Plan"]
        nodes = []

        def walk(node):
            nodes.append(node)
            for child in node.get("Plans", []):
                walk(child)

        walk(plan)
        scans = [n for n in nodes if n.get("Relation Name", "").startswith("predictions")]
        assert [
            (n["Node Type"], n["Index Name"].endswith("video_id_model_version_label_id_score_idx")) for n in scans
        ] == [("Index Only Scan", True)] * 2
        assert [n["Heap Fetches"] for n in scans] == [0, 0]
        assert not [n for n in nodes if n["Node Type"] == "Sort"]  # the index's order is the report's


def test_retiring_a_version_drops_its_predictions_only(world, db_url):
    from tasks.training import promote

    first = run_inference(db_url, NIGHT, top_k=2, exports_uri=world["exports"])
    second = run_inference(
        db_url, NIGHT, top_k=2, model_version=_second_version(world), exports_uri=world["exports"] + "/2"
    )
    assert second.videos == VIDEOS and count(db_url, "SELECT COUNT(*) FROM predictions") == 2 * VIDEOS * 2

    with pytest.raises(partitions.RetireError, match="is in production"):
        in_transaction(db_url, partitions.retire, world["version"])
    promote(db_url, world["version"] + 1)
    assert retire_old_versions(db_url, keep=1) == [world["version"]]
    assert count(db_url, "SELECT COUNT(*) FROM predictions") == VIDEOS * 2
    assert (
        count(db_url, "SELECT COUNT(*) FROM predictions WHERE model_version = :v", v=world["version"] + 1) == VIDEOS * 2
    )
    assert count(db_url, "SELECT COUNT(*) FROM inference_runs") == 2  # the runs stay as history
    assert count(db_url, "SELECT COUNT(*) FROM inference_label_counts WHERE run_id = :r", r=first.run_id) == 0
    assert count(db_url, "SELECT COUNT(*) FROM version_hits WHERE model_version = :v", v=world["version"]) == 0
    assert retire_old_versions(db_url, keep=1) == []  # nothing left to retire
    if db_url.startswith("postgresql"):
        old, new = (partitions.partition_name(v) for v in (world["version"], world["version"] + 1))
        assert count(db_url, "SELECT to_regclass(:t)::text", t=old) is None  # dropped, not emptied row by row
        assert count(db_url, "SELECT to_regclass(:t)::text", t=new) == new
