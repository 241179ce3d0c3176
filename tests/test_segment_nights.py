"""Segment tagging in the night (issue 26 point 3): each video's best 5-second segments written through the
parts' bulk path into `segment_predictions`, published with the night's predictions (never half, never
twice, left out with the videos the night leaves out, retired with the version), the starter's
`segments.csv` among the exports, and the queries that read them (point 4), on SQLite and PostgreSQL."""

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from sqlalchemy import text

from storage.database import partitions
from storage.database.db import engine_for
from storage.formats.yt8m_spec import SEGMENT_CLASS_SET, SEGMENT_CLASSES, SEGMENT_FRAMES
from tasks import queries
from tasks.inference import InferenceError, NightRequest, finish_night, plan_night, run_inference, tag_part
from tasks.synth import SynthConfig, synth
from tests.support.db import in_transaction, migrated
from tests.support.worlds import NIGHT, TINY, build_world, count, rows

M = 3  # segments kept per video


@pytest.fixture(scope="module")
def rated_shards(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("segment-raw")
    synth(str(raw), SynthConfig("frame", "train", shards=2, videos_per_shard=12, num_labels=6, seed=4, segments=True))
    synth(str(raw), SynthConfig("frame", "validate", shards=1, videos_per_shard=8, num_labels=6, seed=4, segments=True))
    return raw


@pytest.fixture(scope="module")
def segment_checkpoint(rated_shards, tmp_path_factory) -> str:
    from tasks.ingest import ingest
    from tasks.training import train_model

    home = tmp_path_factory.mktemp("segment-model")
    db_url, parquet = migrated(f"sqlite:///{home / 'train.db'}"), str(home / "parquet")
    assert not ingest(str(rated_shards), parquet, db_url).failed
    return train_model(parquet, str(home / "model"), "frame", preset="small", overrides=TINY, progress=False)[
        "checkpoint_uri"
    ]


@pytest.fixture
def world(rated_shards, segment_checkpoint, tmp_path, db_url):
    return build_world(rated_shards, tmp_path, db_url, checkpoint=segment_checkpoint)


def _segments(db_url) -> dict[str, list[tuple]]:
    """{video: [(rank, label, start, score, run), ...]} of the served segment rows."""
    found: dict[str, list[tuple]] = {}
    for video, *rest in rows(
        db_url,
        "SELECT video_id, rank, label_id, start_second, score, run_id FROM segment_predictions ORDER BY video_id, rank",
    ):
        found.setdefault(video, []).append(tuple(rest))
    return found


def _videos(db_url) -> int:
    return count(db_url, "SELECT COUNT(*) FROM videos WHERE level = 'frame'")


def _by_hand(world, method_videos: list[str]) -> dict[str, list[tuple[int, int, float]]]:
    """The `model` method's best M (label, start, score) of these videos, computed the plain way: the model
    over each 5-frame window of the frames it scores (its max_frames), one window at a time."""
    from model.data import EpochSpec, ParquetBatches, find_row_groups, to_device
    from model.evaluate import load_model

    model, config = load_model(world["checkpoint"], torch.device("cpu"))
    groups = find_row_groups(world["parquet"], "frame", "validate", "*.parquet", None, lengths=False)
    groups += find_row_groups(world["parquet"], "frame", "train", "*.parquet", None, lengths=False)
    spec = EpochSpec(16, shuffle=False, drop_last=False, max_frames=config.max_frames)
    rated = [c for c in SEGMENT_CLASSES if c < config.num_classes]
    best = {}
    with torch.inference_mode():
        for batch in ParquetBatches(groups, "frame", config.num_classes, spec, None):
            moved = to_device(batch, torch.device("cpu"))
            for b, video in enumerate(batch["ids"]):
                if video not in method_videos:
                    continue
                frames = int(moved["mask"][b].sum())
                candidates = []
                for start in range(0, frames - SEGMENT_FRAMES + 1, SEGMENT_FRAMES):
                    window = slice(start, start + SEGMENT_FRAMES)
                    logits = model(
                        moved["rgb"][b : b + 1, window],
                        moved["audio"][b : b + 1, window],
                        torch.ones(1, SEGMENT_FRAMES, dtype=torch.bool),
                    )
                    scores = torch.sigmoid(logits.float())[0].numpy()
                    candidates += [(float(scores[c]), c, start) for c in rated]
                candidates.sort(key=lambda e: -e[0])
                best[video] = [(c, s, score) for score, c, s in candidates[:M]]
    return best


def test_a_night_keeps_each_videos_best_segments_and_writes_the_starters_submission(world):
    db_url = world["db"]
    report = run_inference(db_url, NIGHT, top_k=3, exports_uri=world["exports"], segments=M, segment_method="model")
    served = _segments(db_url)
    assert len(served) == _videos(db_url) == report.videos
    for segment_rows in served.values():
        assert [r[0] for r in segment_rows] == list(range(1, M + 1))
        assert all(r[1] in SEGMENT_CLASS_SET and r[2] % SEGMENT_FRAMES == 0 for r in segment_rows)
        assert [r[3] for r in segment_rows] == sorted((r[3] for r in segment_rows), reverse=True)
        assert {r[4] for r in segment_rows} == {report.run_id}
    assert count(db_url, "SELECT SUM(segment_rows) FROM inference_parts WHERE run_id = :r", r=report.run_id) == (
        len(served) * M
    )
    # The rows are the model's own: a few videos' windows scored one by one give the same segments.
    some = sorted(served)[:3]
    for video, expected in _by_hand(world, some).items():
        got = [(label, start, score) for _, label, start, score, _ in served[video]]
        assert [g[:2] for g in got] == [e[:2] for e in expected], video
        assert np.allclose([g[2] for g in got], [e[2] for e in expected], atol=1e-5)

    # segments.csv: Google's header, then per class its segments best first, as the rows rank them
    lines = Path(world["exports"], "segments.csv").read_text().splitlines()
    assert lines[0] == "Class,Segments" and str(Path(world["exports"], "segments.csv")) in report.exports
    submission = {int(c): s.split() for c, s in (line.split(",") for line in lines[1:])}
    expected: dict[int, list[str]] = {}
    for video, label, start in rows(
        db_url,
        "SELECT video_id, label_id, start_second FROM segment_predictions ORDER BY label_id, score DESC, video_id, "
        "start_second",
    ):
        expected.setdefault(label, []).append(f"{video}:{start}")
    assert submission == expected
    assert [c for c in SEGMENT_CLASSES if c in submission] == list(submission)  # in segment_label_ids' order
    fragment = pq.ParquetFile(Path(world["exports"], "parts", "part-00000.segments.parquet"))
    assert fragment.metadata.num_row_groups == len(expected)  # one class a row group

    # the queries analysts run
    video = some[0]
    columns, found = queries.run(db_url, "video_segments", {"video_id": video})
    assert columns[:4] == ["rank", "start_second", "end_second", "label_id"]
    assert [(r[0], r[1], r[2] - r[1], r[3]) for r in found] == [
        (r[0], r[2], SEGMENT_FRAMES, r[1]) for r in served[video]
    ]
    assert all(r[4] for r in found)  # the label's name (the world loads the vocabulary)
    label = served[video][0][1]
    _, top = queries.run(db_url, "label_top_segments", {"label_id": label, "limit": 4})
    assert [f"{r[0]}:{r[1]}" for r in top] == expected[label][:4]
    if db_url.startswith("postgresql"):  # a partition of the version's own, as predictions have
        name = partitions.partition_name(world["version"], partitions.SEGMENTS)
        assert count(db_url, "SELECT COUNT(*) FROM pg_class WHERE relname = :n", n=name) == 1


def test_reruns_and_rescoring_replace_segments_and_retire_drops_them(world):
    db_url = world["db"]
    first = run_inference(db_url, NIGHT, top_k=3, exports_uri=world["exports"], segments=M)
    before = _segments(db_url)
    again = run_inference(db_url, NIGHT, top_k=3, exports_uri=world["exports"], segments=M)  # the same night rerun
    assert again.run_id == first.run_id and _segments(db_url) == before
    video = sorted(before)[0]
    rescored = run_inference(
        db_url, NIGHT, top_k=3, exports_uri=world["exports"] + "-rescore", video_ids=[video], segments=M
    )
    after = _segments(db_url)
    assert len(after) == len(before) and {r[4] for r in after[video]} == {rescored.run_id}
    assert [r[:4] for r in after[video]] == [r[:4] for r in before[video]]  # same model, same content
    assert {v: s for v, s in after.items() if v != video} == {v: s for v, s in before.items() if v != video}
    assert not [t for t in _tables(db_url) if t.startswith("segment_")]  # no part table left behind

    from model import checkpoint
    from tasks.training import evaluate_model, promote

    state = checkpoint.load(world["checkpoint"])  # another version (the same weights saved again) in production
    checkpoint.save(world["checkpoint"] + ".copy", {**state, "step": state.get("step", 0) + 1})
    promote(db_url, evaluate_model(world["checkpoint"] + ".copy", world["parquet"], db_url)["version"])
    in_transaction(db_url, partitions.retire, world["version"])
    assert count(db_url, "SELECT COUNT(*) FROM segment_predictions") == 0
    if db_url.startswith("postgresql"):
        name = partitions.partition_name(world["version"], partitions.SEGMENTS)
        assert count(db_url, "SELECT COUNT(*) FROM pg_class WHERE relname = :n", n=name) == 0


def _tables(db_url) -> list[str]:
    from storage.database import db

    with db.transaction(db_url) as conn:
        return partitions.run_tables(conn, 1) + partitions.run_tables(conn, 2)


def test_videos_the_night_leaves_out_leave_their_segments_out_too(world):
    db_url = world["db"]
    plan = plan_night(db_url, NIGHT, top_k=3, exports_uri=world["exports"], segments=M)
    for part in plan.parts:
        tag_part(db_url, plan, part)
    with_new_content = [v for (v,) in rows(db_url, "SELECT video_id FROM videos ORDER BY video_id LIMIT 2")]
    with engine_for(db_url).begin() as conn:  # re-ingested meanwhile: newer than the try that scored them
        for video in with_new_content:
            conn.execute(
                text("UPDATE videos SET ingested_at = :t WHERE video_id = :v"), {"t": datetime.now(UTC), "v": video}
            )
    finish_night(db_url, plan)
    served = _segments(db_url)
    assert not set(with_new_content) & set(served)
    assert len(served) == _videos(db_url) - 2
    assert count(db_url, "SELECT SUM(segment_rows) FROM inference_parts WHERE run_id = :r", r=plan.run_id) == (
        len(served) * M
    )


def test_the_nights_submission_scores_as_the_starters_arithmetic_says(world):
    from model.data import find_row_groups
    from model.segments import read_ratings
    from tasks.training import evaluate_submission
    from tests.test_segment_metrics import _starter_segment_map

    run_inference(world["db"], NIGHT, top_k=3, exports_uri=world["exports"], segments=M)
    submission = str(Path(world["exports"], "segments.csv"))
    found = evaluate_submission(submission, world["parquet"], top_n=10)
    groups = find_row_groups(world["parquet"], "frame", "validate", "*.parquet", None, lengths=False)
    ratings = read_ratings(groups, None)
    assert found.rated == len(ratings) > 0 and found.segments_scored == _videos(world["db"]) * M
    assert found.map_at_n == pytest.approx(_starter_segment_map(found.submission, ratings, 10))
    # The reader and the ranking on submissions whose answer is known: the rated segments, positives first
    # (every class's AP 1), then negatives first.
    by_class: dict[int, list[tuple[float, str]]] = {}
    for (segment, label), score in ratings.items():
        by_class.setdefault(label, []).append((score, segment))
    for first, expected in ((True, 1.0), (False, None)):
        lines = [f"{label},{' '.join(s for _, s in sorted(rated, reverse=first))}" for label, rated in by_class.items()]
        Path(submission).write_text("Class,Segments\n" + "\n".join(lines) + "\n")
        found = evaluate_submission(submission, world["parquet"], top_n=10)
        assert found.map_at_n == pytest.approx(_starter_segment_map(found.submission, ratings, 10))
        assert found.map_at_n == pytest.approx(expected) if expected else found.map_at_n < 1


@pytest.mark.parametrize(
    "text_, message",
    [
        ("VideoId,LabelConfidencePairs\n", "line 1 is 'VideoId,LabelConfidencePairs', not the header 'Class,Segments'"),
        ("Class,Segments\n3,a:0 b:5\n3,c:0\n", "line 3: not 'class,video:start ...' of a class not seen before"),
        ("Class,Segments\n3,a:0 b\n", "line 2: 'b' is not a segment id (video_id:start_second)"),
        ("Class,Segments\n3,a:0\n\x80\n", "line 3: not UTF-8 text (is it a segments.csv?)"),
    ],
)
def test_a_submission_that_is_not_one_is_refused_naming_its_line(tmp_path, text_, message):
    from storage.formats.segment_exports import SubmissionError, read_submission

    path = tmp_path / "segments.csv"
    path.write_bytes(text_.encode("latin-1"))  # \x80 alone: not UTF-8
    with pytest.raises(SubmissionError) as refused:
        read_submission(str(path))
    assert str(refused.value).endswith(message) and str(path) in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "asked, message",
    [
        ({"segments": -1}, "segments must be a whole number in 0..1000, not -1"),
        ({"segments": 1001}, "segments must be a whole number in 0..1000, not 1001"),
        ({"segments": 2, "segment_method": "middle"}, "segment_method must be one of model, attention, not 'middle'"),
    ],
)
def test_a_bad_segment_request_is_refused_in_one_line_before_any_run(asked, message):
    with pytest.raises(InferenceError) as refused:
        NightRequest(NIGHT, **asked).checked()
    assert str(refused.value) == message


def test_fine_tuning_on_rated_segments_registers_a_version_nights_score_with(world, tmp_path):
    from model import checkpoint
    from tasks.training import finetune_segments

    db_url = world["db"]
    tuned = finetune_segments(
        world["checkpoint"], world["parquet"], str(tmp_path / "tuned"), db_url, split="train", epochs=4,
        learning_rate=1e-3, batch_size=8,
    )  # fmt: skip
    assert tuned["version"] == world["version"] + 1 and tuned["steps"] > 0
    state, base = checkpoint.load(tuned["checkpoint_uri"]), checkpoint.load(world["checkpoint"])
    losses = state["history"]["epoch_loss"]
    assert len(losses) == 4 and losses[-1] < losses[0]  # it learns from the ratings
    assert state["finetuned"]["from"] == world["checkpoint"] and not checkpoint.same_weights(
        base["model"], state["model"]
    )
    assert count(db_url, "SELECT loss_plot_uri FROM model_versions WHERE version = :v", v=tuned["version"])
    report = run_inference(
        db_url, NIGHT, top_k=3, exports_uri=world["exports"], segments=M, model_version=tuned["version"]
    )
    assert (
        report.videos == _videos(db_url)
        and count(db_url, "SELECT COUNT(*) FROM segment_predictions") == report.videos * M
    )


# A part of a normal night reads its few new videos from each of thousands of files: batches of 1-10 videos.
_TINY_BATCHES = """
import resource, sys
import numpy as np, torch
from model.segments import rated_classes, top_segments
from storage.formats import segment_exports
from storage.formats.yt8m_spec import NUM_CLASSES
rng = np.random.default_rng(0)
scores = torch.from_numpy(rng.random((10, 60, len(rated_classes(NUM_CLASSES))), np.float32))
counts = torch.full((10,), 60)
fragment = segment_exports.PartSegments(sys.argv[1], 0)
def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def batches(n, start):
    for b in range(start, start + n):
        k = 1 + b % 10
        fragment.add([f"v{b}_{i}" for i in range(k)], top_segments(scores[:k], counts[:k], NUM_CLASSES, 5))
batches(500, 0)
warm = rss()
batches(5000, 500)
print(rss() - warm)
"""


def test_a_parts_segment_fragment_stays_flat_over_thousands_of_tiny_batches(tmp_path):
    """The miss the scale benchmark found (a night's peak RSS growing with it, 1.4-5.5 GB at full size): one
    small table kept per batch cost about 140 KB each beside the segment pass's large temporaries (+720 MB over
    these 5,000 batches); merged every 256 batches, the fragment grows with its rows alone (about 9 MB here)."""
    import os
    import subprocess
    import sys

    from tests.support.env import REPO

    grown = subprocess.run(
        [sys.executable, "-c", _TINY_BATCHES, str(tmp_path)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert float(grown.stdout.strip()) < 100, grown.stdout  # MB of peak RSS over 5,000 more batches


def test_a_compacted_segment_fragment_holds_every_batchs_rows(tmp_path, monkeypatch):
    from storage.formats import segment_exports
    from storage.formats.segment_rows import TopSegments

    rng = np.random.default_rng(1)
    batches = []
    for b in range(40):
        k = 1 + b % 4
        top = TopSegments(
            rng.choice(SEGMENT_CLASSES[:30], (k, 3)).astype(np.int32),
            (rng.integers(0, 20, (k, 3)) * SEGMENT_FRAMES).astype(np.int32),
            rng.random((k, 3)).astype(np.float32),
            rng.random((k, 3)) > 0.2,
        )
        batches.append(([f"v{b}_{i}" for i in range(k)], top))
    written = {}
    for every in (1_000_000, 7):  # never compacted; compacted every 7 batches
        monkeypatch.setattr(segment_exports, "COMPACT_EVERY", every)
        fragment = segment_exports.PartSegments(str(tmp_path / str(every)), 0)
        for ids, top in batches:
            fragment.add(ids, top)
        written[every] = pq.read_table(fragment.write()).to_pylist()
    assert written[7] == written[1_000_000] and len(written[7]) == sum(t.rows for _, t in batches)


def test_glibcs_mmap_threshold_can_be_fixed_here():
    """A part with segments fixes glibc's mmap threshold (tasks/native_memory.py: the night's RSS grew with the
    night otherwise, measured by the scale benchmark's segments stage); the call takes effect on this glibc."""
    import subprocess
    import sys

    from tests.support.env import REPO

    check = "from tasks import native_memory; print(native_memory.keep_large_blocks_mapped())"
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"
