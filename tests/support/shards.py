"""Helpers that build and damage small shards for the tests."""

import struct
from pathlib import Path

from storage.formats.tf_example import Example, SequenceExample
from storage.formats.tfrecord import write_records


def frame_record(video_id="ab12", labels=(1, 2), frames=3, fill=7, drop=(), segments=None) -> bytes:
    """`segments`: {context feature name: values} of segment ratings, as Google writes them (starts and
    labels int64, scores float), put in as given, for tests of bad ones too."""
    record = SequenceExample()
    for name, values in (segments or {}).items():
        kind = "float_list" if name == "segment_scores" else "int64_list"
        getattr(record.context.feature[name], kind).value.extend(values)
    if "id" not in drop:
        record.context.feature["id"].bytes_list.value.append(video_id.encode())
    if "labels" not in drop:
        record.context.feature["labels"].int64_list.value.extend(labels)
    for name, dim in (("rgb", 1024), ("audio", 128)):
        if name in drop:
            continue
        feature_list = record.feature_lists.feature_list[name].feature
        for i in range(frames):
            feature_list.add().bytes_list.value.append(bytes([(fill + i) % 256]) * dim)
    return record.SerializeToString()


def video_record(video_id="cd34", labels=(5,), drop=()) -> bytes:
    record = Example()
    features = record.features.feature
    if "id" not in drop:
        features["id"].bytes_list.value.append(video_id.encode())
    if "labels" not in drop:
        features["labels"].int64_list.value.extend(labels)
    if "mean_rgb" not in drop:
        features["mean_rgb"].float_list.value.extend([0.25] * 1024)
    if "mean_audio" not in drop:
        features["mean_audio"].float_list.value.extend([-0.5] * 128)
    return record.SerializeToString()


def write_shard(path: Path, records: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        write_records(f, records)
    return path


def record_offsets(path: Path) -> list[int]:
    data, offsets, offset = path.read_bytes(), [], 0
    while offset < len(data):
        offsets.append(offset)
        offset += 16 + struct.unpack("<Q", data[offset : offset + 8])[0]
    return offsets


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def write_tiny_shards(folder: Path, indexes, split: str = "train") -> list[Path]:
    """One one-frame video per shard, named like Google's (`train0007.tfrecord` holds video `t0007`):
    thousands of shards in a second, for tests about counts rather than content."""
    return [
        write_shard(folder / f"{split}{i:04d}.tfrecord", [frame_record(f"t{i:04d}", frames=1, fill=i % 256)])
        for i in indexes
    ]
