"""Decoding of YouTube-8M records (google/youtube-8m readers.py) from serialized protobufs.

Frame level: one SequenceExample per video, context `id`, `labels`, feature lists `rgb` (1024 uint8 a
frame) and `audio` (128 uint8 a frame); a segment-rated record's context also holds its rated segments
(`segment_start_times`, `segment_labels`, `segment_scores`). Video level: one Example per video, `id`, `labels`,
`mean_rgb` (1024 floats), `mean_audio` (128 floats). Names and sizes come from storage.formats.yt8m_spec.
"""

from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from storage.errors import VtagError
from storage.formats.tf_example import Features, SequenceExample
from storage.formats.yt8m_spec import (
    FRAME,
    MAX_ID_LENGTH,
    NUL_REFUSED,
    NUM_CLASSES,
    SEGMENT_CLASS_SET,
    SEGMENT_FEATURES,
    SEGMENT_FRAMES,
    VIDEO,
)


class RecordDecodeError(VtagError, ValueError):
    """The record is framed correctly but is not the YouTube-8M record it should be."""


@dataclass(frozen=True)
class Segments:
    """A video's rated 5-second segments (the 3rd edition's segment-rated data), one entry each."""

    start: list[int]  # its first frame, in seconds (frames are one a second), on the 5-frame grid
    label: list[int]  # one of the 1,000 segment-rated classes
    score: list[float]  # 1.0: the class is there; 0.0: a rater said it is not


@dataclass
class FrameVideo:
    id: str
    labels: list[int]
    num_frames: int
    rgb: np.ndarray  # uint8, num_frames x 1024, still quantized (may be a view into the record)
    audio: np.ndarray  # uint8, num_frames x 128
    segments: Segments | None = None  # None: the record carries no segment ratings


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
    if FRAME.rgb.name in message.feature_lists.feature_list:
        return FRAME.name
    if VIDEO.rgb.name in message.context.feature:
        return VIDEO.name
    raise RecordDecodeError("neither a frame-level record (feature list 'rgb') nor a video-level one ('mean_rgb')")


def _context(context, require_labels: bool):
    features = context.feature
    if "id" not in features or len(features["id"].bytes_list.value) != 1:
        raise RecordDecodeError("missing field 'id' (one bytes value)")
    try:
        video_id = features["id"].bytes_list.value[0].decode("ascii")
    except UnicodeDecodeError:
        raise RecordDecodeError("field 'id' is not ASCII") from None
    if not video_id:
        raise RecordDecodeError("field 'id' is empty")
    if "\x00" in video_id:
        raise RecordDecodeError(f"video id {video_id!r} holds a NUL byte ({NUL_REFUSED})")
    if len(video_id) > MAX_ID_LENGTH:
        raise RecordDecodeError(
            f"video id {video_id[:MAX_ID_LENGTH]!r}... is {len(video_id)} characters, "
            f"longer than the catalogue's {MAX_ID_LENGTH}"
        )
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


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _frame_header(dim: int) -> bytes:
    """The bytes before each frame in a canonically encoded FeatureList: Feature{bytes_list{value: dim bytes}}."""
    value = b"\x0a" + _encode_varint(dim)
    bytes_list = b"\x0a" + _encode_varint(len(value) + dim)
    return b"\x0a" + _encode_varint(len(bytes_list) + len(value) + dim) + bytes_list + value


_FRAME_HEADERS = {dim: np.frombuffer(_frame_header(dim), np.uint8) for _, dim in FRAME.features}


def _outer_spans(data: bytes) -> tuple[tuple[int, int] | None, dict[bytes, tuple[int, int]]]:
    """Byte spans of the context and of each FeatureList's content, walking only the outer protobuf
    levels. Raises IndexError or ValueError on anything malformed or unusual: the caller then falls
    back to a full parse, which names the problem."""
    context, spans, pos, end = None, {}, 0, len(data)
    while pos < end:
        tag, pos = _varint(data, pos)
        if tag & 7 != 2:
            raise ValueError("unexpected wire type")
        length, pos = _varint(data, pos)
        if pos + length > end:
            raise ValueError("field runs past the record")
        if tag >> 3 == 1:  # SequenceExample.context
            if context is not None:
                raise ValueError("context given twice: protobuf would merge the two")
            context = (pos, pos + length)
        elif tag >> 3 == 2:  # SequenceExample.feature_lists
            if spans:
                raise ValueError("feature_lists given twice: protobuf would merge the two")
            entry_pos, entries_end = pos, pos + length
            while entry_pos < entries_end:
                _, entry_pos = _varint(data, entry_pos)
                entry_len, entry_pos = _varint(data, entry_pos)
                key, value, field_pos = b"", None, entry_pos
                while field_pos < entry_pos + entry_len:
                    field_tag, field_pos = _varint(data, field_pos)
                    field_len, field_pos = _varint(data, field_pos)
                    if field_tag == 0x0A:
                        key = data[field_pos : field_pos + field_len]
                    elif field_tag == 0x12:
                        value = (field_pos, field_pos + field_len)
                    field_pos += field_len
                if value is not None:
                    spans[key] = value
                entry_pos += entry_len
        pos += length
    return context, spans


def _frames_fast(data: bytes, span: tuple[int, int] | None, dim: int) -> np.ndarray | None:
    """Frames as a zero-copy (n, dim) view when every frame has the canonical header, else None.

    This is how TensorFlow serializes YouTube-8M frames; it replaces a Python loop over frames with
    one vectorized check, which is most of the decode time at frame level.
    """
    if span is None:
        return None
    header = _FRAME_HEADERS[dim]
    stride = len(header) + dim
    start, end = span
    if (end - start) % stride:
        return None
    frames = np.frombuffer(data, np.uint8, count=end - start, offset=start).reshape(-1, stride)
    if not (frames[:, : len(header)] == header).all():
        return None
    return frames[:, len(header) :]


def _frames_joined(message, name: str, dim: int, video_id: str) -> np.ndarray:
    """Frames from a parsed message, for records that are not in TensorFlow's canonical layout."""
    feature_lists = message.feature_lists.feature_list
    if name not in feature_lists:
        raise RecordDecodeError(f"video {video_id!r}: missing feature list {name!r}")
    frames = feature_lists[name].feature
    try:
        joined = b"".join([frame.bytes_list.value[0] for frame in frames])
    except IndexError:
        raise RecordDecodeError(f"video {video_id!r}: a frame of {name!r} has no bytes value") from None
    if len(joined) != len(frames) * dim:
        raise RecordDecodeError(f"video {video_id!r}: {name!r} frames are not {dim} bytes each")
    return np.frombuffer(joined, np.uint8).reshape(len(frames), dim)


def _segments(features, video_id: str, num_frames: int) -> Segments | None:
    """The record's rated segments, checked: the three context lists together and as long as each other, each
    segment inside the video and on the 5-frame grid, of one of the 1,000 rated classes, scored 0 or 1."""
    present = [name for name in SEGMENT_FEATURES if name in features]
    if not present:
        return None
    if len(present) != len(SEGMENT_FEATURES):
        missing = ", ".join(name for name in SEGMENT_FEATURES if name not in present)
        raise RecordDecodeError(f"video {video_id!r}: has {', '.join(present)} but not {missing}")
    starts_name, labels_name, scores_name = SEGMENT_FEATURES
    segments = Segments(
        [int(v) for v in features[starts_name].int64_list.value],
        [int(v) for v in features[labels_name].int64_list.value],
        [float(v) for v in features[scores_name].float_list.value],
    )
    if not len(segments.start) == len(segments.label) == len(segments.score):
        raise RecordDecodeError(
            f"video {video_id!r}: {len(segments.start)} segment starts, {len(segments.label)} labels and "
            f"{len(segments.score)} scores: one each per segment"
        )
    for start, label, score in zip(segments.start, segments.label, segments.score):
        if start % SEGMENT_FRAMES or not 0 <= start <= num_frames - SEGMENT_FRAMES:
            where = "not on the 5-frame grid" if start % SEGMENT_FRAMES else f"outside its {num_frames} frames"
            raise RecordDecodeError(f"video {video_id!r}: segment at {start} s is {where}")
        if label not in SEGMENT_CLASS_SET:
            raise RecordDecodeError(
                f"video {video_id!r}: segment at {start} s has label {label}, not one of the 1,000 segment-rated classes"
            )
        if score not in (0.0, 1.0):
            raise RecordDecodeError(f"video {video_id!r}: segment at {start} s has score {score}, not 0 or 1")
    return segments


def _frame_video(video_id: str, labels: list[int], rgb: np.ndarray, audio: np.ndarray, context) -> FrameVideo:
    # Frames are quantized bytes: every value dequantizes to a finite float, so there is nothing to refuse.
    if len(audio) != len(rgb):
        raise RecordDecodeError(f"video {video_id!r}: {len(rgb)} rgb frames but {len(audio)} audio frames")
    if len(rgb) == 0:  # nothing to attend over: the model's masked softmax would turn it into NaN
        raise RecordDecodeError(f"video {video_id!r}: no frames")
    return FrameVideo(video_id, labels, len(rgb), rgb, audio, _segments(context.feature, video_id, len(rgb)))


def _decode_canonical(data: bytes, require_labels: bool) -> FrameVideo | None:
    """The fast path: only the small context goes through protobuf; frames are viewed in place."""
    try:
        context_span, spans = _outer_spans(data)
    except (IndexError, ValueError):
        return None
    if context_span is None:
        return None
    rgb, audio = (_frames_fast(data, spans.get(name.encode()), dim) for name, dim in FRAME.features)
    if rgb is None or audio is None:
        return None
    context = Features()
    try:
        context.ParseFromString(data[context_span[0] : context_span[1]])
    except DecodeError:
        return None
    video_id, labels = _context(context, require_labels)
    return _frame_video(video_id, labels, rgb, audio, context)


def decode_frame_level(data: bytes, require_labels: bool = True) -> FrameVideo:
    fast = _decode_canonical(data, require_labels)
    if fast is not None:
        return fast
    message = _parse(data)
    video_id, labels = _context(message.context, require_labels)
    rgb, audio = (_frames_joined(message, name, dim, video_id) for name, dim in FRAME.features)
    return _frame_video(video_id, labels, rgb, audio, message.context)


def _floats(features, name: str, dim: int, video_id: str) -> np.ndarray:
    if name not in features:
        raise RecordDecodeError(f"video {video_id!r}: missing field {name!r}")
    values = np.array(features[name].float_list.value, dtype=np.float32)
    if values.shape != (dim,):
        raise RecordDecodeError(f"video {video_id!r}: {name!r} has {values.size} floats, expected {dim}")
    # A NaN or infinity would turn every loss, score and metric it reaches into NaN, far from here.
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise RecordDecodeError(
            f"video {video_id!r}: {name!r} holds {values[bad[0]]} at index {bad[0]} ({bad.size} non-finite values)"
        )
    return values


def decode_video_level(data: bytes, require_labels: bool = True) -> VideoFeatures:
    message = _parse(data)
    video_id, labels = _context(message.context, require_labels)
    mean_rgb, mean_audio = (_floats(message.context.feature, name, dim, video_id) for name, dim in VIDEO.features)
    return VideoFeatures(video_id, labels, mean_rgb, mean_audio)
