"""What the benchmarks share: a timer that reports wall and CPU time, and cached synthetic shards."""

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tasks.synth import SynthConfig, synth


@dataclass
class Timing:
    wall: float = 0.0
    cpu: float = 0.0


@contextmanager
def timed():
    timing = Timing()
    wall, cpu = time.perf_counter(), time.process_time()
    yield timing
    timing.wall, timing.cpu = time.perf_counter() - wall, time.process_time() - cpu


def frame_shards(folder: Path, shards: int, videos_per_shard: int) -> list[Path]:
    """Frame-level shards of up-to-300-frame videos, generated once and reused."""
    paths = [folder / f"train{i:04d}.tfrecord" for i in range(shards)]
    if not all(p.is_file() for p in paths):
        synth(str(folder), SynthConfig("frame", "train", shards=shards, videos_per_shard=videos_per_shard, seed=11))
    return paths


def warm(paths: list[Path]) -> int:
    """Read the files once so that every contender starts from the page cache; return their total size."""
    total = 0
    for path in paths:
        total += len(path.read_bytes())
    return total
