"""The Parquet layout that training, SQL users and tools rely on.

One file per input shard, same stem, under `<dest>/<level>/<split>/`. Features stay quantized
(uint8 bytes) at frame level; video level keeps Google's float32 means.
"""

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import VtagError
from storage.formats.yt8m_records import FrameVideo, VideoFeatures
from storage.formats.yt8m_spec import AUDIO_DIM, FRAME, LEVELS, MAX_FRAMES, RGB_DIM, SEGMENT_FEATURES, VIDEO, level_spec
from storage.objectstore import join

# Every column of either level (storage.formats.yt8m_spec names each level's, in order); none may be null.
COLUMN_TYPES = {
    "id": pa.string(),
    "labels": pa.list_(pa.int32()),
    "num_frames": pa.int32(),
    "rgb": pa.binary(),  # a video's frames, quantized, end to end: num_frames x 1024 bytes
    "audio": pa.binary(),
    "mean_rgb": pa.list_(pa.float32()),
    "mean_audio": pa.list_(pa.float32()),
}
SCHEMAS = {
    level: pa.schema([pa.field(name, COLUMN_TYPES[name], nullable=False) for name in level_spec(level).columns])
    for level in LEVELS
}
FRAME_SCHEMA, VIDEO_SCHEMA = SCHEMAS[FRAME.name], SCHEMAS[VIDEO.name]
# Version 2 of the frame-level contract: a shard with segment ratings keeps them, three list columns more
# (a video's rated segments, in the record's order: start second, class, score). Files of shards without
# ratings stay version 1, byte for byte the schema above; readers that name their columns read both.
SEGMENT_COLUMN_TYPES = dict(zip(SEGMENT_FEATURES, (pa.list_(pa.int32()), pa.list_(pa.int32()), pa.list_(pa.float32()))))
LAYOUT_VERSION_KEY = b"yt8m_layout_version"
SEGMENT_FRAME_SCHEMA = pa.schema(
    [*FRAME_SCHEMA, *(pa.field(name, kind, nullable=False) for name, kind in SEGMENT_COLUMN_TYPES.items())],
    metadata={LAYOUT_VERSION_KEY: b"2"},
)
SPLITS = ("train", "validate", "test")

# Chosen with `python -m benchmarks.parquet_layout` (README, "Parquet layout"): row groups of about 32 MiB keep
# a streaming reader's memory small while each column chunk is large enough for sequential reads;
# quantized features do not compress with snappy (0%) and barely with zstd-1 (~5%, at 4x the read
# time), so they are stored plain; the small columns and video-level floats use snappy.
ROW_GROUP_BYTES = 32 * 1024 * 1024
COMPRESSION = {
    "id": "snappy",
    "labels": "snappy",
    "num_frames": "snappy",
    "rgb": "none",
    "audio": "none",
    "mean_rgb": "snappy",
    "mean_audio": "snappy",
    **dict.fromkeys(SEGMENT_FEATURES, "snappy"),
}
COMPRESSION_LEVEL = None


class LayoutError(VtagError, ValueError):
    pass


def split_of(shard_name: str) -> str:
    match = re.match(r"(train|validate|test)", shard_name)
    if not match:
        raise LayoutError(
            f"cannot tell the split of shard {shard_name!r}: its name must start with train, validate or test"
        )
    return match.group(1)


def stem_of(shard_name: str) -> str:
    return shard_name[: -len(".tfrecord")] if shard_name.endswith(".tfrecord") else shard_name.rsplit(".", 1)[0]


def output_uri(dest: str, level: str, shard_name: str) -> str:
    return join(dest, level, split_of(shard_name), stem_of(shard_name) + ".parquet")


_spare_buffers: list[np.ndarray] = []


class _PackedBinaryColumn:
    """One row group's values of a binary column, packed into a buffer reused across row groups.

    Arrow wraps the buffer without copying. Buffers are also handed from one shard's writer to the
    next (release), since the page faults of fresh allocations cost more than the copy itself.
    """

    def __init__(self, capacity: int):
        spare = next((i for i, b in enumerate(_spare_buffers) if len(b) >= capacity), None)
        self._data = _spare_buffers.pop(spare) if spare is not None else np.empty(capacity, np.uint8)
        self._offsets = [0]

    def release(self) -> None:
        if len(_spare_buffers) < 4:
            _spare_buffers.append(self._data)

    def append(self, values: np.ndarray) -> None:
        start = self._offsets[-1]
        end = start + values.size
        if end > len(self._data):
            self._data = np.concatenate([self._data[:start], np.empty(max(end, 2 * len(self._data)) - start, np.uint8)])
        self._data[start:end].reshape(values.shape)[...] = values
        self._offsets.append(end)

    def to_arrow(self) -> pa.Array:
        offsets = np.asarray(self._offsets, np.int32)
        buffers = [None, pa.py_buffer(offsets), pa.py_buffer(self._data[: offsets[-1]])]
        return pa.Array.from_buffers(pa.binary(), len(offsets) - 1, buffers)

    def clear(self) -> None:
        self._offsets = [0]


class _FrameColumns:
    """A row group's num_frames, rgb and audio. Frames are copied out of their records at once, so a
    row group never pins its records."""

    def __init__(self, row_group_bytes: int, segments: bool = False):
        self._segments: list[list] | None = [[], [], []] if segments else None
        self._num_frames: list[int] = []
        # Room for a full row group plus one longest video, so that the video that fills it fits.
        self._rgb = _PackedBinaryColumn(row_group_bytes + MAX_FRAMES * RGB_DIM)
        self._audio = _PackedBinaryColumn(row_group_bytes * AUDIO_DIM // RGB_DIM + MAX_FRAMES * AUDIO_DIM)

    def add(self, video: FrameVideo) -> int:
        """Buffer the video's columns; returns the bytes they take."""
        self._num_frames.append(video.num_frames)
        self._rgb.append(video.rgb)
        self._audio.append(video.audio)
        if self._segments is not None:
            for column, values in zip(
                self._segments, (video.segments.start, video.segments.label, video.segments.score)
            ):
                column.append(values)
        return video.rgb.size + video.audio.size

    def arrays(self) -> list[pa.Array]:
        arrays = [pa.array(self._num_frames, pa.int32()), self._rgb.to_arrow(), self._audio.to_arrow()]
        if self._segments is not None:
            arrays += [pa.array(v, kind) for v, kind in zip(self._segments, SEGMENT_COLUMN_TYPES.values())]
        return arrays

    def clear(self) -> None:
        self._segments = None if self._segments is None else [[], [], []]
        self._num_frames = []
        self._rgb.clear()
        self._audio.clear()

    def release(self) -> None:
        self._rgb.release()
        self._audio.release()


class _VideoColumns:
    """A row group's mean_rgb and mean_audio."""

    def __init__(self):
        self._mean_rgb: list[np.ndarray] = []
        self._mean_audio: list[np.ndarray] = []

    def add(self, video: VideoFeatures) -> int:
        self._mean_rgb.append(video.mean_rgb)
        self._mean_audio.append(video.mean_audio)
        return (RGB_DIM + AUDIO_DIM) * 4  # float32

    def arrays(self) -> list[pa.Array]:
        return [pa.array(self._mean_rgb, pa.list_(pa.float32())), pa.array(self._mean_audio, pa.list_(pa.float32()))]

    def clear(self) -> None:
        self._mean_rgb, self._mean_audio = [], []

    def release(self) -> None:
        pass


class ShardParquetWriter:
    """Writes decoded videos of one shard into row groups of about ROW_GROUP_BYTES, streaming. At frame
    level the first video decides the contract's version: with segment ratings, every video of the file
    carries them (SEGMENT_FRAME_SCHEMA); without, none does (FRAME_SCHEMA)."""

    def __init__(
        self,
        path: Path,
        level: str,
        row_group_bytes: int = ROW_GROUP_BYTES,
        compression: str | dict = COMPRESSION,
        compression_level: int | dict | None = COMPRESSION_LEVEL,
    ):
        self.path, self.level, self.schema = path, level, SCHEMAS[level]
        self.row_group_bytes = row_group_bytes
        self._compression, self._compression_level = compression, compression_level
        self._writer: pq.ParquetWriter | None = None  # opened by the first video, which sets the schema
        self._ids: list[str] = []
        self._labels: list[list[int]] = []
        self._features = None
        self._buffered = 0
        self.rows_written = 0

    @property
    def segments(self) -> bool | None:
        """Whether the file keeps segment ratings; None until its first video."""
        return None if self._writer is None else self.schema is SEGMENT_FRAME_SCHEMA

    def _open(self, segments: bool) -> None:
        if segments:
            self.schema = SEGMENT_FRAME_SCHEMA
        compression, level = self._compression, self._compression_level
        if isinstance(compression, dict):
            compression = {name: compression[name] for name in self.schema.names}
        if isinstance(level, dict):
            level = {name: v for name, v in level.items() if name in self.schema.names}
        self._writer = pq.ParquetWriter(
            str(self.path),
            self.schema,
            compression=compression,
            compression_level=level,
            use_dictionary=False,  # ids are unique and labels few: dictionaries would only cost
            write_statistics=["id", "num_frames"],
        )
        per_frame = level_spec(self.level).per_frame
        self._features = _FrameColumns(self.row_group_bytes, segments) if per_frame else _VideoColumns()

    def add(self, video: FrameVideo | VideoFeatures) -> None:
        rated = getattr(video, "segments", None) is not None
        if self._writer is None:
            self._open(rated)
        elif rated != self.segments:
            raise LayoutError(
                f"video {video.id!r} {'has' if rated else 'has no'} segment ratings, unlike the file's first video"
            )
        self._ids.append(video.id)
        self._labels.append(video.labels)
        self._buffered += self._features.add(video)
        if self._buffered >= self.row_group_bytes:
            self.flush()

    def _columns(self) -> list[pa.Array]:
        common = [pa.array(self._ids, pa.string()), pa.array(self._labels, pa.list_(pa.int32()))]
        return common + self._features.arrays()

    def flush(self) -> None:
        if not self._ids:
            return
        rows = len(self._ids)
        self._writer.write_table(pa.Table.from_arrays(self._columns(), schema=self.schema), row_group_size=rows)
        self.rows_written += rows
        self._buffered = 0
        self._ids, self._labels = [], []
        self._features.clear()

    def close(self) -> None:
        if self._writer is None:  # no video: an empty file of the level's first version
            self._open(False)
        try:
            self.flush()
        finally:
            self._writer.close()
            self._features.release()
