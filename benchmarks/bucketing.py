"""Padding with and without length bucketing, and what it saves a training step.

    python -m benchmarks.bucketing                       # CPU: small preset, batch 32, 3 rounds of 8 steps each
    python -m benchmarks.bucketing --device cuda --preset seed --batch-size 128 --steps 20

Videos' lengths are synth's (YouTube-8M's documented 120-500 s at 1 frame a second, capped at 300) in row
groups of 130 videos, about a real 32 MiB group's 110-130. The padded-frame fraction is model.data.padded_fraction
over a whole epoch's plan. Steps train on batches shaped as the plan's first ones (T = the batch's
longest video, each video's mask its own length), on random features: the plans differ only in lengths.
A third contender, every video max_frames long, has an unbucketed batch's frame slots and no mixed
lengths. The contenders take turns, round after round, on one model, and each reports its median round.
"""

import argparse

import numpy as np
import torch

from benchmarks.common import seconds_per_steps, videos_of_lengths
from benchmarks.train_throughput import training_step
from model.config import load_config
from model.data import BUCKET_WINDOW, EpochSpec, RowGroup, WorkerPlan, padded_fraction, plan_epoch
from tasks.synth import draw_num_frames

ROWS_PER_GROUP = 130


def realistic_groups(videos: int, seed: int = 0) -> list[RowGroup]:
    rng = np.random.default_rng(seed)
    sizes = [ROWS_PER_GROUP] * (videos // ROWS_PER_GROUP)
    return [
        RowGroup(f"train{i // 12:04d}.parquet", i % 12, n, None, draw_num_frames(rng, n).astype(np.uint16))
        for i, n in enumerate(sizes)
    ]


def batch_lengths(plan: WorkerPlan, groups: list[RowGroup], count: int, max_frames: int) -> list[np.ndarray]:
    lengths = []
    for i in range(min(count, len(plan))):
        group, row = plan.batch(i)
        lengths.append(np.minimum(max_frames, [int(groups[g].num_frames[r]) for g, r in zip(group, row)]))
    return lengths


def step_times(
    preset: str, device: torch.device, plans: dict[str, list[np.ndarray]], warmup: int, rounds: int
) -> dict[str, float]:
    """Each plan's median over `rounds` of its batches' mean step time (batch lengths as given), on one model;
    the plans take turns each round, so that a busy machine slows them alike."""
    batch_size = max(len(x) for lengths in plans.values() for x in lengths)
    step, _, _ = training_step(device, batch_size, None, preset)  # as training runs it (fp32 on a CPU)
    generator = torch.Generator().manual_seed(0)
    batches = {name: [videos_of_lengths(x, device, generator) for x in lengths] for name, lengths in plans.items()}
    for name in batches:
        for _ in range(warmup):
            step(*batches[name][0])
    times = {name: [] for name in batches}
    for _ in range(rounds):
        for name, steps in batches.items():
            pending = iter(steps)
            seconds = seconds_per_steps(device, lambda pending=pending: step(*next(pending)), 0, len(steps))
            times[name].append(seconds / len(steps))
    return {name: float(np.median(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    # One thread by default: on a shared CPU, OpenMP threads that wait on each other swing the figures.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--videos", type=int, default=130_000)
    args = parser.parse_args()

    groups = realistic_groups(args.videos)
    max_frames = load_config(args.preset).max_frames
    print(
        f"{sum(g.rows for g in groups):,} videos, {np.mean([g.num_frames.mean() for g in groups]):.0f} frames on average"
    )
    plans = {}
    for window in (1, BUCKET_WINDOW, 2 * BUCKET_WINDOW):
        plans[window] = plan_epoch(
            groups,
            EpochSpec(
                args.batch_size,
                seed=0,
                epoch=0,
                workers=1,
                shuffle=True,
                drop_last=True,
                max_frames=max_frames,
                bucket_window=window,
            ),
        )
        fraction = padded_fraction(plans[window], groups, max_frames)
        label = "unbucketed" if window == 1 else f"bucketed, window {window} batches"
        print(f"padded frames, batch {args.batch_size}, {label}: {fraction:.1%}")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    threads = f", {torch.get_num_threads()} CPU thread(s)" if device.type == "cpu" else ""
    lengths = {
        "unbucketed": batch_lengths(plans[1][0], groups, args.steps, max_frames),
        f"bucketed (window {BUCKET_WINDOW})": batch_lengths(plans[BUCKET_WINDOW][0], groups, args.steps, max_frames),
        # A reference: as many frames as padded unbucketed batches, but every video as long as the batch.
        f"every video {max_frames} frames": [np.full(args.batch_size, max_frames)] * args.steps,
    }
    seconds = step_times(args.preset, device, lengths, args.warmup, args.rounds)
    for name, batch_lengths_ in lengths.items():
        print(
            f"step, {args.preset} preset, batch {args.batch_size}{threads}, {name}: {seconds[name] * 1000:.0f} ms "
            f"(median of {args.rounds} rounds of {len(batch_lengths_)} batches, "
            f"{np.mean([x.max() for x in batch_lengths_]):.0f} frames wide on average)"
        )
    first, second, _ = seconds.values()
    print(f"step time, bucketed / unbucketed: {second / first:.2f}")


if __name__ == "__main__":
    main()
