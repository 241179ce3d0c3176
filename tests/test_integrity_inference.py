"""Nightly inference integrity (issue 10): a night succeeds only when every video has its k rows; a
hung earlier try holds the night's lock for a bounded time; `vtag query` refuses bad parameters in
one line. SQLite and PostgreSQL."""

import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from storage.database import run_locks, runs
from storage.database.db import engine_for
from tasks.inference import NonFiniteScores, finish_night, plan_night, run_inference, tag_part
from tests.support.cli import vtag
from tests.support.db import in_transaction
from tests.support.env import REPO
from tests.support.worlds import NIGHT, VIDEOS, build_world, count, row, rows, served_rows, stored_rows


@pytest.fixture
def world(raw_shards, tiny_checkpoint, tmp_path, db_url):
    return build_world(raw_shards, tmp_path, db_url, checkpoint=tiny_checkpoint)


def _run(db_url, run_id) -> dict:
    names = ("status", "videos_total", "videos_done", "rows_written", "error")
    return dict(zip(names, row(db_url, f"SELECT {', '.join(names)} FROM inference_runs WHERE run_id = {int(run_id)}")))


def _exported_text(exports: str) -> str:
    """Every export file visible under the folder (the night's and its parts' fragments), as text."""
    return "".join(p.read_bytes().decode("latin-1") for p in Path(exports).rglob("*") if p.is_file())


# --- 1. a night succeeds only when complete --------------------------------------------------------


def test_nan_scores_fail_the_night_before_they_are_stored_or_exported(world, monkeypatch):
    import model.evaluate

    db_url, k = world["db"], 3
    poisoned = sorted(r[0] for r in rows(db_url, "SELECT video_id FROM videos ORDER BY video_id LIMIT 2"))
    real_predict = model.evaluate.predict

    def nan_for_two_videos(*args, **kwargs):  # a model that emits NaN for some inputs
        for ids, scores, labels in real_predict(*args, **kwargs):
            scores = scores.copy()
            scores[[i for i, v in enumerate(ids) if v in poisoned]] = np.nan
            yield ids, scores, labels

    monkeypatch.setattr(model.evaluate, "predict", nan_for_two_videos)
    with pytest.raises(NonFiniteScores) as failure:
        run_inference(db_url, NIGHT, top_k=k, exports_uri=world["exports"])
    message = str(failure.value)
    assert "\n" not in message and "NaN or infinite scores to 2 of the" in message
    import torch

    assert torch.is_grad_enabled()  # the failed scorer was closed, not left suspended in inference mode
    assert all(v in message for v in poisoned) and ".parquet" in message  # the videos and their file
    run = _run(db_url, count(db_url, "SELECT MAX(run_id) FROM inference_runs"))
    assert run["status"] == "failed" and "NonFiniteScores" in run["error"] and poisoned[0] in run["error"]
    assert run["rows_written"] == stored_rows(db_url) == run["videos_done"] * k < VIDEOS * k  # nothing counted unstored
    assert (
        count(db_url, "SELECT COUNT(*) FROM predictions WHERE video_id IN (:a, :b)", a=poisoned[0], b=poisoned[1]) == 0
    )
    assert count(db_url, "SELECT COUNT(*) FROM inference_parts WHERE status = 'succeeded'") == 0
    assert "nan" not in _exported_text(world["exports"]).lower()  # no fragment published, no night's file

    monkeypatch.setattr(model.evaluate, "predict", real_predict)  # the model fixed: the retry completes the night
    retry = run_inference(db_url, NIGHT, top_k=k, exports_uri=world["exports"])
    assert _run(db_url, retry.run_id)["status"] == "succeeded" and retry.rows_written == VIDEOS * k
    assert "nan" not in Path(retry.exports[0]).read_text().lower()


def test_rows_lost_to_a_conflicting_row_fail_the_night_instead_of_succeeding(world):
    db_url, k = world["db"], 3
    first = run_inference(db_url, NIGHT, top_k=k, exports_uri=world["exports"])
    victim = rows(db_url, "SELECT video_id FROM videos ORDER BY video_id LIMIT 1")[0][0]
    with engine_for(db_url).begin() as conn:  # a stray row of another run: rank 3 of the video, its rank 1 gone
        conn.execute(text("DELETE FROM predictions WHERE video_id = :v"), {"v": victim})
        conn.execute(
            text(
                "INSERT INTO predictions (video_id, model_version, rank, label_id, score, run_id) "
                "VALUES (:v, :m, 3, 7, 0.5, 999)"
            ),
            {"v": victim, "m": world["version"]},
        )

    with pytest.raises(runs.RowsLost) as failure:
        run_inference(db_url, NIGHT, top_k=k, exports_uri=world["exports"])  # the rerun must write the video again
    message = str(failure.value)
    assert "\n" not in message and f"{victim} (run 999 holds 1 rows, ranks 3..3)" in message
    run = _run(db_url, first.run_id)
    assert run["status"] == "failed" and victim in run["error"]
    # nothing of the failed rerun is served: the first night's rows stay, less the victim's, beside the stray one
    assert (
        served_rows(db_url) == VIDEOS * k - k + 1 and stored_rows(db_url) - served_rows(db_url) == run["rows_written"]
    )
    assert count(db_url, "SELECT COUNT(*) FROM predictions WHERE video_id = :v", v=victim) == 1  # never mixed

    with engine_for(db_url).begin() as conn:  # the stray row removed, the rerun is exact
        conn.execute(text("DELETE FROM predictions WHERE run_id = 999"))
    again = run_inference(db_url, NIGHT, top_k=k, exports_uri=world["exports"])
    assert _run(db_url, again.run_id)["status"] == "succeeded" and again.rows_written == VIDEOS * k == stored_rows(
        db_url
    )


def test_a_part_whose_counters_fall_short_cannot_make_the_night_succeed(world):
    db_url, k = world["db"], 2
    plan = plan_night(db_url, NIGHT, top_k=k, exports_uri=world["exports"], part_videos=12)
    for part in plan.parts:
        tag_part(db_url, plan, part)
    with engine_for(db_url).begin() as conn:  # rows of part 1 gone after it succeeded (a hand edit, a bug)
        conn.execute(
            text("UPDATE inference_parts SET rows_written = rows_written - 1 WHERE run_id = :r AND part = 1"),
            {"r": plan.run_id},
        )
    with pytest.raises(ValueError, match=r"incomplete: part 1: 39 rows written for 20 videos x 2 = 40"):
        finish_night(db_url, plan)
    assert _run(db_url, plan.run_id)["status"] == "failed"


def test_two_nights_scoring_the_same_videos_at_once_leave_each_video_to_one(world):
    """Both nights plan the same 50 videos before either publishes (a `vtag infer` beside the DAG): the
    first to publish keeps them, the other leaves them whole and its counts say so (on PostgreSQL the
    first becomes the version's partition, the second is inserted beside it)."""
    db_url, k = world["db"], 2
    a = plan_night(db_url, NIGHT, top_k=k, exports_uri=world["exports"] + "/a")
    b = plan_night(db_url, NIGHT + timedelta(days=1), top_k=k, exports_uri=world["exports"] + "/b")
    assert sum(p["videos"] for p in a.parts) == sum(p["videos"] for p in b.parts) == VIDEOS
    for part in a.parts:
        tag_part(db_url, a, part)
    for part in b.parts:  # both score every video: neither has published yet
        assert tag_part(db_url, b, part).videos == part["videos"]
    finish_night(db_url, a)
    report_b = finish_night(db_url, b)

    assert report_b.videos == 0 and report_b.rows_written == 0
    assert {key: _run(db_url, a.run_id)[key] for key in ("status", "videos_total", "videos_done", "rows_written")} == {
        "status": "succeeded",
        "videos_total": VIDEOS,
        "videos_done": VIDEOS,
        "rows_written": VIDEOS * k,
    }
    assert {key: _run(db_url, b.run_id)[key] for key in ("status", "videos_total", "videos_done", "rows_written")} == {
        "status": "succeeded",
        "videos_total": 0,
        "videos_done": 0,
        "rows_written": 0,
    }
    assert count(db_url, "SELECT COUNT(*) FROM predictions") == VIDEOS * k == stored_rows(db_url)
    assert count(db_url, "SELECT COUNT(*) FROM predictions WHERE run_id = :r", r=a.run_id) == VIDEOS * k
    assert (
        count(db_url, "SELECT COALESCE(SUM(videos), 0) FROM inference_label_counts WHERE run_id = :r", r=b.run_id) == 0
    )

    # Rescoring three videos twice at once, now that the version's rows sit in their partition: each asked
    # for them to be scored again, so the one published last replaces the other's, never beside it.
    some = [r[0] for r in rows(db_url, "SELECT video_id FROM videos ORDER BY video_id LIMIT 3")]
    c = plan_night(db_url, NIGHT + timedelta(days=2), top_k=k, video_ids=some, exports_uri=world["exports"] + "/c")
    d = plan_night(db_url, NIGHT + timedelta(days=3), top_k=k, video_ids=some, exports_uri=world["exports"] + "/d")
    tag_part(db_url, c, c.parts[0])
    tag_part(db_url, d, d.parts[0])
    assert count(db_url, "SELECT COUNT(*) FROM predictions WHERE run_id = :r", r=a.run_id) == VIDEOS * k  # not yet
    finish_night(db_url, c)
    assert count(db_url, "SELECT COUNT(*) FROM predictions WHERE run_id = :r", r=c.run_id) == 3 * k
    finish_night(db_url, d)
    assert count(db_url, "SELECT COUNT(*) FROM predictions WHERE run_id = :r", r=c.run_id) == 0
    assert count(db_url, "SELECT COUNT(*) FROM predictions WHERE run_id = :r", r=d.run_id) == 3 * k
    assert count(db_url, "SELECT COUNT(*) FROM predictions") == VIDEOS * k == stored_rows(db_url)


# --- 2. the run lock waits a bounded time ----------------------------------------------------------

_HOLDER = """
import sys, time
from datetime import datetime
from storage.database import run_locks
from storage.database.db import engine_for

part = None if sys.argv[4] == "night" else int(sys.argv[4])
with run_locks.run_lock(engine_for(sys.argv[1]), datetime.fromisoformat(sys.argv[2]), int(sys.argv[3]), part, timeout_s=30):
    print("held", flush=True)
    time.sleep(600)
"""


def _hold_lock(db_url: str, version: int, part: str) -> subprocess.Popen:
    """Another process that took the night's (or a part's) lock and hangs, as a stuck earlier try."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, db_url, NIGHT.isoformat(), str(version), part],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def _release(holder: subprocess.Popen) -> None:
    holder.kill()
    holder.wait(timeout=30)


def _assert_timed_out(failure, db_url: str, holder: subprocess.Popen, what: str, waited: float, elapsed: float) -> None:
    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith(f"{what} is locked by another run (waited {waited:g} s): held by ")
    assert (f"held by process {holder.pid}" if db_url.startswith("sqlite") else "held by PostgreSQL backend") in message
    assert waited <= elapsed < waited + 5


def test_planning_behind_a_hung_run_gives_up_after_the_timeout(world):
    db_url, version = world["db"], world["version"]
    holder = _hold_lock(db_url, version, "night")
    try:
        began = time.monotonic()
        with pytest.raises(run_locks.RunLockTimeout) as failure:
            plan_night(db_url, NIGHT, top_k=2, exports_uri=world["exports"], lock_timeout_s=1.5)
        _assert_timed_out(
            failure,
            db_url,
            holder,
            f"night {NIGHT.isoformat()} of model version {version}",
            1.5,
            time.monotonic() - began,
        )
        assert count(db_url, "SELECT COUNT(*) FROM inference_runs") == 0  # nothing started behind the holder
    finally:
        _release(holder)
    report = run_inference(db_url, NIGHT, top_k=2, exports_uri=world["exports"], lock_timeout_s=1.5)
    assert report.videos == VIDEOS and _run(db_url, report.run_id)["status"] == "succeeded"


def test_a_part_retry_behind_its_hung_try_gives_up_after_the_timeout(world):
    db_url, version = world["db"], world["version"]
    plan = plan_night(db_url, NIGHT, top_k=2, exports_uri=world["exports"], part_videos=12)
    holder = _hold_lock(db_url, version, "1")
    try:
        began = time.monotonic()
        with pytest.raises(run_locks.RunLockTimeout) as failure:
            tag_part(db_url, plan, plan.parts[1], lock_timeout_s=2)
        _assert_timed_out(
            failure,
            db_url,
            holder,
            f"night {NIGHT.isoformat()} of model version {version} (part 1)",
            2,
            time.monotonic() - began,
        )
        assert (
            in_transaction(db_url, runs.parts_of, plan.run_id)[1]["attempts"] == 0
        )  # it never started under the holder
    finally:
        _release(holder)
    for part in plan.parts:
        tag_part(db_url, plan, part, lock_timeout_s=2)
    assert finish_night(db_url, plan).rows_written == VIDEOS * 2


def test_the_lock_timeout_comes_from_the_environment(world, monkeypatch):
    db_url, version = world["db"], world["version"]
    monkeypatch.setenv("VTAG_LOCK_TIMEOUT_S", "1")
    holder = _hold_lock(db_url, version, "night")
    try:
        began = time.monotonic()
        with pytest.raises(run_locks.RunLockTimeout, match=r"\(waited 1 s\)"):
            run_inference(db_url, NIGHT, top_k=2, exports_uri=world["exports"])
        assert time.monotonic() - began < 10
    finally:
        _release(holder)
    monkeypatch.setenv("VTAG_LOCK_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="VTAG_LOCK_TIMEOUT_S must be a number of seconds"):
        run_inference(db_url, NIGHT, top_k=2, exports_uri=world["exports"])


# --- 3. `vtag query` parameters --------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["runs", "limit=-1"], "parameter limit must be an integer from 1 to 100000, not '-1'"),
        (["runs", "limit=100000000000"], "parameter limit must be an integer from 1 to 100000, not '100000000000'"),
        (["video_top_labels", "video_id=x", "k=0"], "parameter k must be an integer from 1 to 3862, not '0'"),
        (["run_label_counts", "run_id=99999999999999999999", "k=1", "limit=5"], "parameter run_id must be an integer"),
    ],
)
def test_query_parameters_out_of_range_are_one_line(db_url, args, message):
    result = vtag("query", *args, "--db", db_url)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"vtag query: error: {message}") and len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_query_parameters_at_their_bounds_run(world):
    first = run_inference(world["db"], NIGHT, top_k=2, exports_uri=world["exports"])
    result = vtag("query", "runs", "limit=100000", "--db", world["db"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["run_id", "logical_date"] and lines[-1].split()[0] == str(first.run_id)


# --- what a night reads is what was registered and planned ------------------------------------------


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_night_refuses_weights_changed_since_their_version_was_registered(
    raw_shards, tiny_checkpoint, tmp_path, db_url
):
    """A night reads the version's inference artifact (its weights alone), hashed as it reads it: a tampered
    one is refused in one line, the command line's way and the DAG's. A version registered before artifacts
    existed loads from its checkpoint, whose content is checked the same way."""
    from model.checkpoint import CheckpointError
    from storage.database import registry

    own = tmp_path / "elsewhere" / "mine.pt"  # a checkpoint under a name training rewrites: registered as a copy
    own.parent.mkdir()
    own.write_bytes(Path(tiny_checkpoint).read_bytes())
    world = build_world(raw_shards, tmp_path, db_url, checkpoint=str(own))
    version = in_transaction(db_url, registry.get_version, world["version"])
    registered, artifact = Path(version["checkpoint_uri"]), Path(version["weights_uri"])
    assert registered != own and registered.read_bytes() == own.read_bytes() and len(version["checkpoint_sha256"]) == 64
    assert artifact == registered.with_suffix(".weights.pt") and len(version["weights_sha256"]) == 64
    assert artifact.stat().st_size < registered.stat().st_size  # no optimizer state, no history

    _flip_a_byte(artifact)
    changed = f"{artifact} changed since it was registered"
    with pytest.raises(CheckpointError, match=changed):  # the command line's way: the night in one process
        run_inference(db_url, NIGHT, top_k=3, exports_uri=world["exports"])
    result = vtag("infer", "--production", "--top-k", "3", "--exports", world["exports"], "--db", db_url)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and changed in result.stderr
    plan = plan_night(db_url, NIGHT + timedelta(days=1), top_k=3, exports_uri=world["exports"])
    assert (plan.checkpoint_sha256, plan.weights_sha256) == (version["checkpoint_sha256"], version["weights_sha256"])
    with pytest.raises(CheckpointError, match=changed):  # the DAG's way: each part loads the model itself
        tag_part(db_url, plan, plan.parts[0])
    assert stored_rows(db_url) == 0

    with engine_for(db_url).begin() as conn:  # as a version registered before migration 0010
        conn.execute(text("UPDATE model_versions SET weights_uri = NULL, weights_sha256 = NULL"))
    assert run_inference(db_url, NIGHT, top_k=3, exports_uri=world["exports"]).videos == VIDEOS  # from its checkpoint
    _flip_a_byte(registered)
    with pytest.raises(CheckpointError, match=f"{registered} changed since it was registered"):
        run_inference(db_url, NIGHT + timedelta(days=2), top_k=3, exports_uri=world["exports"])


def test_a_parquet_file_replaced_while_a_part_reads_it_fails_the_part_and_its_retry_reads_the_new_file(
    world, monkeypatch
):
    import os

    import model.evaluate
    from storage.objectstore import ObjectChangedError

    db_url, k = world["db"], 3
    plan = plan_night(db_url, NIGHT, top_k=k, exports_uri=world["exports"])
    (part,) = plan.parts
    last = max(str(p) for p in Path(world["parquet"]).rglob("*.parquet"))  # read last: files go in name order
    real_predict = model.evaluate.predict

    def replace_last_file_after_the_first_batch(*args, **kwargs):
        for n, batch in enumerate(real_predict(*args, **kwargs)):
            if n == 0:  # re-published (ingest's way: a new file renamed over it), same videos
                Path(last + ".new").write_bytes(Path(last).read_bytes())
                os.replace(last + ".new", last)
            yield batch

    monkeypatch.setattr(model.evaluate, "predict", replace_last_file_after_the_first_batch)
    with pytest.raises(ObjectChangedError, match=f"{last} changed while in use"):
        tag_part(db_url, plan, part, batch_size=8)
    monkeypatch.setattr(model.evaluate, "predict", real_predict)
    tag_part(db_url, plan, part, batch_size=8)  # the retry pins the file as it is now
    report = finish_night(db_url, plan)
    assert _run(db_url, plan.run_id)["status"] == "succeeded"
    assert report.rows_written == stored_rows(db_url) == VIDEOS * k
