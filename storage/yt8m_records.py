"""Decoding of YouTube-8M records (google/youtube-8m readers.py) from serialized protobufs.

Frame level: one SequenceExample per video, context `id`, `labels`, feature lists `rgb` (1024 uint8 a
frame) and `audio` (128 uint8 a frame). Video level: one Example per video, `id`, `labels`,
`mean_rgb` (1024 floats), `mean_audio` (128 floats).
"""

from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from storage.tf_example import SequenceExample

RGB_DIM = 1024
AUDIO_DIM = 128
NUM_CLASSES = 3862
LEVELS = ("frame", "video")


class RecordDecodeError(ValueError):
    """The record is framed correctly but is not the YouTube-8M record it should be."""


@dataclass
class FrameVideo:
    id: str
    labels: list[int]
    num_frames: int
    rgb: bytes  # num_frames x 1024 uint8, frame after frame
    audio: bytes  # num_frames x 128 uint8


@dataclass
class VideoFeatures:
    id: str
    labels: list[int]
    mean_rgb: np.ndarray  # float32 x 1024
    mean_audio: np.ndarray  # float32 x 128


def _parse(data: bytes):
    # Example and a context-only SequenceExample share one wire format, so one parse serves both levels.
    message = SequenceExample()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise RecordDecodeError(f"not a tf.train.Example or SequenceExample protobuf ({exc})") from None
    return message


def detect_level(data: bytes) -> str:
    message = _parse(data)
    if "rgb" in message.feature_lists.feature_list:
        return "frame"
    if "mean_rgb" in message.context.feature:
        return "video"
    raise RecordDecodeError("neither a frame-level record (feature list 'rgb') nor a video-level one ('mean_rgb')")


def _context(message, require_labels: bool):
    features = message.context.feature
    if "id" not in features or len(features["id"].bytes_list.value) != 1:
        raise RecordDecodeError("missing field 'id' (one bytes value)")
    try:
        video_id = features["id"].bytes_list.value[0].decode("ascii")
    except UnicodeDecodeError:
        raise RecordDecodeError("field 'id' is not ASCII") from None
    if "labels" in features:
        labels = list(features["labels"].int64_list.value)
    elif require_labels:
        raise RecordDecodeError(f"video {video_id!r}: missing field 'labels'")
    else:
        labels = []
    for label in labels:
        if not 0 <= label < NUM_CLASSES:
            raise RecordDecodeError(f"video {video_id!r}: label {label} outside 0..{NUM_CLASSES - 1}")
    return video_id, labels


def _frames(feature_lists, name: str, dim: int, video_id: str) -> tuple[int, bytes]:
    if name not in feature_lists:
        raise RecordDecodeError(f"video {video_id!r}: missing feature list {name!r}")
    frames = feature_lists[name].feature
    try:
        joined = b"".join([frame.bytes_list.value[0] for frame in frames])
    except IndexError:
        raise RecordDecodeError(f"video {video_id!r}: a frame of {name!r} has no bytes value") from None
    if len(joined) != len(frames) * dim:
        raise RecordDecodeError(f"video {video_id!r}: {name!r} frames are not {dim} bytes each")
    return len(frames), joined


def decode_frame_level(data: bytes, require_labels: bool = True) -> FrameVideo:
    message = _parse(data)
    video_id, labels = _context(message, require_labels)
    feature_lists = message.feature_lists.feature_list
    num_frames, rgb = _frames(feature_lists, "rgb", RGB_DIM, video_id)
    audio_frames, audio = _frames(feature_lists, "audio", AUDIO_DIM, video_id)
    if audio_frames != num_frames:
        raise RecordDecodeError(f"video {video_id!r}: {num_frames} rgb frames but {audio_frames} audio frames")
    return FrameVideo(video_id, labels, num_frames, rgb, audio)


def _floats(features, name: str, dim: int, video_id: str) -> np.ndarray:
    if name not in features:
        raise RecordDecodeError(f"video {video_id!r}: missing field {name!r}")
    values = np.array(features[name].float_list.value, dtype=np.float32)
    if values.shape != (dim,):
        raise RecordDecodeError(f"video {video_id!r}: {name!r} has {values.size} floats, expected {dim}")
    return values


def decode_video_level(data: bytes, require_labels: bool = True) -> VideoFeatures:
    message = _parse(data)
    video_id, labels = _context(message, require_labels)
    features = message.context.feature
    return VideoFeatures(
        video_id, labels, _floats(features, "mean_rgb", RGB_DIM, video_id), _floats(features, "mean_audio", AUDIO_DIM, video_id)
    )
