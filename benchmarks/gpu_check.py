"""One prepared GPU run: what a CUDA machine gives this model, printed and written as one JSON file.

    make gpu-check                                    # python -m benchmarks.gpu_check --out gpu-check.json
    python -m benchmarks.gpu_check --out gpu-check.json [--budget-s 480] [--batch-size 1024]
    python -m benchmarks.gpu_check --device cpu --batch-size 4 --steps 2 --out /tmp/x.json   # the script itself, on a CPU

Within its budget (8 minutes by default) it records, section by section:
- torch, CUDA and cuDNN versions and the GPUs;
- per precision policy (model/precision.py): the dtype each part of the seed model computes in, measured
  with forward hooks; seed-config training videos/s on length-bucketed batches of YouTube-8M's lengths
  (synth's distribution, the trainer's own plan) at `--batch-size` or the largest that fits; peak memory;
- the Parquet loader's videos/s at 1, 2, 4, ... workers, until it outruns the fastest training rate;
- seed-config inference videos/s (300-frame videos, the device's default policy);
- a torch.profiler table of the top kernels of one training step;
- `torchrun --nproc-per-node N` (N = the GPUs present) training the seed config on the loader's Parquet.
A section that would start past the budget is recorded as skipped. Targets (issue 13), on one H100-class
GPU: training >= 3,000 videos/s, inference >= 10,000 videos/s. A script, never a test: CI has no GPU.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bucketing import ROWS_PER_GROUP, batch_lengths, realistic_groups
from benchmarks.common import videos_of_lengths
from benchmarks.inference_throughput import inference_rate
from benchmarks.train_throughput import loader_rate, training_step
from model.config import load_config
from model.data import BUCKET_WINDOW, plan_epoch
from model.precision import POLICIES, precision_for
from storage.formats.yt8m_spec import MAX_FRAMES
from tasks.synth import SynthConfig, synth

TRAINING_TARGET, INFERENCE_TARGET = 3_000, 10_000  # videos/s on one H100-class GPU


def environment(device: torch.device) -> dict:
    gpus = [
        {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "multiprocessors": p.multi_processor_count}
        for p in (torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count()))
    ]
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "gpus": gpus,
        "cpus": os.cpu_count(),
    }


def realistic_batches(batch_size: int, count: int, device: torch.device, seed: int = 0) -> list[tuple]:
    """`count` batches as the trainer's bucketed plan cuts YouTube-8M's lengths (common.videos_of_lengths)."""
    groups = realistic_groups(max(2 * batch_size * count * BUCKET_WINDOW, 10 * ROWS_PER_GROUP), seed)
    plan = plan_epoch(groups, batch_size, seed, 0, 1, True, True, 0, 1, MAX_FRAMES)[0]
    generator = torch.Generator().manual_seed(seed)
    return [videos_of_lengths(x, device, generator) for x in batch_lengths(plan, groups, count, MAX_FRAMES)]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def policy_training(device: torch.device, name: str, batch_size: int, steps: int) -> dict:
    """One policy: measured dtypes, videos/s over `steps` bucketed batches after a warm-up one, peak memory.
    A batch that does not fit is halved until it does."""
    while True:
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            batches = realistic_batches(batch_size, steps, device)
            step, model, precision = training_step(device, batch_size, name)
            dtypes = precision.describe(model, device)
            step(*batches[0])
            _synchronize(device)
            started = time.perf_counter()
            for batch in batches:
                step(*batch)
            _synchronize(device)
            seconds = time.perf_counter() - started
            break
        except torch.OutOfMemoryError:
            del batches
            if batch_size <= 8:
                raise
            batch_size //= 2
    videos = sum(len(b[2]) for b in batches)
    frames = sum(int(b[2].sum()) for b in batches)
    slots = sum(b[2].numel() for b in batches)
    return {
        "dtypes": dtypes,
        "grad_scaler": precision.needs_grad_scaler,
        "batch_size": batch_size,
        "videos_per_s": videos / seconds,
        "padded_fraction": 1 - frames / slots,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def write_parquet(work: Path, videos: int) -> str:
    """Frame-level Parquet of synthetic videos (synth's lengths), through our own ingest."""
    from storage.database.db import upgrade
    from tasks.ingest import ingest

    raw, parquet = work / "raw", str(work / "parquet")
    shards = max(1, videos // 512)
    synth(str(raw), SynthConfig("frame", "train", shards=shards, videos_per_shard=videos // shards, seed=7))
    db_url = f"sqlite:///{work / 'check.db'}"
    upgrade(db_url)
    report = ingest(str(raw), parquet, db_url)
    if report.failed:
        raise RuntimeError(f"ingest failed: {report.failed}")
    return parquet


def loader_rates(parquet: str, batch_size: int, batches: int, enough: float) -> dict:
    """videos/s at 1, 2, 4, ... workers (at most the CPUs), stopping once it outruns `enough`."""
    rates, workers = {}, 1
    while workers <= (os.cpu_count() or 1):
        rate, frames = loader_rate(parquet, batch_size, batches, workers)
        rates[str(workers)] = {"videos_per_s": rate, "frames_per_video": frames}
        if rate >= enough:
            break
        workers *= 2
    return rates


def profile_step(device: torch.device, batch_size: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    step, _, _ = training_step(device, batch_size, "")
    batch = realistic_batches(batch_size, 1, device)[0]
    step(*batch)
    _synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step(*batch)
        _synchronize(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=15)


def torchrun(parquet: str, work: Path, gpus: int, batch_size: int, timeout: float) -> dict:
    """`vtag train` of the seed config under torchrun, one process a GPU, one epoch of the loader's Parquet."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(max(1, gpus)),
        "-m", "tasks.cli", "train", "--data", parquet, "--level", "frame", "--preset", "seed",
        "--epochs", "1", "--batch-size", str(batch_size), "--workers", "2",
        "--out", str(work / "ddp"), "--db", f"sqlite:///{work / 'ddp.db'}",
    ]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    return {
        "command": " ".join(command),
        "returncode": result.returncode,
        "seconds": time.perf_counter() - started,
        "output_tail": (result.stdout + result.stderr)[-3000:],
    }


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def run_section(report: dict, name: str, budget: Budget, needs_s: float, function, *args) -> None:
    if budget.left() < needs_s:
        report[name] = {"skipped": f"less than {needs_s:.0f} s of the budget left"}
    else:
        started = time.perf_counter()
        try:
            report[name] = function(*args)
        except Exception as exc:  # one section's failure is a finding, not the end of the run
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"[{name}: {time.perf_counter() - started:.0f} s]", flush=True)
    print(json.dumps({name: report[name]}, indent=2, default=str), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-check.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-s", type=float, default=480)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--loader-videos", type=int, default=4096)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here (torch.cuda.is_available() is False): nothing to check", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as a long training run would: cuDNN picks its fastest kernels
    budget, report = Budget(args.budget_s), {}
    load_config("seed")  # a broken preset fails here, before any work
    run_section(report, "environment", budget, 0, environment, device)
    policies = {}
    for name in POLICIES:
        run_section(policies, name, budget, 45, policy_training, device, name, args.batch_size, args.steps)
    report["training"] = {"default_policy": precision_for("", device).name, "policies": policies}
    rates = [p["videos_per_s"] for p in policies.values() if "videos_per_s" in p]
    with tempfile.TemporaryDirectory(prefix="vtag-gpu-check-") as work:
        work = Path(work)
        run_section(report, "parquet", budget, 90, write_parquet, work, args.loader_videos)
        parquet = report["parquet"] if isinstance(report["parquet"], str) else None
        if parquet:
            run_section(report, "loader", budget, 30, loader_rates, parquet, 128, 24, max(rates, default=0))
        run_section(report, "inference", budget, 20, _inference, device, args.batch_size, args.steps)
        run_section(report, "profile", budget, 20, profile_step, device, min(args.batch_size, 256))
        if parquet:
            gpus = torch.cuda.device_count() if device.type == "cuda" else 1
            batch = min(256 * gpus, args.loader_videos // 4)  # an epoch of several steps
            run_section(report, "torchrun", budget, 60, torchrun, parquet, work, gpus, batch, budget.left() - 10)
    report["targets"] = {
        "training_videos_per_s": TRAINING_TARGET,
        "inference_videos_per_s": INFERENCE_TARGET,
        "training_met": bool(rates) and max(rates) >= TRAINING_TARGET,
        "inference_met": report["inference"].get("videos_per_s", 0) >= INFERENCE_TARGET,
    }
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"written: {args.out}")
    return 0


def _inference(device: torch.device, batch_size: int, steps: int) -> dict:
    return {"batch_size": batch_size, "videos_per_s": inference_rate("seed", device, batch_size, steps)}


if __name__ == "__main__":
    sys.exit(main())
