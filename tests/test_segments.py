"""Segment-rated shards (YouTube-8M's 3rd edition, issue 26 point 1): the 1,000 rated classes, segment
features decoded, checked and kept in the Parquet layout's version 2, the synthetic generator's segments
learnable, and a shard whose ratings are bad quarantined with one line naming the record."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from model.data import EpochSpec, ParquetBatches, find_row_groups
from storage.formats.parquet_layout import FRAME_SCHEMA, LAYOUT_VERSION_KEY, SEGMENT_FRAME_SCHEMA
from storage.formats.tfrecord import read_records
from storage.formats.yt8m_records import decode_frame_level
from storage.formats.yt8m_spec import NUM_CLASSES, SEGMENT_CLASSES, SEGMENT_FRAMES, dequantize
from tasks.ingest import ingest
from tasks.synth import SynthConfig, _Vocabulary, synth
from tests.support.shards import frame_record, write_shard


def test_the_spec_holds_googles_1000_segment_rated_classes_in_their_order():
    assert len(SEGMENT_CLASSES) == len(set(SEGMENT_CLASSES)) == 1000
    assert all(0 <= c < NUM_CLASSES for c in SEGMENT_CLASSES)
    # segment_label_ids.csv's first and last ids, in its (not sorted) order
    assert SEGMENT_CLASSES[:6] == (3, 7, 8, 11, 12, 17) and SEGMENT_CLASSES[12:14] == (31, 30)
    assert SEGMENT_CLASSES[-3:] == (1805, 1788, 1801)


def test_segment_rated_shards_keep_their_ratings_and_others_stay_version_1(tmp_path, sqlite_url):
    raw, dest = tmp_path / "raw", tmp_path / "parquet"
    config = SynthConfig("frame", "validate", shards=1, videos_per_shard=12, num_labels=8, seed=3, segments=True)
    synth(str(raw), config)
    synth(str(raw), SynthConfig("frame", "train", shards=1, videos_per_shard=4, seed=3))
    assert not ingest(str(raw), str(dest), sqlite_url).failed

    rated = pq.ParquetFile(dest / "frame" / "validate" / "validate0000.parquet")
    assert rated.schema_arrow.equals(SEGMENT_FRAME_SCHEMA) and rated.schema_arrow.metadata[LAYOUT_VERSION_KEY] == b"2"
    plain = pq.ParquetFile(dest / "frame" / "train" / "train0000.parquet")
    assert plain.schema_arrow.equals(FRAME_SCHEMA) and not plain.schema_arrow.metadata  # unchanged

    # The Parquet rows hold exactly what the records say, read back by the decoder from the TFRecord file.
    with open(raw / "validate0000.tfrecord", "rb") as f:
        decoded = [decode_frame_level(r.data) for r in read_records(f, "validate0000")]
    rows = rated.read(columns=["id", "segment_start_times", "segment_labels", "segment_scores"]).to_pylist()
    assert [(v.id, v.segments.start, v.segments.label, v.segments.score) for v in decoded] == [
        (r["id"], r["segment_start_times"], r["segment_labels"], r["segment_scores"]) for r in rows
    ]
    # Training and scoring read version 2 as they read version 1: by their columns.
    groups = find_row_groups(str(dest), "frame", "validate")
    batch = next(iter(ParquetBatches(groups, "frame", NUM_CLASSES, EpochSpec(4, shuffle=False, drop_last=False))))
    assert batch["ids"] == [v.id for v in decoded[:4]] and batch["rgb"].shape[0] == 4

    vocab = _Vocabulary(config.num_labels, config.seed, config.pool)
    for video in decoded:
        segments = video.segments
        assert set(segments.label) == set(video.labels) <= set(SEGMENT_CLASSES)
        assert all(s % SEGMENT_FRAMES == 0 and s + SEGMENT_FRAMES <= video.num_frames for s in segments.start)
        assert sorted(segments.score) == [0.0] * len(video.labels) + [1.0] * 2 * len(video.labels)
        # Learnable: a label's pattern shows in its segments rated 1, and in no other frame.
        frames = dequantize(video.rgb.astype(np.float32))
        for start, label, score in zip(segments.start, segments.label, segments.score):
            pattern = vocab.rgb[list(vocab.labels).index(label)]
            inside = float(frames[start : start + SEGMENT_FRAMES].mean(axis=0) @ pattern) / len(pattern)
            assert inside > 0.3 if score else inside < 0.1, (video.id, start, label, score, inside)


GOOD = {"segment_start_times": [0, 5], "segment_labels": [3, 7], "segment_scores": [1.0, 0.0]}


@pytest.mark.parametrize(
    "segments, reason",
    [
        ({**GOOD, "segment_start_times": [0, 7]}, "segment at 7 s is not on the 5-frame grid"),
        ({**GOOD, "segment_start_times": [0, 10]}, "segment at 10 s is outside its 12 frames"),
        ({**GOOD, "segment_labels": [3, 4]}, "segment at 5 s has label 4, not one of the 1,000 segment-rated classes"),
        ({**GOOD, "segment_scores": [1.0, 0.5]}, "segment at 5 s has score 0.5, not 0 or 1"),
        ({**GOOD, "segment_scores": [1.0]}, "2 segment starts, 2 labels and 1 scores: one each per segment"),
        (
            {k: v for k, v in GOOD.items() if k != "segment_scores"},
            "has segment_start_times, segment_labels but not segment_scores",
        ),
    ],
)
def test_bad_segment_ratings_quarantine_the_shard_naming_the_record(tmp_path, sqlite_url, segments, reason):
    raw, dest = tmp_path / "raw", tmp_path / "parquet"
    good = frame_record("ok01", labels=(3,), frames=12, segments=GOOD)
    shard = write_shard(raw / "validate0000.tfrecord", [good, frame_record("bad2", frames=12, segments=segments)])
    report = ingest(str(raw), str(dest), sqlite_url)
    (line,) = report.quarantined.values()
    assert line.startswith(f"{shard}: record 1 at byte offset ") and line.endswith(f"video 'bad2': {reason}")
    assert "\n" not in line and not (dest / "frame" / "validate" / "validate0000.parquet").exists()


def test_a_shard_rated_on_some_records_only_is_quarantined(tmp_path, sqlite_url):
    raw = tmp_path / "raw"
    records = [frame_record("ok01", frames=12, segments=GOOD), frame_record("no02", frames=12)]
    shard = write_shard(raw / "validate0000.tfrecord", records)
    (line,) = ingest(str(raw), str(tmp_path / "parquet"), sqlite_url).quarantined.values()
    assert line.startswith(f"{shard}: record 1 at byte offset ")
    assert line.endswith("video 'no02' has no segment ratings, unlike the file's first video")


def test_segments_are_frame_level_features():
    from storage.errors import UsageError

    with pytest.raises(UsageError, match="--segments: segment ratings are frame-level features"):
        synth("/tmp/unused", SynthConfig("video", segments=True))


@pytest.fixture(scope="module")
def rated_world(tmp_path_factory):
    """Segment-rated train and validate shards, ingested, and a TINY frame model trained on them."""
    from tasks.training import train_model
    from tests.support.db import migrated
    from tests.support.worlds import TINY

    root = tmp_path_factory.mktemp("rated")
    for split, videos in (("train", 48), ("validate", 24)):
        config = SynthConfig("frame", split, videos_per_shard=videos, num_labels=6, seed=5, segments=True)
        synth(str(root / "raw"), config)
    assert not ingest(str(root / "raw"), str(root / "parquet"), migrated(f"sqlite:///{root / 'vtag.db'}")).failed
    trained = train_model(str(root / "parquet"), str(root / "model"), "frame", preset="small", overrides={**TINY, "max_frames": 300}, progress=False)  # fmt: skip
    return {"parquet": str(root / "parquet"), "checkpoint": trained["checkpoint_uri"]}


@pytest.mark.parametrize("method", ["model", "attention"])
def test_segment_map_of_a_trained_model_is_the_starters_over_its_own_submission(rated_world, method):
    """Both ways of scoring segments score every 5-second segment of every validate video; the mAP@N they
    report is the starter's arithmetic over the submission they built (each rated class's best N)."""
    from model.segments import read_ratings, segment_starts
    from tasks.training import evaluate_segments
    from tests.test_segment_metrics import _starter_segment_map

    found = evaluate_segments(rated_world["checkpoint"], rated_world["parquet"], method, top_n=40)
    ratings = read_ratings(find_row_groups(rated_world["parquet"], "frame", "validate", lengths=False), None)
    frames = pq.read_table(f"{rated_world['parquet']}/frame/validate", columns=["num_frames"]).column(0).to_pylist()
    assert found.segments_scored == sum(len(segment_starts(n)) for n in frames) and found.rated == len(ratings)
    assert set(found.submission) == set(SEGMENT_CLASSES) and all(len(s) == 40 for s in found.submission.values())
    assert 0 < found.map_at_n <= 1
    assert found.map_at_n == pytest.approx(_starter_segment_map(found.submission, ratings, top_n=40), abs=1e-12)


def test_vtag_evaluate_segments_prints_one_line(rated_world):
    from tests.support.cli import vtag

    result = vtag("evaluate", "--checkpoint", rated_world["checkpoint"], "--data", rated_world["parquet"], "--segments",
                  "--segment-method", "attention", "--top-n", "100")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("segments of validate by the attention method: mAP@100 0.")
    refused = vtag("evaluate", "--checkpoint", rated_world["checkpoint"], "--data", rated_world["parquet"],
                   "--segments", "--split", "train", "--pattern", "nothing*")  # fmt: skip
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
