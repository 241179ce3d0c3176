"""Training throughput at the seed config, and the Parquet loader's rate, on one device.

    python -m benchmarks.train_throughput                      # CPU: a few steps of 8 videos
    python -m benchmarks.train_throughput --device cuda --batch-size 1024 --steps 20   # one GPU, bf16

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
from model.attention_lstm import build_model, loss_fn
from model.config import load_config
from model.data import ParquetBatches, find_row_groups
from model.train import autocast_for, make_optimizer
from storage.formats.yt8m_spec import MAX_FRAMES, NUM_CLASSES, dequantize
from storage.objectstore import LocalStore
from tasks.ingest import convert_shard
from tasks.synth import SynthConfig, synth


def loader_rate(parquet: str, batch_size: int, batches: int) -> tuple[float, float]:
    groups = find_row_groups(parquet, "frame", "train")
    dataset = ParquetBatches(groups, "frame", batch_size, NUM_CLASSES, MAX_FRAMES, workers=1, drop_last=False)
    started, videos, frames = time.perf_counter(), 0, 0
    for i, batch in enumerate(dataset):
        videos += len(batch["ids"])
        frames += int(batch["mask"].sum())
        if i + 1 >= batches:
            break
    return videos / (time.perf_counter() - started), frames / max(1, videos)


def training_rate(device: torch.device, batch_size: int, steps: int, warmup: int) -> tuple[float, float]:
    config = load_config("seed")
    torch.manual_seed(0)
    model = build_model(config).to(device).train()
    optimizer = make_optimizer(model, config)
    rgb, audio, mask = random_videos(batch_size, device)
    labels = torch.zeros(batch_size, config.num_classes, device=device)
    labels[torch.arange(batch_size), torch.randint(0, config.num_classes, (batch_size,))] = 1
    autocast = autocast_for(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        with autocast:
            logits = model(dequantize(rgb.float()), dequantize(audio.float()), mask)
        loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    elapsed = seconds_per_steps(device, step, warmup, steps)
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
    videos_per_s, peak = training_rate(device, args.batch_size, args.steps, args.warmup)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"training, seed config (embedding 512, BiLSTM 1024, head 8192/4096), {MAX_FRAMES}-frame videos, "
        f"batch {args.batch_size}{', bf16' if device.type == 'cuda' else ''} on {name}: {videos_per_s:,.1f} videos/s"
        + (f", peak GPU memory {peak:.1f} GiB" if device.type == "cuda" else "")
    )


if __name__ == "__main__":
    main()
