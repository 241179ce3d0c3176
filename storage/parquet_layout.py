"""The Parquet layout that training, SQL users and tools rely on.

One file per input shard, same stem, under `<dest>/<level>/<split>/`. Features stay quantized
(uint8 bytes) at frame level; video level keeps Google's float32 means.
"""

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage.objectstore import join
from storage.yt8m_records import FrameVideo, VideoFeatures

FRAME_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("labels", pa.list_(pa.int32()), nullable=False),
        pa.field("num_frames", pa.int32(), nullable=False),
        pa.field("rgb", pa.binary(), nullable=False),
        pa.field("audio", pa.binary(), nullable=False),
    ]
)
VIDEO_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("labels", pa.list_(pa.int32()), nullable=False),
        pa.field("mean_rgb", pa.list_(pa.float32()), nullable=False),
        pa.field("mean_audio", pa.list_(pa.float32()), nullable=False),
    ]
)
SCHEMAS = {"frame": FRAME_SCHEMA, "video": VIDEO_SCHEMA}
SPLITS = ("train", "validate", "test")

# Chosen with benchmarks/parquet_layout.py (README, "Parquet layout"): row groups of about 32 MiB keep
# a streaming reader's memory small while each column chunk is large enough for sequential reads;
# zstd level 1 costs little CPU next to the decode.
ROW_GROUP_BYTES = 32 * 1024 * 1024
COMPRESSION = "zstd"
COMPRESSION_LEVEL = 1


class LayoutError(ValueError):
    pass


def split_of(shard_name: str) -> str:
    match = re.match(r"(train|validate|test)", shard_name)
    if not match:
        raise LayoutError(f"cannot tell the split of shard {shard_name!r}: its name must start with train, validate or test")
    return match.group(1)


def stem_of(shard_name: str) -> str:
    return shard_name[: -len(".tfrecord")] if shard_name.endswith(".tfrecord") else shard_name.rsplit(".", 1)[0]


def output_uri(dest: str, level: str, shard_name: str) -> str:
    return join(dest, level, split_of(shard_name), stem_of(shard_name) + ".parquet")


class ShardParquetWriter:
    """Writes decoded videos of one shard into row groups of about ROW_GROUP_BYTES, streaming."""

    def __init__(self, path: Path, level: str, row_group_bytes: int = ROW_GROUP_BYTES,
                 compression: str = COMPRESSION, compression_level: int | None = COMPRESSION_LEVEL):
        self.level = level
        self.schema = SCHEMAS[level]
        self.row_group_bytes = row_group_bytes
        self._writer = pq.ParquetWriter(
            str(path), self.schema, compression=compression, compression_level=compression_level,
            use_dictionary=["id"], write_statistics=["id", "num_frames"],
        )
        self._rows: list = []
        self._buffered = 0
        self.rows_written = 0

    def add(self, video: FrameVideo | VideoFeatures) -> None:
        self._rows.append(video)
        self._buffered += len(video.rgb) + len(video.audio) if self.level == "frame" else (1024 + 128) * 4
        if self._buffered >= self.row_group_bytes:
            self.flush()

    def _table(self) -> pa.Table:
        rows = self._rows
        ids = pa.array([v.id for v in rows], pa.string())
        labels = pa.array([v.labels for v in rows], pa.list_(pa.int32()))
        if self.level == "frame":
            columns = [ids, labels, pa.array([v.num_frames for v in rows], pa.int32()),
                       pa.array([v.rgb for v in rows], pa.binary()), pa.array([v.audio for v in rows], pa.binary())]
        else:
            columns = [ids, labels, pa.array([v.mean_rgb for v in rows], pa.list_(pa.float32())),
                       pa.array([v.mean_audio for v in rows], pa.list_(pa.float32()))]
        return pa.Table.from_arrays(columns, schema=self.schema)

    def flush(self) -> None:
        if self._rows:
            self._writer.write_table(self._table(), row_group_size=len(self._rows))
            self.rows_written += len(self._rows)
            self._rows, self._buffered = [], 0

    def close(self) -> None:
        self.flush()
        self._writer.close()
