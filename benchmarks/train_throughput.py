"""Training throughput at the seed config, and the Parquet loader's rate, on one device.

    python -m benchmarks.train_throughput                      # CPU: a few steps of 8 videos
    python -m benchmarks.train_throughput --device cuda --batch-size 1024 --steps 20   # one GPU, its default precision
    python -m benchmarks.train_throughput --device cuda --precision fp16 ...          # another policy (model/precision.py)

Videos have 300 frames (YouTube-8M's cap), so the figure is the worst case per video. The loader is
measured alone, in this process (one worker), on frame-level Parquet written by ingest; training
steps use batches already on the device, so the two figures say whether the loader keeps up
(run it with N workers: about N times the one-worker rate).
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import random_videos, seconds_per_steps
from model.config import load_config
from model.data import EpochSpec, ParquetBatches, find_row_groups, loader
from model.networks import build_model, loss_fn
from model.precision import precision_for
from model.train import make_optimizer
from storage.formats.yt8m_spec import MAX_FRAMES, NUM_CLASSES, dequantize
from storage.objectstore import LocalStore
from tasks.ingest import convert_shard
from tasks.synth import SynthConfig, synth


def loader_rate(parquet: str, batch_size: int, batches: int, workers: int = 1) -> tuple[float, float]:
    """videos/s and frames a video of the training loader over `parquet`'s train split: in this process with
    one worker, through DataLoader worker processes (model.data.loader) with more."""
    groups = find_row_groups(parquet, "frame", "train")
    dataset = ParquetBatches(
        groups, "frame", NUM_CLASSES, EpochSpec(batch_size, workers=workers, drop_last=False, max_frames=MAX_FRAMES)
    )
    started, videos, frames = time.perf_counter(), 0, 0
    for i, batch in enumerate(dataset if workers == 1 else loader(dataset, workers, pin_memory=False)):
        videos += len(batch["ids"])
        frames += int(batch["mask"].sum())
        if i + 1 >= batches:
            break
    return videos / (time.perf_counter() - started), frames / max(1, videos)


def training_step(device: torch.device, batch_size: int, precision_name: str | None = "", preset: str = "seed"):
    """(step, model, precision): `step(rgb, audio, mask)` is one training step of `preset` on a batch of at
    most `batch_size` videos already on the device, as model/train.py takes it (the policy's autocast and
    GradScaler; None: the preset's own policy)."""
    config = load_config(preset)
    torch.manual_seed(0)
    precision = precision_for(config.precision if precision_name is None else precision_name, device)
    model = precision.apply(build_model(config).to(device).train(), device)
    optimizer = make_optimizer(model, config)
    scaler = precision.grad_scaler(device)
    labels = torch.zeros(batch_size, config.num_classes, device=device)
    labels[torch.arange(batch_size), torch.randint(0, config.num_classes, (batch_size,))] = 1
    autocast = precision.autocast(device)

    def step(rgb, audio, mask):
        with autocast:
            logits = model(dequantize(rgb.float()), dequantize(audio.float()), mask)
        loss = loss_fn(logits, labels[: len(mask)])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step, model, precision


def training_rate(
    device: torch.device, batch_size: int, steps: int, warmup: int, precision_name: str = ""
) -> tuple[float, float]:
    """videos/s of seed-config steps on one batch of full 300-frame videos (the worst case), peak GiB."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)
    step, _, _ = training_step(device, batch_size, precision_name)
    videos = random_videos(batch_size, device)
    elapsed = seconds_per_steps(device, lambda: step(*videos), warmup, steps)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return batch_size * steps / elapsed, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--loader-batch-size", type=int, default=256)
    parser.add_argument("--loader-videos", type=int, default=1024)
    parser.add_argument("--precision", default="", help="a policy of model/precision.py; empty: the device's default")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vtag-bench-train-") as work:
        raw, parquet = Path(work) / "raw", str(Path(work) / "parquet")
        synth(str(raw), SynthConfig("frame", "train", shards=2, videos_per_shard=args.loader_videos // 2, seed=5))
        db_url = f"sqlite:///{work}/bench.db"
        from storage.database.db import upgrade

        upgrade(db_url)
        for shard in LocalStore().list(str(raw)):
            convert_shard(shard, parquet, db_url)
        rate, frames = loader_rate(parquet, args.loader_batch_size, args.loader_videos // args.loader_batch_size)
    print(
        f"loader, one worker: {rate:,.0f} videos/s (batches of {args.loader_batch_size}, {frames:.0f} frames a video on average)"
    )
    device = torch.device(args.device)
    videos_per_s, peak = training_rate(device, args.batch_size, args.steps, args.warmup, args.precision)
    policy = precision_for(args.precision, device).name
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"training, seed config (embedding 512, BiLSTM 1024, head 8192/4096), {MAX_FRAMES}-frame videos, "
        f"batch {args.batch_size}, precision {policy} on {name}: {videos_per_s:,.1f} videos/s"
        + (f", peak GPU memory {peak:.1f} GiB" if device.type == "cuda" else "")
    )


if __name__ == "__main__":
    main()
