"""One prepared GPU run: what a CUDA machine gives this product, printed and written as one JSON file and a summary.

    python3 -m benchmarks.gpu_run --out-dir DIR        # on a lent machine: sets up its environment, then this
    python -m benchmarks.gpu_check --out-dir DIR [--budget-s 540] [--preset seed] [--batch-size 1024] [--videos 3072]
    python -m benchmarks.gpu_check --device cpu --preset small --batch-size 4 --steps 2 --videos 64 --out-dir DIR

Within its budget (9 minutes by default) it records, section by section:
- torch, CUDA and cuDNN versions and the GPUs, and whether this torch is the one the lock pins;
- the product's own path, each step a `vtag` command as a user runs it: synth (frame level, a few shards) ->
  ingest -> train `--preset` (the seed config: one epoch of `--videos` videos, so a bounded number of steps,
  in the device's default precision policy) -> evaluate --promote -> infer --production into SQLite, with
  the figures each prints;
- per precision policy (model/precision.py): the dtype each part of the model computes in, measured with
  forward hooks; training videos/s on length-bucketed batches of YouTube-8M's lengths (synth's
  distribution, the trainer's own plan) at `--batch-size` or the largest that fits; peak memory;
- the Parquet loader's videos/s at 1, 2, 4, ... workers on the product path's Parquet, until it outruns the
  fastest training rate;
- inference videos/s (300-frame videos, the device's default policy);
- a torch.profiler table of the top kernels of one training step;
- `torchrun --nproc-per-node N` (N = the GPUs present) training `--preset` on the product path's Parquet.
A section that would start past the budget is recorded as skipped, with the reason. Targets (issue 13), on
one H100-class GPU: seed-config training >= 3,000 videos/s, inference >= 10,000 videos/s. A script, never a
test on a GPU: CI has none; tests/test_gpu_check.py runs it on the CPU.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bucketing import ROWS_PER_GROUP, batch_lengths, realistic_groups
from benchmarks.common import videos_of_lengths
from benchmarks.gpu_bundle import locked_versions
from benchmarks.inference_throughput import inference_rate
from benchmarks.train_throughput import loader_rate, training_step
from model.config import load_config
from model.data import BUCKET_WINDOW, EpochSpec, plan_epoch
from model.precision import POLICIES, precision_for
from storage.formats.yt8m_spec import MAX_FRAMES

TRAINING_TARGET, INFERENCE_TARGET = 3_000, 10_000  # videos/s on one H100-class GPU


def environment(device: torch.device) -> dict:
    gpus = [
        {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "multiprocessors": p.multi_processor_count}
        for p in (torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count()))
    ]
    locked = locked_versions().get("torch")
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_locked": locked,
        "torch_is_locked": torch.__version__.split("+")[0] == locked,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "gpus": gpus,
        "cpus": os.cpu_count(),
    }


def realistic_batches(batch_size: int, count: int, device: torch.device, seed: int = 0) -> list[tuple]:
    """`count` batches as the trainer's bucketed plan cuts YouTube-8M's lengths (common.videos_of_lengths)."""
    groups = realistic_groups(max(2 * batch_size * count * BUCKET_WINDOW, 10 * ROWS_PER_GROUP), seed)
    plan = plan_epoch(groups, EpochSpec(batch_size, seed=seed, max_frames=MAX_FRAMES))[0]
    generator = torch.Generator().manual_seed(seed)
    return [videos_of_lengths(x, device, generator) for x in batch_lengths(plan, groups, count, MAX_FRAMES)]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def policy_training(device: torch.device, preset: str, name: str, batch_size: int, steps: int) -> dict:
    """One policy: measured dtypes, videos/s over `steps` bucketed batches after a warm-up one, peak memory.
    A batch that does not fit is halved until it does."""
    while True:
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            batches = realistic_batches(batch_size, steps, device)
            step, model, precision = training_step(device, batch_size, name, preset)
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


def product_path(work: Path, budget: "Budget", preset: str, videos: int, batch_size: int) -> dict:
    """db upgrade -> synth -> ingest -> train -> evaluate --promote -> infer --production, each a `vtag` subprocess on a
    SQLite database under `work`; a step that would start with too little budget left, or after a failed one,
    is skipped with the reason. Returns each step's command, exit status, seconds, figures and output tail."""
    raw, parquet, models, exports = (str(work / name) for name in ("raw", "parquet", "models", "exports"))
    db = ["--db", f"sqlite:///{work / 'vtag.db'}"]
    shards = 4
    steps = {
        "db upgrade": (5, ["db", "upgrade", *db]),  # the deploy step: no other command migrates this database
        "synth": (20, ["synth", "--out", raw, "--level", "frame", "--split", "train", "--shards", str(shards),
                       "--videos-per-shard", str(max(1, videos // shards)), "--seed", "7"]),
        "synth validate": (10, ["synth", "--out", raw, "--level", "frame", "--split", "validate",
                                "--videos-per-shard", str(max(16, videos // 8)), "--seed", "8"]),
        "ingest": (20, ["ingest", "--src", raw, "--dest", parquet, *db]),
        "train": (60, ["-v", "train", "--data", parquet, "--level", "frame", "--preset", preset, "--epochs", "1",
                       "--batch-size", str(batch_size), "--out", models, *db]),
        "evaluate": (20, ["-v", "evaluate", "--checkpoint", f"{models}/last.pt", "--data", parquet, "--promote",
                          "--json", *db]),
        "infer": (20, ["-v", "infer", "--production", "--exports", exports, *db]),
    }  # fmt: skip
    report, failed = {"parquet": parquet}, None
    for name, (needs_s, args) in steps.items():
        if failed or budget.left() < needs_s:
            report[name] = {"skipped": f"{failed} failed" if failed else f"less than {needs_s} s of the budget left"}
            continue
        command = [sys.executable, "-m", "tasks.cli", *args]
        started = time.perf_counter()
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=max(1, budget.left() - 5))
            output, returncode = result.stdout + result.stderr, result.returncode
        except subprocess.TimeoutExpired as exc:
            output, returncode = f"{exc.stdout or ''}{exc.stderr or ''} (stopped at the budget)", None
        report[name] = {
            "command": "vtag " + " ".join(args),
            "returncode": returncode,
            "seconds": round(time.perf_counter() - started, 1),
            **step_figures(name, output),
            "output_tail": output[-1500:],
        }
        print(f"  vtag {name}: exit {returncode}, {report[name]['seconds']} s", flush=True)
        if returncode != 0:
            failed = name
    return report


def step_figures(step: str, output: str) -> dict:
    """What a product step printed that the summary reports: rates, metrics, rows, the precision policy."""
    figures = {}
    if policy := re.search(r"precision (\S+ on \S+?):? ", output):
        figures["precision"] = policy.group(1)
    if step == "train" and (m := re.search(r"\((\d+) epochs, (\d+) steps, ([\d.]+) videos/s\)", output)):
        figures.update(epochs=int(m[1]), steps=int(m[2]), videos_per_s=float(m[3]))
    if step == "evaluate" and (m := re.search(r"^(\{.*\})$", output, re.MULTILINE)):
        figures["metrics"] = json.loads(m[1])
    if step == "infer" and (m := re.search(r"scored (\d+) videos, (\d+) rows written", output)):
        figures.update(videos=int(m[1]), rows=int(m[2]))
    return figures


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


def profile_step(device: torch.device, preset: str, batch_size: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    step, _, _ = training_step(device, batch_size, "", preset)
    batch = realistic_batches(batch_size, 1, device)[0]
    step(*batch)
    _synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step(*batch)
        _synchronize(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=15)


def torchrun(parquet: str, work: Path, preset: str, gpus: int, batch_size: int, timeout: float) -> dict:
    """`vtag train` of `preset` under torchrun, one process a GPU, one epoch of the product path's Parquet."""
    db = f"sqlite:///{work / 'ddp.db'}"
    subprocess.run([sys.executable, "-m", "tasks.cli", "db", "upgrade", "--db", db], check=True, capture_output=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(max(1, gpus)),
        "-m", "tasks.cli", "train", "--data", parquet, "--level", "frame", "--preset", preset,
        "--epochs", "1", "--batch-size", str(batch_size), "--workers", "2",
        "--out", str(work / "ddp"), "--db", db,
    ]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=max(1, timeout))
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
    parser.add_argument("--out-dir", type=Path, default=Path("gpu-check"), help="for gpu-check.json and gpu-check.txt")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-s", type=float, default=540)
    parser.add_argument("--preset", default="seed", help="the frame-level model every section trains (default seed)")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--videos", type=int, default=3072, help="training videos the product path synthesizes")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here (torch.cuda.is_available() is False): nothing to check", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as a long training run would: cuDNN picks its fastest kernels
    budget, report = Budget(args.budget_s), {}
    load_config(args.preset)  # a broken preset fails here, before any work
    run_section(report, "environment", budget, 0, environment, device)
    with tempfile.TemporaryDirectory(prefix="vtag-gpu-check-") as work:
        work = Path(work)
        product_batch = max(1, min(256, args.videos // 4))  # an epoch of several steps
        run_section(report, "product", budget, 120, product_path, work, budget, args.preset, args.videos, product_batch)
        policies = {}
        for name in POLICIES:
            run_section(policies, name, budget, 45, policy_training, device, args.preset, name, args.batch_size, args.steps)  # fmt: skip
        report["training"] = {"default_policy": precision_for("", device).name, "policies": policies}
        rates = [p["videos_per_s"] for p in policies.values() if "videos_per_s" in p]
        product = report["product"]  # a skipped or failed section has no "ingest"
        parquet = product["parquet"] if product.get("ingest", {}).get("returncode") == 0 else None
        if parquet:
            run_section(report, "loader", budget, 30, loader_rates, parquet, 128, 24, max(rates, default=0))
        else:
            report["loader"] = {"skipped": "no Parquet: the product path's ingest did not run"}
        run_section(report, "inference", budget, 20, _inference, device, args.preset, args.batch_size, args.steps)
        run_section(report, "profile", budget, 20, profile_step, device, args.preset, min(args.batch_size, 256))
        if parquet:
            gpus = torch.cuda.device_count() if device.type == "cuda" else 1
            batch = max(1, min(256 * gpus, args.videos // 4))
            run_section(report, "torchrun", budget, 60, torchrun, parquet, work, args.preset, gpus, batch, budget.left() - 10)  # fmt: skip
        else:
            report["torchrun"] = {"skipped": "no Parquet: the product path's ingest did not run"}
    report["targets"] = {
        "training_videos_per_s": TRAINING_TARGET,
        "inference_videos_per_s": INFERENCE_TARGET,
        "training_met": bool(rates) and max(rates) >= TRAINING_TARGET,
        "inference_met": report["inference"].get("videos_per_s", 0) >= INFERENCE_TARGET,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "gpu-check.json").write_text(json.dumps(report, indent=2, default=str))
    text = summary(report, args.preset)
    (args.out_dir / "gpu-check.txt").write_text(text)
    print(text, end="")
    print(f"written: {args.out_dir / 'gpu-check.json'}, {args.out_dir / 'gpu-check.txt'}")
    return 0


def _inference(device: torch.device, preset: str, batch_size: int, steps: int) -> dict:
    return {"batch_size": batch_size, "videos_per_s": inference_rate(preset, device, batch_size, steps)}


def _figure(section: dict, key: str, unit: str = "") -> str:
    """A section's figure, or why there is none."""
    if key in section:
        value = section[key]
        return f"{value:,.0f}{unit}" if isinstance(value, float) else f"{value}{unit}"
    return section.get("skipped") or section.get("error") or f"no {key}"


def summary(report: dict, preset: str) -> str:
    """The run in a dozen lines, for a person: what ran on what, and the figures against their targets."""
    env = report["environment"]
    gpus = "; ".join(f"{g['name']} {g['memory_gib']} GiB" for g in env.get("gpus", [])) or "no GPU"
    locked = "the locked version" if env.get("torch_is_locked") else f"the lock pins {env.get('torch_locked')}"
    lines = [f"Python {env.get('python')}, torch {env.get('torch')} ({locked}), CUDA {env.get('cuda')}, "
             f"cuDNN {env.get('cudnn')}, {env.get('device')}: {gpus}, {env.get('cpus')} CPUs"]  # fmt: skip
    product = report.get("product", {})
    lines.append(
        "product path (vtag commands, SQLite)" + (f": {_figure(product, 'synth')}" if "synth" not in product else ":")
    )
    for step in ("synth", "synth validate", "ingest", "train", "evaluate", "infer"):
        if step not in product:
            continue
        result = product[step]
        if "returncode" not in result:
            lines.append(f"  vtag {step}: {result.get('skipped')}")
            continue
        detail = []
        if "videos_per_s" in result:
            detail.append(f"{result['steps']} steps at {result['videos_per_s']:,.1f} videos/s")
        if "metrics" in result:
            detail.append("  ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()))
        if "rows" in result:
            detail.append(f"{result['videos']:,} videos, {result['rows']:,} rows")
        if "precision" in result:
            detail.append(f"precision {result['precision']}")
        lines.append(
            f"  vtag {step}: exit {result['returncode']}, {result['seconds']} s" + "".join(f"; {d}" for d in detail)
        )
    training = report.get("training", {})
    lines.append(f"training ({preset}), videos/s by policy (default {training.get('default_policy')}):")
    for name, result in training.get("policies", {}).items():
        extra = f" at batch {result['batch_size']}" if "batch_size" in result else ""
        lines.append(f"  {name}: {_figure(result, 'videos_per_s')}{extra}")
    loader = report.get("loader", {})
    loader_line = ", ".join(f"{w} workers {r['videos_per_s']:,.0f}" for w, r in loader.items() if isinstance(r, dict) and "videos_per_s" in r)  # fmt: skip
    lines.append(f"loader, videos/s: {loader_line or _figure(loader, 'videos_per_s')}")
    lines.append(f"inference ({preset}), videos/s: {_figure(report.get('inference', {}), 'videos_per_s')}")
    run = report.get("torchrun", {})
    lines.append(f"torchrun: {'exit ' + str(run['returncode']) + ', ' + format(run['seconds'], '.0f') + ' s' if 'returncode' in run else _figure(run, 'returncode')}")  # fmt: skip
    targets = report["targets"]
    lines.append(
        f"targets on one H100-class GPU: training >= {TRAINING_TARGET:,}: {'met' if targets['training_met'] else 'not met'}; "
        f"inference >= {INFERENCE_TARGET:,}: {'met' if targets['inference_met'] else 'not met'}"
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
