"""Synthetic YouTube-8M shards in exactly Google's format, with labels learnable from the features.

Each label of a small pool drawn from the real vocabulary's range owns an rgb and an audio pattern.
With `segments` (frame level), the pool is drawn from the 1,000 segment-rated classes and each video
carries rated 5-second segments in Google's format; a label's pattern is then only in its segments' frames.
A video draws 1-7 labels (3 on average) and 120-300 frames; about half its frames carry the pattern of
one of its labels on top of noise, the rest are noise alone. Features are quantized as Google's
extractor does (storage.formats.yt8m_spec.quantize).

Frame counts follow YouTube-8M's documented facts, not measured ones (the real frame-level data is not
at hand, only video level, which has no frame counts): videos are 120-500 s long, features are taken
at 1 frame per second, and readers cap a video at 300 frames (../shared/reference/yt8m_reference.md
gives the rate and the cap; the 120-500 s range is the dataset's selection rule). Durations are drawn
uniformly over 120-500 s, an assumption within that range, so 53% of videos hit the 300 cap and the
others spread evenly over 120-299 frames (257 frames a video on average). That mix is what padding and
length bucketing in model.data are measured on.
"""

import string
from dataclasses import dataclass

import numpy as np

from storage.errors import UsageError
from storage.formats.tf_example import Example, SequenceExample
from storage.formats.tfrecord import write_records
from storage.formats.yt8m_spec import (
    AUDIO_DIM,
    FRAME,
    LEVELS,
    MAX_FRAMES,
    NUM_CLASSES,
    RGB_DIM,
    SEGMENT_CLASSES,
    SEGMENT_FEATURES,
    SEGMENT_FRAMES,
    VIDEO,
    dequantize,
    quantize,
)
from storage.objectstore import S3Config, join, store_for

_ID_ALPHABET = string.digits + string.ascii_letters
_SPLIT_ID_BASE = {"train": 0, "validate": 4_000_000, "test": 8_000_000}
SHORTEST_SECONDS, LONGEST_SECONDS = 120, 500  # YouTube-8M's range of video durations; 1 frame a second


@dataclass(frozen=True)
class SynthConfig:
    level: str = "frame"
    split: str = "train"
    shards: int = 1
    videos_per_shard: int = 100
    num_labels: int = 50  # size of the label pool; small pools make the demo learn fast
    seed: int = 0
    segments: bool = False  # frame level: rated 5-second segments, as the 3rd edition's validate shards

    @property
    def pool(self) -> np.ndarray:
        """The classes labels are drawn from: every class, or the 1,000 segment-rated ones."""
        return np.asarray(SEGMENT_CLASSES) if self.segments else np.arange(NUM_CLASSES)

    def validate(self) -> None:
        if self.level not in LEVELS:
            raise UsageError(f"--level must be frame or video, not {self.level!r}")
        if self.split not in _SPLIT_ID_BASE:
            raise UsageError(f"--split must be train, validate or test, not {self.split!r}")
        for name in ("shards", "videos_per_shard", "num_labels"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.num_labels > len(self.pool):
            raise UsageError(f"--num-labels must be at most {len(self.pool)}")
        if self.segments and self.level != FRAME.name:
            raise UsageError("--segments: segment ratings are frame-level features")
        if self.shards * self.videos_per_shard > 4_000_000:
            raise UsageError("at most 4,000,000 videos a split (4-character ids)")


class _Vocabulary:
    """The label pool and its patterns: shared by every split of the same seed, so they agree."""

    def __init__(self, num_labels: int, seed: int, pool: np.ndarray | None = None):
        pool = np.arange(NUM_CLASSES) if pool is None else pool  # every class, unless segment-rated
        rng = np.random.default_rng([seed, 7])
        self.labels = np.sort(pool[rng.choice(len(pool), size=num_labels, replace=False)])
        self.rgb = rng.normal(0.0, 0.8, size=(num_labels, RGB_DIM)).astype(np.float32)
        self.audio = rng.normal(0.0, 0.8, size=(num_labels, AUDIO_DIM)).astype(np.float32)


def _video_id(n: int) -> str:
    chars = []
    for _ in range(4):
        n, r = divmod(n, len(_ID_ALPHABET))
        chars.append(_ID_ALPHABET[r])
    return "".join(reversed(chars))


def draw_num_frames(rng: np.random.Generator, size: int | None = None) -> np.ndarray:
    """Frame counts of `size` videos (one without): a duration in whole seconds, capped at MAX_FRAMES."""
    return np.minimum(MAX_FRAMES, rng.integers(SHORTEST_SECONDS, LONGEST_SECONDS + 1, size))


def _synth_video(rng: np.random.Generator, vocab: _Vocabulary):
    """(label ids, quantized rgb frames, quantized audio frames) of one video."""
    num_frames = int(draw_num_frames(rng))
    k = min(1 + int(rng.binomial(6, 1 / 3)), num_frames)
    picks = rng.choice(len(vocab.labels), size=k, replace=False)
    rgb = rng.normal(0.0, 0.6, size=(num_frames, RGB_DIM)).astype(np.float32)
    audio = rng.normal(0.0, 0.6, size=(num_frames, AUDIO_DIM)).astype(np.float32)
    # Like a real video's frames, each "on-topic" frame shows all of the video's labels at once.
    signal = rng.permutation(num_frames)[: max(1, num_frames // 2)]
    rgb[signal] += vocab.rgb[picks].sum(axis=0) / np.sqrt(k)
    audio[signal] += vocab.audio[picks].sum(axis=0) / np.sqrt(k)
    return sorted(int(label) for label in vocab.labels[picks]), quantize(rgb), quantize(audio)


def _synth_segment_video(rng: np.random.Generator, vocab: _Vocabulary):
    """A segment-rated video: each of its 1-3 labels' patterns only in two 5-second segments of its own (rated
    1), and one more segment rated 0 for it (a rater saw it absent); every other frame is noise. Returns
    (label ids, rgb, audio, (segment starts, labels, scores))."""
    num_frames = int(draw_num_frames(rng))
    picks = rng.choice(len(vocab.labels), size=1 + int(rng.binomial(2, 1 / 3)), replace=False)
    rgb = rng.normal(0.0, 0.6, size=(num_frames, RGB_DIM)).astype(np.float32)
    audio = rng.normal(0.0, 0.6, size=(num_frames, AUDIO_DIM)).astype(np.float32)
    windows = iter(rng.permutation(num_frames // SEGMENT_FRAMES) * SEGMENT_FRAMES)  # distinct, on the grid
    starts, labels, scores = [], [], []
    for pick in picks:
        label = int(vocab.labels[pick])
        for score in (1.0, 1.0, 0.0):
            start = int(next(windows))
            if score:
                rgb[start : start + SEGMENT_FRAMES] += vocab.rgb[pick]
                audio[start : start + SEGMENT_FRAMES] += vocab.audio[pick]
            starts.append(start), labels.append(label), scores.append(score)
    truth = sorted(int(label) for label in vocab.labels[picks])
    return truth, quantize(rgb), quantize(audio), (starts, labels, scores)


def _frame_record(video_id: str, labels: list[int], rgb: np.ndarray, audio: np.ndarray, segments=None) -> bytes:
    record = SequenceExample()
    record.context.feature["id"].bytes_list.value.append(video_id.encode())
    record.context.feature["labels"].int64_list.value.extend(labels)
    if segments is not None:  # Google's names and types: int64 starts and labels, float scores
        starts, segment_labels, scores = segments
        starts_name, labels_name, scores_name = SEGMENT_FEATURES
        record.context.feature[starts_name].int64_list.value.extend(starts)
        record.context.feature[labels_name].int64_list.value.extend(segment_labels)
        record.context.feature[scores_name].float_list.value.extend(scores)
    for name, frames in zip(FRAME.feature_names, (rgb, audio)):
        feature_list = record.feature_lists.feature_list[name].feature
        for frame in frames:
            feature_list.add().bytes_list.value.append(frame.tobytes())
    return record.SerializeToString()


def _video_record(video_id: str, labels: list[int], rgb: np.ndarray, audio: np.ndarray) -> bytes:
    record = Example()
    features = record.features.feature
    features["id"].bytes_list.value.append(video_id.encode())
    features["labels"].int64_list.value.extend(labels)
    # Google's video-level features are the means of the dequantized frames.
    for name, frames in zip(VIDEO.feature_names, (rgb, audio)):
        features[name].float_list.value.extend(dequantize(frames.astype(np.float32)).mean(axis=0).tolist())
    return record.SerializeToString()


_ENCODERS = {FRAME.name: _frame_record, VIDEO.name: _video_record}


def synth(out: str, config: SynthConfig, s3: S3Config | None = None) -> list[str]:
    """Write `config.shards` shards named like Google's (`train0000.tfrecord`) under `out`; return their URIs."""
    config.validate()
    vocab = _Vocabulary(config.num_labels, config.seed, config.pool)
    encode = _ENCODERS[config.level]
    uris = []
    for shard in range(config.shards):
        rng = np.random.default_rng([config.seed, _SPLIT_ID_BASE[config.split], shard])
        uri = join(out, f"{config.split}{shard:04d}.tfrecord")
        first_id = _SPLIT_ID_BASE[config.split] + shard * config.videos_per_shard

        def records(rng=rng, first_id=first_id):  # consumed within this iteration; bound to be sure
            for j in range(config.videos_per_shard):
                if config.segments:
                    yield _frame_record(_video_id(first_id + j), *_synth_segment_video(rng, vocab))
                else:
                    yield encode(_video_id(first_id + j), *_synth_video(rng, vocab))

        with store_for(uri, s3).publish(uri) as path, open(path, "wb") as f:
            write_records(f, records())
        uris.append(uri)
    return uris
