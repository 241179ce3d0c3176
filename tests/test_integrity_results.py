"""Issue 29: every stored result stays true to what produced it, on SQLite and PostgreSQL.

1. Lineage: a shard rewritten under the same ids has its changed videos scored again; a shard replaced by
   one with other ids takes its departed videos' predictions out of the views with it.
2. Evaluations name their set: a promotion on grown data compares both versions on the same videos.
3. Artifacts per version: two versions from one training folder keep their own evaluation and loss plots.
4. Runs are true: a night is served only once it has succeeded (a rerun whose exports fail leaves the
   served rows as they were; a video changed while the night scored it is not published from its old
   content); two runs of one date each serve their own exports; a refused request leaves no run row; a
   checkpoint that does not load, or holds NaN, is never registered.
"""

import os
import shutil
import socket
import subprocess
import sys
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from sqlalchemy import insert, text

from model import checkpoint
from model.checkpoint import CheckpointError
from model.data import RowGroup
from model.evaluate import VideoSet
from storage.database import catalog, partitions, registry, schema, views
from storage.database.db import engine_for, head_revision
from storage.formats.exports import CSV_NAME, night_folder
from tasks import settings
from tasks.inference import InferenceError, count_pending, run_inference
from tasks.ingest import ingest
from tasks.queries import QueryError
from tasks.queries import run as run_query
from tasks.training import evaluate_model, promote, train_and_register
from tests.support.cli import vtag
from tests.support.db import in_transaction, migrated
from tests.support.env import REPO
from tests.support.shards import frame_record, write_shard
from tests.support.worlds import (
    NIGHT,
    TINY,
    TINY_TRAIN_OPTIONS,
    VIDEOS,
    build_world,
    count,
    hits_in_step,
    rows,
    stored_rows,
    vtag_train_args,
)

K = 3


@pytest.fixture
def world(raw_shards, tiny_checkpoint, tmp_path, db_url):
    return build_world(raw_shards, tmp_path, db_url, checkpoint=tiny_checkpoint)


def _shard(path, videos: dict[str, int]):
    """A frame-level shard of four-frame videos, {id: fill byte}: a fill is the video's content."""
    return write_shard(path, [frame_record(video_id, labels=(1, 3), frames=4, fill=fill) for video_id, fill in videos.items()])  # fmt: skip


def _scored(db_url, prefix: str) -> list[str]:
    found = rows(db_url, "SELECT DISTINCT video_id FROM predictions WHERE video_id LIKE :p", p=f"{prefix}%")
    return sorted(r[0] for r in found)


def _served(db_url, prefix: str) -> list[str]:
    """The videos the production views show labels for (tagged_videos and video_top_labels read this view)."""
    found = rows(db_url, "SELECT DISTINCT video_id FROM production_labels WHERE video_id LIKE :p", p=f"{prefix}%")
    return sorted(r[0] for r in found)


# --- 1. lineage ----------------------------------------------------------------------------------------


def test_a_changed_shard_is_scored_again_and_a_replaced_shards_departed_videos_leave(world, tmp_path):
    db_url, parquet = world["db"], world["parquet"]
    extra, other = tmp_path / "extra", tmp_path / "other"
    _shard(extra / "train0100.tfrecord", {"c0": 10, "c1": 11, "c2": 12, "c3": 13})
    assert not ingest(str(extra), parquet, db_url).failed
    first = run_inference(db_url, NIGHT, top_k=K, exports_uri=str(tmp_path / "n1"))
    assert first.videos == VIDEOS + 4 and _served(db_url, "c") == ["c0", "c1", "c2", "c3"]

    # The same name, the same ids: c0 and c1 now hold other features, c2 and c3 the same.
    _shard(extra / "train0100.tfrecord", {"c0": 90, "c1": 91, "c2": 12, "c3": 13})
    report = ingest(str(extra), parquet, db_url)
    assert len(report.converted) == 1 and not report.failed
    assert _scored(db_url, "c") == ["c2", "c3"]  # the changed ones lost their stale predictions...
    night = NIGHT + timedelta(days=1)
    assert count_pending(db_url, night) == (world["version"], 2)  # ...and are pending for the model again
    second = run_inference(db_url, night, top_k=K, exports_uri=str(tmp_path / "n2"))
    assert second.videos == 2 and _served(db_url, "c") == ["c0", "c1", "c2", "c3"]
    assert hits_in_step(db_url)  # the changed videos' old rows left the version's hit totals, their new ones joined

    # Replaced from another folder by a shard of other ids: c0..c3 leave the catalogue, the predictions
    # and the views in one transaction; d0 and d1 are pending.
    _shard(other / "train0100.tfrecord", {"d0": 20, "d1": 21})
    assert not ingest(str(other), parquet, db_url, replace=True).failed
    assert count(db_url, "SELECT COUNT(*) FROM videos WHERE video_id LIKE 'c%'") == 0
    assert _scored(db_url, "c") == [] and _served(db_url, "c") == []
    assert count_pending(db_url, night + timedelta(days=1)) == (world["version"], 2)
    assert count(db_url, "SELECT COUNT(DISTINCT video_id) FROM predictions") == VIDEOS  # the others kept theirs
    hits_in_step(db_url)


# --- 2. evaluations name their set ----------------------------------------------------------------------


def test_the_set_fingerprint_is_the_ids_and_the_files_content():
    groups = [
        RowGroup("/p/validate0000.parquet", 0, 3, "mtime=1"),
        RowGroup("/p/validate0001.parquet", 0, 2, "mtime=2"),
    ]

    def fingerprint(batches, files=groups):
        video_set = VideoSet(files)
        for ids in batches:
            video_set.add(ids)
        return video_set.fingerprint()

    same = fingerprint([["a", "b", "c"], ["d", "e"]])
    assert fingerprint([["e", "d"], ["c", "a", "b"]]) == same  # the ids as a set, in any order
    assert fingerprint([["a", "b", "c"], ["d"]]) != same
    assert fingerprint([["a", "b", "c"], ["d", "x"]]) != same
    rewritten = [groups[0], RowGroup("/p/validate0001.parquet", 0, 2, "mtime=3")]
    assert fingerprint([["a", "b", "c"], ["d", "e"]], rewritten) != same  # the same ids, other content


def test_a_promotion_on_grown_data_compares_both_versions_on_the_same_videos(world, tmp_path):
    db_url, parquet = world["db"], world["parquet"]
    production = world["version"]
    before = in_transaction(db_url, views.model, production)["evaluations"]
    assert [e["videos"] for e in before] == [10]

    grown = tmp_path / "grown"
    _shard(grown / "validate0100.tfrecord", {f"g{i}": 40 + i for i in range(6)})
    assert not ingest(str(grown), parquet, db_url).failed
    state = checkpoint.load(world["checkpoint"])
    state["model"] = {name: t + 0.01 if t.is_floating_point() else t for name, t in state["model"].items()}
    candidate_uri = str(tmp_path / "candidate" / "final-step0000001.pt")
    checkpoint.save(candidate_uri, state)

    scored = evaluate_model(candidate_uri, parquet, db_url)
    assert scored["videos"] == 16
    outcome = promote(db_url, scored["version"])
    after = in_transaction(db_url, views.model, production)["evaluations"]
    assert [e["videos"] for e in after] == [16, 10]  # production scored again, on the grown set
    sets = rows(db_url, "SELECT model_version, set_fingerprint FROM evaluations WHERE videos = 16")
    assert {v for v, _ in sets} == {production, scored["version"]} and len({f for _, f in sets}) == 1
    gaps = f"GAP {scored['gap']:.4f}", f"production version {production} GAP {after[0]['gap']:.4f}"
    assert all(g in outcome["reason"] for g in gaps) and "on the same 16 validate videos" in outcome["reason"]


# --- 3. artifacts per version ---------------------------------------------------------------------------


def test_two_versions_from_one_training_folder_keep_their_own_plots(raw_shards, tmp_path, db_url):
    from airflow_glue.ui.app import _plots

    parquet = str(tmp_path / "parquet")
    assert not ingest(str(raw_shards), parquet, db_url).failed
    out = tmp_path / "run"
    trained = train_and_register(parquet, str(out), "frame", db_url, preset="small", overrides={**TINY, "epochs": 2}, progress=False)  # fmt: skip
    first = evaluate_model(trained["checkpoint_uri"], parquet, db_url)
    first_plot = open(first["plot_uri"], "rb").read()
    second = evaluate_model(str(out / "epoch-001.pt"), parquet, db_url)  # another version, the same folder
    assert second["version"] != first["version"] and second["plot_uri"] != first["plot_uri"]
    assert open(first["plot_uri"], "rb").read() == first_plot  # not overwritten by the second

    models = {v: in_transaction(db_url, views.model, v) for v in (first["version"], second["version"])}
    losses = {v: m["loss_plot_uri"] for v, m in models.items()}
    assert losses[first["version"]] == str(out / f"final-step{trained['steps']:07d}-loss.png")
    assert losses[second["version"]].startswith(str(Path(settings.default_models_uri()) / "registered" / "sha256-"))
    assert open(losses[first["version"]], "rb").read() != open(losses[second["version"]], "rb").read()
    for version, model in models.items():  # each page shows its own pictures
        plots = _plots(model)
        assert plots["loss.png"] == losses[version]
        assert set(plots.values()) == {losses[version], (first if version == first["version"] else second)["plot_uri"]}


# --- 4. runs are true -----------------------------------------------------------------------------------


def test_two_runs_of_one_date_each_serve_their_own_exports(world, tmp_path, monkeypatch):
    from airflow_glue.ui.app import _exports

    root = tmp_path / "exports"
    monkeypatch.setenv("VTAG_EXPORTS_URI", str(root))
    dag_folder, cli_folder = night_folder(str(root), NIGHT), night_folder(str(root), NIGHT, world["version"])
    first = run_inference(world["db"], NIGHT, top_k=K, exports_uri=dag_folder)  # as the DAG writes
    assert _exports(in_transaction(world["db"], views.night, first.run_id))[CSV_NAME] == f"{dag_folder}/{CSV_NAME}"
    again = run_inference(world["db"], NIGHT, top_k=K, exports_uri=cli_folder)  # as `vtag infer` writes
    assert again.run_id == first.run_id  # one night of one version is one run row
    night = in_transaction(world["db"], views.night, again.run_id)
    assert night["exports_uri"] == cli_folder
    assert _exports(night)[CSV_NAME] == f"{cli_folder}/{CSV_NAME}"  # the latest run's, not the DAG folder's


def _labels_served(db_url) -> list[tuple]:
    return [tuple(r) for r in rows(db_url, "SELECT video_id, rank, label_id, score, model_version FROM production_labels ORDER BY video_id, rank")]  # fmt: skip


def test_a_rerun_that_fails_writing_its_exports_leaves_the_served_rows_as_they_were(world, monkeypatch):
    """S3 down when the rerun of a night joins its exports: the rerun has scored every video, and none of
    its rows is served; the first try's stay, exactly. Its retry then replaces them, without duplicates."""
    from storage.objectstore import StoreError
    from tasks import inference

    db_url = world["db"]
    run_inference(db_url, NIGHT, top_k=K, exports_uri=world["exports"])
    before = _labels_served(db_url)
    assert len(before) == VIDEOS * K

    def s3_down(exports_uri, parts, s3=None):
        raise StoreError(f"{exports_uri}/predictions.csv: could not upload (503 Service Unavailable)")

    real_join = inference.exports.join_night
    monkeypatch.setattr(inference.exports, "join_night", s3_down)
    with pytest.raises(StoreError, match="503"):
        run_inference(db_url, NIGHT, top_k=2, exports_uri=world["exports"])  # the rerun, asking for 2 labels each
    run = rows(db_url, "SELECT status, error, videos_done FROM inference_runs")
    assert [(r[0], r[2]) for r in run] == [("failed", VIDEOS)] and "503" in run[0][1]  # scored all, published none
    assert _labels_served(db_url) == before

    monkeypatch.setattr(inference.exports, "join_night", real_join)
    retry = run_inference(db_url, NIGHT, top_k=2, exports_uri=world["exports"])
    after = _labels_served(db_url)
    assert retry.rows_written == len(after) == VIDEOS * 2 and {r[1] for r in after} == {1, 2}
    assert stored_rows(db_url) == VIDEOS * 2  # no part table left, nothing twice
    assert {rank for _, rank in hits_in_step(db_url)} == {1, 2}  # the first try's ranks 3.. left the totals


def test_a_night_is_served_only_once_it_has_succeeded(world, tmp_path):
    """Neither a version's first night (on PostgreSQL the one that becomes its partition) nor a later one
    (inserted into it) shows a row before it has succeeded."""
    from tasks.inference import finish_night, plan_night, tag_part

    db_url = world["db"]
    for n in range(2):  # two files: two parts
        _shard(tmp_path / "extra" / f"train010{n}.tfrecord", {f"c{i}": 10 + i for i in range(15 * n, 15 * n + 15)})
    nights = []
    for shards, night in ((None, NIGHT), ("extra", NIGHT + timedelta(days=1))):
        if shards:
            assert not ingest(str(tmp_path / shards), world["parquet"], db_url).failed
        served = _labels_served(db_url)
        plan = plan_night(db_url, night, top_k=K, exports_uri=str(tmp_path / night.isoformat()), part_videos=15)
        assert len(plan.parts) > 1
        for part in plan.parts:
            tag_part(db_url, plan, part)
            assert _labels_served(db_url) == served  # nothing of this night yet
        nights.append(finish_night(db_url, plan).videos)
        assert len(_labels_served(db_url)) == stored_rows(db_url) == (len(served) // K + nights[-1]) * K
        hits_in_step(db_url)
    assert nights == [VIDEOS, 30] and _served(db_url, "c") == sorted(f"c{i}" for i in range(30))


def test_a_shard_changed_while_a_night_scores_it_is_not_published_from_the_old_content(world, tmp_path):
    """The part scored c0..c3, then a re-ingest changed c0 and c1 before the night published: their rows,
    scored from the old content, are left out (and out of the night's counts); c2 and c3, unchanged, are
    published; the next night scores c0 and c1 from their new content."""
    from tasks.inference import finish_night, plan_night, tag_part

    db_url, parquet = world["db"], world["parquet"]
    extra = tmp_path / "extra"
    _shard(extra / "train0100.tfrecord", {"c0": 10, "c1": 11, "c2": 12, "c3": 13})
    assert not ingest(str(extra), parquet, db_url).failed
    plan = plan_night(db_url, NIGHT + timedelta(days=1), top_k=K, exports_uri=world["exports"])
    for part in plan.parts:
        tag_part(db_url, plan, part)
    _shard(extra / "train0100.tfrecord", {"c0": 90, "c1": 91, "c2": 12, "c3": 13})
    assert not ingest(str(extra), parquet, db_url).failed
    report = finish_night(db_url, plan)

    assert _scored(db_url, "c") == ["c2", "c3"]
    assert report.videos == VIDEOS + 2 and report.rows_written == (VIDEOS + 2) * K
    run = rows(db_url, "SELECT status, videos_total, videos_done, rows_written FROM inference_runs")
    assert [tuple(r) for r in run] == [("succeeded", VIDEOS + 2, VIDEOS + 2, (VIDEOS + 2) * K)]
    counted = count(db_url, "SELECT SUM(videos) FROM inference_label_counts WHERE rank = 1")
    assert counted == VIDEOS + 2  # the label counts are those of the rows published
    judged = count(db_url, "SELECT SUM(judged) FROM inference_label_counts WHERE rank = 1")
    assert judged == hits_in_step(db_url)[(world["version"], 1)][0] > 0  # and so are its hits
    night = NIGHT + timedelta(days=2)
    assert count_pending(db_url, night) == (world["version"], 2)
    assert run_inference(db_url, night, top_k=K, exports_uri=str(tmp_path / "n2")).videos == 2
    assert _served(db_url, "c") == ["c0", "c1", "c2", "c3"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"exports_uri": "garbage://x/y"}, r"exports: unsupported URI scheme 'garbage'"),
        ({"part_videos": 0}, r"part_videos must be a whole number of videos, at least 1, not 0"),
        ({"video_ids": ["a\x00b"]}, r"video id 'a\\x00b' holds a NUL byte \(PostgreSQL cannot store one"),
    ],
)
def test_a_refused_night_leaves_no_run_row(world, bad, message):
    with pytest.raises(InferenceError, match=message):
        run_inference(world["db"], NIGHT, top_k=K, **bad)
    assert count(world["db"], "SELECT COUNT(*) FROM inference_runs") == 0


@pytest.mark.parametrize("damage", ["nan", "shape"])
def test_a_checkpoint_that_does_not_load_or_holds_nan_is_never_registered(tiny_checkpoint, tmp_path, db_url, damage):
    state = checkpoint.load(tiny_checkpoint)
    name = next(n for n, t in state["model"].items() if t.is_floating_point() and t.dim() == 2)
    tensor = state["model"][name]
    state["model"][name] = tensor.clone().fill_(float("nan")) if damage == "nan" else torch.zeros(tensor.shape[0] + 1, tensor.shape[1])  # fmt: skip
    bad = str(tmp_path / "bad" / "epoch-001.pt")
    checkpoint.save(bad, state)
    expected = (
        "non-finite .* weights in" if damage == "nan" else "its weights do not fit its architecture: size mismatch"
    )
    with pytest.raises(CheckpointError, match=rf"{bad}: {expected} .*{name}"):
        evaluate_model(bad, str(tmp_path), db_url)
    assert in_transaction(db_url, registry.versions_with_latest_evaluation) == []
    assert not (tmp_path / "bad" / "registered").exists()  # nothing copied for it either


def test_a_night_page_of_a_run_before_exports_were_recorded_still_finds_them(world, tmp_path, monkeypatch):
    """Runs from before migration 0009 have no exports_uri: the pages look where the DAG and the CLI write."""
    from airflow_glue.ui.app import _exports

    root = tmp_path / "exports"
    monkeypatch.setenv("VTAG_EXPORTS_URI", str(root))
    folder = night_folder(str(root), NIGHT, world["version"])
    report = run_inference(world["db"], NIGHT, top_k=K, exports_uri=folder)
    night = {**in_transaction(world["db"], views.night, report.run_id), "exports_uri": None}
    assert _exports(night)[CSV_NAME] == f"{folder}/{CSV_NAME}"
    shutil.rmtree(root)
    assert _exports(night) == {}


@pytest.fixture(scope="module")
def parquet_for_cli(raw_shards, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("results-parquet")
    assert not ingest(str(raw_shards), str(root / "parquet"), migrated(f"sqlite:///{root / 'ingest.db'}")).failed
    return str(root / "parquet")


def test_one_training_folder_has_one_writer(parquet_for_cli, tmp_path, sqlite_url):
    parquet = parquet_for_cli
    out = tmp_path / "run"
    holding = "import sys, time\nfrom model.checkpoint import one_writer\nwith one_writer(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n"  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", holding, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = vtag(*vtag_train_args(parquet, out, sqlite_url, *TINY_TRAIN_OPTIONS, "--epochs", "1"))
        assert result.returncode == 2
        assert result.stderr.strip() == (
            f"vtag train: error: {out} is being trained into by pid {holder.pid} on {socket.gethostname()} since "
            + result.stderr.split(" since ", 1)[1].split(": one run", 1)[0]
            + ": one run writes a training folder at a time (wait for it to end, or train into another folder)"
        )
        assert sorted(p.name for p in out.iterdir()) == [".vtag-train.lock"]  # nothing of the refused run
    finally:
        holder.kill()
        holder.wait()
    result = vtag(*vtag_train_args(parquet, out, sqlite_url, *TINY_TRAIN_OPTIONS, "--epochs", "1"))
    assert result.returncode == 0, result.stderr  # a dead holder holds nothing


def test_a_training_folder_that_is_a_file_is_one_line(parquet_for_cli, tmp_path, sqlite_url):
    out = tmp_path / "a-file"
    out.write_text("not a folder")
    result = vtag(*vtag_train_args(parquet_for_cli, out, sqlite_url, *TINY_TRAIN_OPTIONS, "--epochs", "1"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"vtag train: error: cannot write the training folder {out}: File exists"


# --- 5. one line for every input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, line",
    [
        (["models", "--db", "garbage://x"], "vtag models: error: garbage://x: garbage databases are not supported (use sqlite:///path or postgresql://user@host/db)"),
        (["models", "--db", "mysql://u@h/d"], "vtag models: error: mysql://u@h/d: mysql databases are not supported (use sqlite:///path or postgresql://user@host/db)"),
        (["infer", "--production", "--dry-run", "--lock-timeout", "nan"], "vtag infer: error: argument --lock-timeout: must be a number of seconds (0 or more), not 'nan'"),
        (["infer", "--production", "--dry-run", "--lock-timeout", "-1"], "vtag infer: error: argument --lock-timeout: must be a number of seconds (0 or more), not '-1'"),
        (["infer", "--production", "--dry-run", "--lock-timeout", "inf"], "vtag infer: error: argument --lock-timeout: must be a number of seconds (0 or more), not 'inf'"),
    ],
)  # fmt: skip
def test_bad_flags_are_one_line(args, line, tmp_path):
    result = vtag(*args, env_home=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == line, result.stderr
    assert "Traceback" not in result.stderr


def test_bad_migrations_and_homes_are_one_line(tmp_path, db_url):
    result = vtag("db", "downgrade", "nosuch", "--db", db_url)
    assert (result.returncode, result.stderr.strip()) == (
        2,
        "vtag db: error: schema revision 'nosuch': Can't locate revision identified by 'nosuch'",
    )
    with engine_for(db_url).begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    for args in (["models"], ["db", "upgrade"], ["db", "downgrade", "-1"]):
        result = vtag(*args, "--db", db_url)
        assert result.returncode == 2, result.stderr
        assert (
            f"is at schema revision 0099, newer than this release knows (its newest is {head_revision()})"
            in result.stderr
        )
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    home = tmp_path / "home-is-a-file"
    home.write_text("")
    result = vtag("models", env_home=home)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"vtag models: error: sqlite:///{home}/vtag.db: cannot create its folder {home}: File exists"
    )


def test_bad_vocabularies_and_nul_bytes_are_one_line_on_both_databases(tmp_path, db_url):
    header = "Index,TrainVideoCount,KnowledgeGraphId,Name,WikiUrl,Vertical1,Vertical2,Vertical3\n"
    cases = {
        "folder": (None, "is a folder, not a file"),
        "big.csv": (header + "0,1,/m/x," + "a" * 2_000_000 + ",u,Arts,,\n", "line 2: field larger than field limit (131072)"),
        "nul.csv": (header + "0,1,/m/x,Ga\x00me,u,Arts,,\n", "line 2: column Name holds a NUL byte (PostgreSQL cannot store one, so neither database takes it)"),
    }  # fmt: skip
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.mkdir() if content is None else path.write_text(content)
        result = vtag("vocabulary", path, "--db", db_url)
        assert (
            result.returncode == 2
            and result.stderr.strip() == f"vtag vocabulary: error: {path}{', ' if content else ' '}{message}"
        )
    assert count(db_url, "SELECT COUNT(*) FROM labels") == 0

    _shard(tmp_path / "raw" / "train0000.tfrecord", {"ok1": 1, "bad\x00id": 2})
    report = ingest(str(tmp_path / "raw"), str(tmp_path / "parquet"), db_url)
    assert "video id 'bad\\x00id' holds a NUL byte" in report.failed[str(tmp_path / "raw" / "train0000.tfrecord")]
    assert count(db_url, "SELECT COUNT(*) FROM videos") == 0
    with pytest.raises(QueryError, match="parameter video_id holds a NUL byte"):
        run_query(db_url, "video_top_labels", {"video_id": "a\x00b", "k": "3"})


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("VTAG_NIGHTLY_CRON", "every night", "VTAG_NIGHTLY_CRON must be a cron expression such as '0 2 * * *' (or empty: no schedule), not 'every night'"),
        ("VTAG_NIGHTLY_START", "yesterday", "VTAG_NIGHTLY_START must be an ISO 8601 date such as 2026-11-01, not 'yesterday'"),
        ("VTAG_INGEST_CRON", "99 99 * * *", "VTAG_INGEST_CRON must be a cron expression such as '0 2 * * *' (or empty: no schedule), not '99 99 * * *'"),
    ],
)  # fmt: skip
def test_a_bad_schedule_variable_names_itself_where_the_dag_is_parsed(variable, value, message):
    dag = "yt8m_ingest" if "INGEST" in variable else "yt8m_nightly_inference"
    env = {**os.environ, variable: value, "PYTHONPATH": f"{REPO / 'dags'}{os.pathsep}{REPO}"}
    result = subprocess.run([sys.executable, "-c", f"import {dag}"], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == f"storage.errors.UsageError: {message}"


class _Answers(BaseHTTPRequestHandler):
    """Not S3: every request answered with the server's status and an S3-style error body."""

    status = 501

    def _answer(self):
        body = f"<Error><Code>{self.status}</Code><Message>not here</Message></Error>".encode()
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _answer

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status", [404, 501])
def test_an_s3_endpoint_that_answers_404_or_501_is_one_line(status, tmp_path):
    handler = type("Answers", (_Answers,), {"status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        result = vtag("ingest", "--src", "s3://raw/shards", "--dest", tmp_path / "parquet", env=env, env_home=tmp_path)
    finally:
        server.shutdown()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().startswith(f"vtag ingest: error: the S3 endpoint answered {status} "), result.stderr
    assert "s3://raw/shards" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.airflow
def test_the_pages_answer_ids_beyond_the_integer_columns_with_422(airflow_api):
    client, auth = airflow_api
    huge = 2**64
    for page in (f"/video-tags/models/{huge}", f"/video-tags/models/{huge}/plots/loss.png", f"/video-tags/nights/{huge}",
                 f"/video-tags/nights/{huge}/exports/predictions.csv", f"/video-tags/nights?page={huge}", "/video-tags/models/0"):  # fmt: skip
        assert client.get(page, headers=auth).status_code == 422, page


def test_a_changed_video_loses_the_predictions_of_its_level_only(db_url):
    """A video has a row at each level; a frame-level shard changed is no reason to rescore the video level."""

    def world(conn):
        versions = {}
        for level in ("frame", "video"):
            versions[level] = registry.register(
                conn, level=level, preset="p", checkpoint_uri=f"/m/{level}.pt", config={}, data_uri="/d",
                train_split="train", epochs=1, steps=1,
            )  # fmt: skip
            partitions.ensure_partition(conn, versions[level])
            source, out = f"/raw/{level}/train0000.tfrecord", f"/pq/{level}/train0000.parquet"
            catalog.record_videos(conn, catalog.ShardVideos(["v1"], [[1]], ["a"]), split="train", level=level, source_uri=source, parquet_uri=out)  # fmt: skip
            conn.execute(
                insert(schema.predictions),
                [{"video_id": "v1", "model_version": versions[level], "rank": 1, "label_id": 1, "score": 0.5, "run_id": 1}],
            )  # fmt: skip
        return versions

    versions = in_transaction(db_url, world)
    changed = in_transaction(
        db_url, catalog.record_videos, catalog.ShardVideos(["v1"], [[1]], ["b"]), split="train", level="frame",
        source_uri="/raw/frame/train0000.tfrecord", parquet_uri="/pq/frame/train0000.parquet",
    )  # fmt: skip
    assert changed == 1
    left = rows(db_url, "SELECT model_version FROM predictions WHERE video_id = 'v1'")
    assert [v for (v,) in left] == [versions["video"]]
