"""Training: one loop for CPU, one CUDA GPU (bf16 autocast, cuDNN LSTM) and several GPUs (torchrun/DDP).

Checkpoints (model, optimizer, scheduler, epoch, position in the epoch, config, RNG) go to the object
store after every epoch, every `checkpoint_every` steps and at the end. A run whose output already
holds a checkpoint continues from it, so a crashed or retried run loses only the work since then.
"""

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from model import checkpoint
from model.attention_lstm import build_model, loss_fn
from model.config import Config
from model.data import ParquetBatches, find_row_groups, loader, to_device
from storage.objectstore import S3Config, join, store_for

log = logging.getLogger(__name__)


class TrainingDiverged(FloatingPointError, ValueError):
    """The loss became inf or nan: a user error (too high a learning rate), told in one line by `vtag`."""


@dataclass
class TrainResult:
    checkpoint_uri: str
    epochs: int
    steps: int
    videos_per_second: float
    history: dict = field(default_factory=dict)
    checkpoint_sha256: str = ""  # of the final checkpoint, for the registry; empty on ranks other than 0


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_for(device: torch.device):
    """bf16 autocast on a GPU (cuDNN LSTM included); full precision elsewhere. Reusable across `with`s."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def make_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    """L2 decay on every weight but the fully connected layers' biases, as the seed config has it."""
    fc_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) not in fc_biases], "weight_decay": config.weight_decay},
        {"params": [p for p in params if id(p) in fc_biases], "weight_decay": 0.0},
    ]
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.learning_rate)
    return torch.optim.RMSprop(
        groups, lr=config.learning_rate, alpha=config.rmsprop_rho, eps=config.rmsprop_eps, centered=True
    )


def forward(model: nn.Module, batch: dict, level: str) -> torch.Tensor:
    if level == "frame":
        return model(batch["rgb"], batch["audio"], batch["mask"])
    return model(batch["mean_rgb"], batch["mean_audio"])


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def _plot_losses(history: dict, out_uri: str, s3: S3Config | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["step_loss"], lw=0.8, label="loss per video, each step")
    if history["epoch_loss"]:
        steps = history["epoch_end_step"]
        ax.plot(steps, history["epoch_loss"], "o-", label="epoch mean")
    ax.set_xlabel("step")
    ax.set_ylabel("sigmoid cross-entropy per video")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    uri = join(out_uri, "loss.png")
    with store_for(uri, s3).publish(uri) as path:
        fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def train(
    config: Config,
    data_uri: str,
    out_uri: str,
    *,
    split: str = "train",
    pattern: str = "*.parquet",
    resume: str | None = None,
    s3: S3Config | None = None,
    device: str | None = None,
    checkpoint_every: int = 0,
    progress: bool = True,
    max_steps: int | None = None,
) -> TrainResult:
    """Train `config` on `<data>/<level>/<split>/` and write checkpoints under `out_uri`.

    `resume` starts from another checkpoint's weights (fine-tuning); a checkpoint already under
    `out_uri` continues that run where it stopped. Everything is checked before the first step.
    """
    config.validate()
    groups = find_row_groups(data_uri, config.level, split, pattern, s3)
    state = None
    if (last := checkpoint.latest(out_uri, s3)) is not None:
        state = checkpoint.load(last, s3)
        checkpoint.check_architecture(state, config, last)
        log.info("continuing from %s (epoch %d, %d batches in)", last, state["epoch"], state["batches_done"])
    elif resume:
        state = checkpoint.load(resume, s3)
        checkpoint.check_architecture(state, config, resume)
        state = {"model": state["model"]}  # fine-tuning: the weights only
        log.info("fine-tuning from %s", resume)

    rank, world = _distributed()
    if rank == 0:
        checkpoint.sweep_temporaries(out_uri, config.epochs, s3)
    dev = pick_device(device)
    torch.manual_seed(config.seed)
    model = build_model(config).to(dev)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.lr_decay_epochs), config.lr_decay)
    history = {"step_loss": [], "epoch_loss": [], "epoch_end_step": []}
    epoch = batches_done = step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            epoch, batches_done, step, history = state["epoch"], state["batches_done"], state["step"], state["history"]
            torch.set_rng_state(state["rng"])
            if dev.type == "cuda" and state.get("cuda_rng"):
                torch.cuda.set_rng_state_all(state["cuda_rng"])
    net = (
        torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None)
        if world > 1
        else model
    )
    autocast = autocast_for(dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    per_rank_batch = max(1, config.batch_size // world)
    workers = config.num_workers

    def snapshot() -> dict:
        return {
            "config": config.to_dict(),
            "architecture": config.architecture(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "batches_done": batches_done,
            "step": step,
            "history": history,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if dev.type == "cuda" else [],
            "data": {"uri": data_uri, "split": split, "pattern": pattern, "world": world, "workers": workers},
        }

    def save(uri_epoch: int | None) -> str:
        if rank != 0:
            return ""
        state_now = snapshot()
        if uri_epoch is not None:
            checkpoint.save(checkpoint.epoch_uri(out_uri, uri_epoch), state_now, s3)
            checkpoint.prune(out_uri, uri_epoch, s3)
        _plot_losses(history, out_uri, s3)
        return checkpoint.save(join(out_uri, checkpoint.LAST), state_now, s3)

    seen = 0
    started = time.perf_counter()
    while epoch < config.epochs and (max_steps is None or step < max_steps):
        dataset = ParquetBatches(
            groups,
            config.level,
            per_rank_batch,
            config.num_classes,
            config.max_frames,
            seed=config.seed,
            epoch=epoch,
            shuffle=True,
            drop_last=True,
            skip_batches=batches_done,
            workers=workers,
            rank=rank,
            world=world,
            s3=s3,
        )
        if len(dataset) == 0 and batches_done == 0:
            from model.data import DataError

            raise DataError(f"{data_uri}: fewer videos in split {split!r} than one batch of {per_rank_batch}")
        bar = _progress(len(dataset), f"epoch {epoch + 1}/{config.epochs}", progress and rank == 0)
        net.train()
        epoch_losses = []
        for batch in loader(dataset, workers, pin_memory=dev.type == "cuda"):
            batch = to_device(batch, dev)
            with autocast:
                logits = forward(net, batch, config.level)
            loss = loss_fn(logits, batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            batches_done += 1
            size = batch["labels"].shape[0]
            seen += size
            per_video = loss.item() / size
            if not math.isfinite(per_video):
                raise TrainingDiverged(f"loss became {per_video} at step {step}: lower the learning rate")
            history["step_loss"].append(per_video)
            epoch_losses.append(per_video)
            rate = seen / (time.perf_counter() - started)
            if bar is not None:
                bar.set_postfix(loss=f"{per_video:.3f}", videos_s=f"{rate:.0f}")
                bar.update(1)
            elif (
                rank == 0 and len(epoch_losses) % max(1, len(dataset) // 10) == 0
            ):  # logs (Airflow): ~10 lines an epoch
                log.info(
                    "epoch %d/%d: %d/%d batches, loss %.3f per video, %.0f videos/s",
                    epoch + 1,
                    config.epochs,
                    len(epoch_losses),
                    len(dataset),
                    per_video,
                    rate * world,
                )
            if checkpoint_every and step % checkpoint_every == 0:
                save(None)
            if max_steps is not None and step >= max_steps:
                break
        if bar is not None:
            bar.close()
        if max_steps is not None and step >= max_steps and batches_done < len(dataset) + dataset.skip_total:
            save(None)
            break
        epoch += 1
        batches_done = 0
        scheduler.step()
        history["epoch_loss"].append(sum(epoch_losses) / max(1, len(epoch_losses)))
        history["epoch_end_step"].append(step)
        save(epoch)
        log.info("epoch %d: mean loss per video %.4f", epoch, history["epoch_loss"][-1])
    # last.pt moves on if the run is continued; what gets registered must not: a file per final step.
    final_uri = checkpoint.final_uri(out_uri, step)
    sha256 = _publish_final(final_uri, snapshot(), s3) if rank == 0 else ""
    elapsed = time.perf_counter() - started
    return TrainResult(final_uri, epoch, step, seen * world / elapsed if elapsed > 0 else 0.0, history, sha256)


def _publish_final(uri: str, state: dict, s3: S3Config | None) -> str:
    """Write the run's final checkpoint once and return its sha256. One already there (a retried or
    repeated run that ended at the same step) is kept if it holds these weights; other weights are a
    model version's, which are never overwritten."""
    if not store_for(uri, s3).exists(uri):
        return checkpoint.save_hashed(uri, state, s3)
    existing, sha256 = checkpoint.load_hashed(uri, s3)
    if not _same_weights(existing.get("model", {}), state["model"]):
        raise checkpoint.CheckpointError(
            f"{uri} already holds other weights than this run's at step {state['step']}: a final checkpoint "
            "is never overwritten; train into a new folder"
        )
    return sha256


def _same_weights(theirs: dict, mine: dict) -> bool:
    return theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k].cpu()) for k in mine)


def _progress(total: int, description: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="batch", dynamic_ncols=True)
