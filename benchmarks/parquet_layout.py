"""How compression and row-group size change Parquet size, write and streaming-read rates.

    python -m benchmarks.parquet_layout [--videos 400]

Frame level on synthetic shards (quantized features), video level on the real shards in
../shared/yt8m/video_level. A streaming read goes row group by row group, as a training loader does.
The layout storage/formats/parquet_layout.py uses was chosen from these figures (README, "Parquet layout").
"""

import argparse
import itertools
import os
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from benchmarks.common import frame_shards, timed
from storage.formats.parquet_layout import COMPRESSION, ShardParquetWriter
from storage.formats.tfrecord import read_records
from storage.formats.yt8m_records import decode_frame_level, decode_video_level
from storage.formats.yt8m_spec import AUDIO_DIM, RGB_DIM, level_spec

SHARED = Path(__file__).resolve().parents[2] / "shared" / "yt8m" / "video_level"
FEATURE_COLUMNS = ("rgb", "audio", "mean_rgb", "mean_audio")


def _decode(paths, decode):
    videos = []
    for path in paths:
        with open(path, "rb") as f:
            videos.extend(decode(record.data) for record in read_records(f, str(path)))
    return videos


def _features(codec: str) -> dict:
    return {**COMPRESSION, **{c: codec for c in FEATURE_COLUMNS}}


def measure(videos, level, out: Path, compression, row_group_bytes, repeat=3):
    best_write = best_read = None
    for _ in range(repeat):
        out.unlink(missing_ok=True)
        with timed() as w:
            levels = {c: 1 for c, codec in compression.items() if codec == "zstd"} or None
            writer = ShardParquetWriter(
                out, level, row_group_bytes=row_group_bytes, compression=compression, compression_level=levels
            )
            for video in videos:
                writer.add(video)
            writer.close()
        with timed() as r:
            for _batch in pq.ParquetFile(out).iter_batches(batch_size=64, use_threads=False):
                pass
        best_write = w if best_write is None or w.cpu < best_write.cpu else best_write
        best_read = r if best_read is None or r.cpu < best_read.cpu else best_read
    raw = sum(v.rgb.size + v.audio.size if level_spec(level).per_frame else 4 * (RGB_DIM + AUDIO_DIM) for v in videos)
    return (
        os.path.getsize(out) / raw,
        raw / 1e6 / best_write.cpu,
        raw / 1e6 / best_read.cpu,
        pq.ParquetFile(out).num_row_groups,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=400)
    args = parser.parse_args()
    frame_paths = frame_shards(Path(tempfile.gettempdir()) / "vtag-bench-frames", 2, args.videos // 2)
    cases = {
        "frame": _decode(frame_paths, decode_frame_level),
        "video": _decode(sorted(SHARED.glob("validate00[0-3]?.tfrecord")), decode_video_level),
    }
    print(
        f"{'level':6s} {'features codec':15s} {'row group':>10s} {'groups':>6s} {'size/raw':>9s} "
        f"{'write MB/s':>10s} {'read MB/s':>10s}"
    )
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "x.parquet"
        for (level, videos), codec in itertools.product(cases.items(), ("none", "snappy", "lz4", "zstd")):
            size, write, read, groups = measure(videos, level, out, _features(codec), 32 << 20)
            print(f"{level:6s} {codec:15s} {'32 MiB':>10s} {groups:6d} {size:9.3f} {write:10.0f} {read:10.0f}")
        for mib in (8, 32, 128):
            size, write, read, groups = measure(cases["frame"], "frame", out, COMPRESSION, mib << 20)
            print(
                f"{'frame':6s} {'(chosen)':15s} {f'{mib} MiB':>10s} {groups:6d} {size:9.3f} {write:10.0f} {read:10.0f}"
            )


if __name__ == "__main__":
    main()
