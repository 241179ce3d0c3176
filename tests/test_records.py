"""YouTube-8M record decoding, and the synthetic generator checked by an independent TFRecord reader."""

import numpy as np
import pytest
from tfrecord.reader import tfrecord_loader

from storage.formats.yt8m_records import RecordDecodeError, decode_frame_level, decode_video_level, detect_level
from storage.formats.yt8m_spec import dequantize, quantize
from tasks.synth import SynthConfig, synth
from tests.support.shards import frame_record, video_record


def test_detects_both_levels():
    assert detect_level(frame_record()) == "frame"
    assert detect_level(video_record()) == "video"


def test_frame_level_decoding_keeps_bytes():
    video = decode_frame_level(frame_record("zz99", (3, 3861), frames=4, fill=250))
    assert (video.id, video.labels, video.num_frames) == ("zz99", [3, 3861], 4)
    assert video.rgb.tobytes() == b"".join(bytes([(250 + i) % 256]) * 1024 for i in range(4))
    assert video.audio.tobytes() == b"".join(bytes([(250 + i) % 256]) * 128 for i in range(4))
    assert video.rgb.shape == (4, 1024) and video.audio.shape == (4, 128)


def test_video_level_decoding():
    video = decode_video_level(video_record("cd34", (5, 7)))
    assert (video.id, video.labels) == ("cd34", [5, 7])
    assert video.mean_rgb.dtype == np.float32 and video.mean_rgb.shape == (1024,) and video.mean_rgb[0] == 0.25
    assert video.mean_audio.shape == (128,) and video.mean_audio[-1] == -0.5


@pytest.mark.parametrize(
    "record, decode, message",
    [
        (frame_record(drop=("id",)), decode_frame_level, "missing field 'id'"),
        (frame_record(drop=("labels",)), decode_frame_level, "missing field 'labels'"),
        (frame_record(drop=("audio",)), decode_frame_level, "missing feature list 'audio'"),
        (frame_record(labels=(3862,)), decode_frame_level, "label 3862 outside 0..3861"),
        (frame_record(frames=0), decode_frame_level, "no frames"),
        (video_record(drop=("mean_audio",)), decode_video_level, "missing field 'mean_audio'"),
        (b"\xff\xff\xff\xff not a protobuf", decode_frame_level, "not a tf.train.Example"),
    ],
)
def test_bad_records_say_what_is_wrong(record, decode, message):
    with pytest.raises(RecordDecodeError, match=message):
        decode(record)


def test_test_split_may_lack_labels():
    assert decode_frame_level(frame_record(drop=("labels",)), require_labels=False).labels == []


def test_not_youtube8m_at_all():
    with pytest.raises(RecordDecodeError, match="neither a frame-level"):
        detect_level(b"")


def test_quantization_matches_reference():
    x = np.array([-3.0, -2.0, 0.0, 1.0, 2.0, 5.0], dtype=np.float32)
    q = quantize(x)
    assert q.tolist() == [0, 0, 128, 191, 255, 255]
    assert np.allclose(dequantize(q.astype(np.float32)), q.astype(np.float64) * 4 / 255 + 4 / 512 - 2)


def test_synth_frame_level_is_read_by_an_independent_tfrecord_reader(tmp_path):
    (uri,) = synth(str(tmp_path), SynthConfig("frame", "train", shards=1, videos_per_shard=120, seed=3))
    loader = tfrecord_loader(
        uri, None, description={"id": "byte", "labels": "int"}, sequence_description={"rgb": "byte", "audio": "byte"}
    )
    ids, label_counts, frame_counts = set(), [], []
    for context, sequence in loader:
        ids.add(bytes(context["id"]).decode())
        labels = context["labels"].tolist()
        assert all(0 <= label < 3862 for label in labels)
        label_counts.append(len(labels))
        assert len(sequence["rgb"]) == len(sequence["audio"])
        assert all(len(frame) == 1024 for frame in sequence["rgb"])
        assert all(len(frame) == 128 for frame in sequence["audio"])
        frame_counts.append(len(sequence["rgb"]))
    assert len(ids) == 120 and all(len(i) == 4 for i in ids)
    assert min(label_counts) >= 1 and max(label_counts) <= 7 and 2.3 <= np.mean(label_counts) <= 3.7
    assert min(frame_counts) >= 1 and max(frame_counts) <= 300


def test_synth_video_level_is_read_by_an_independent_tfrecord_reader(tmp_path):
    (uri,) = synth(str(tmp_path), SynthConfig("video", "validate", shards=1, videos_per_shard=20))
    rows = list(
        tfrecord_loader(
            uri, None, description={"id": "byte", "labels": "int", "mean_rgb": "float", "mean_audio": "float"}
        )
    )
    assert len(rows) == 20
    assert all(r["mean_rgb"].shape == (1024,) and r["mean_audio"].shape == (128,) for r in rows)


def test_synth_labels_are_learnable_from_features(tmp_path):
    """Frames carry their labels' patterns: a nearest-pattern guess finds a true label far above chance."""
    config = SynthConfig("video", "train", shards=1, videos_per_shard=200, num_labels=50, seed=1)
    (uri,) = synth(str(tmp_path), config)
    rows = list(tfrecord_loader(uri, None, description={"labels": "int", "mean_rgb": "float"}))
    from tasks.synth import _Vocabulary

    vocab = _Vocabulary(config.num_labels, config.seed)
    hits = sum(int(vocab.labels[np.argmax(vocab.rgb @ r["mean_rgb"])]) in r["labels"].tolist() for r in rows)
    assert hits / len(rows) > 0.8  # chance is about 3/50


def test_synth_is_deterministic(tmp_path):
    a = synth(str(tmp_path / "a"), SynthConfig(shards=1, videos_per_shard=5, seed=9))[0]
    b = synth(str(tmp_path / "b"), SynthConfig(shards=1, videos_per_shard=5, seed=9))[0]
    assert open(a, "rb").read() == open(b, "rb").read()


@pytest.mark.parametrize("field, value", [("shards", 0), ("level", "clip"), ("num_labels", 4000)])
def test_synth_rejects_bad_parameters(tmp_path, field, value):
    with pytest.raises(ValueError, match=field.replace("_", "-")):
        synth(str(tmp_path), SynthConfig(**{field: value}))


def test_non_canonical_encoding_decodes_through_the_generic_path():
    """A valid record that TensorFlow would not write (an unknown field inside each frame's Feature)
    skips the fast path and still decodes to the same video."""
    from storage.formats.tf_example import SequenceExample

    canonical = SequenceExample()
    canonical.ParseFromString(frame_record("nc01", (4,), frames=3, fill=9))
    for name in ("rgb", "audio"):
        for frame in canonical.feature_lists.feature_list[name].feature:
            frame.ParseFromString(frame.SerializeToString() + b"\x28\x01")  # field 5, varint 1: unknown, kept
    unusual = canonical.SerializeToString()
    assert unusual != frame_record("nc01", (4,), frames=3, fill=9)
    expected, got = decode_frame_level(frame_record("nc01", (4,), frames=3, fill=9)), decode_frame_level(unusual)
    assert (got.id, got.labels, got.num_frames) == (expected.id, expected.labels, 3)
    assert np.array_equal(got.rgb, expected.rgb) and np.array_equal(got.audio, expected.audio)
