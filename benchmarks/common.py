"""What the benchmarks share: a timer that reports wall and CPU time, and cached synthetic shards."""

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from storage.formats.yt8m_spec import AUDIO_DIM, MAX_FRAMES, RGB_DIM, quantize
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


def random_videos(batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rgb, audio, mask) of `batch_size` full 300-frame videos, uint8 on the device as the loader sends them."""
    rng = np.random.default_rng(0)
    rgb = torch.from_numpy(quantize(rng.normal(0, 0.7, (batch_size, MAX_FRAMES, RGB_DIM)).astype(np.float32))).to(
        device
    )
    audio = torch.from_numpy(quantize(rng.normal(0, 0.7, (batch_size, MAX_FRAMES, AUDIO_DIM)).astype(np.float32))).to(
        device
    )
    return rgb, audio, torch.ones(batch_size, MAX_FRAMES, dtype=torch.bool, device=device)


def videos_of_lengths(lengths: np.ndarray, device: torch.device, generator: torch.Generator) -> tuple:
    """(rgb, audio, mask) of videos with these frame counts, as the loader sends a batch: uint8 features of
    random content, zero past each video's end, as wide as its longest video, on the device."""
    size, width = len(lengths), int(lengths.max())
    mask = torch.arange(width)[None, :] < torch.as_tensor(lengths)[:, None]
    rgb = torch.randint(0, 256, (size, width, RGB_DIM), dtype=torch.uint8, generator=generator)
    audio = torch.randint(0, 256, (size, width, AUDIO_DIM), dtype=torch.uint8, generator=generator)
    return tuple(t.to(device) for t in (rgb * mask[..., None], audio * mask[..., None], mask))


def seconds_per_steps(device: torch.device, step: Callable[[], object], warmup: int, steps: int) -> float:
    """Wall time of `steps` calls after `warmup` ones, waiting for the GPU to finish its queue."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started
