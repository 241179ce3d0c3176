"""Training: one loop for CPU, one CUDA GPU (cuDNN LSTM) and several GPUs (torchrun/DDP), in the config's
precision policy (model/precision.py: the device's default unless `Config.precision` names one).

`train` is a short sequence of named steps: find the state to start from (`starting_state`), build the
run (`build_run`, which restores that state), train epoch after epoch (`train_epoch`, `end_epoch`)
under a `CheckpointPolicy`, and publish the final checkpoint. A checkpoint (`snapshot`) holds the
model, optimizer, scheduler, RNG, config and the run's `Position` (epoch, batches into it, step), so a
run whose output already holds one continues from it bit for bit, losing only the work since then.
"""

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from model import checkpoint
from model.config import Config
from model.data import BUCKET_WINDOW, DataError, EpochSpec, ParquetBatches, find_row_groups, loader, to_device
from model.devices import distributed, pick_device
from model.networks import build_model, forward, loss_fn
from model.precision import Precision, precision_for
from storage.errors import VtagError
from storage.formats.yt8m_spec import level_spec
from storage.objectstore import S3Config, join, store_for

log = logging.getLogger(__name__)


class TrainingDiverged(VtagError, FloatingPointError, ValueError):
    """The loss became inf or nan: a user error (too high a learning rate), told in one line by `vtag`."""


@dataclass
class TrainResult:
    checkpoint_uri: str
    epochs: int
    steps: int
    videos_per_second: float
    history: dict = field(default_factory=dict)
    checkpoint_sha256: str = ""  # of the final checkpoint, for the registry; empty on ranks other than 0
    rank: int = 0  # under torchrun, only rank 0's result stands for the run (it alone writes checkpoints)


@dataclass
class Position:
    """Where a run stands: `epoch` epochs done, `batches_done` batches into the next one, `step`
    optimizer steps in all. Checkpoints record it, so a continued run skips exactly the batches done."""

    epoch: int = 0
    batches_done: int = 0
    step: int = 0


@dataclass
class Run:
    """One training run's moving parts, built once by `build_run` and handed to every step."""

    config: Config
    model: nn.Module  # the weights checkpoints hold
    net: nn.Module  # what the forward pass calls: `model`, or DDP around it
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    rank: int
    world: int
    data: dict  # what it trains on, recorded in checkpoints: uri, split, pattern, world, workers
    precision: Precision  # what each part computes in (model/precision.py)
    scaler: torch.amp.GradScaler  # enabled only when the precision needs one (fp16)
    position: Position = field(default_factory=Position)
    # step_loss: per video, each step; epoch_loss: each epoch's mean; epoch_end_step: the step it ended at
    history: dict = field(default_factory=lambda: {"step_loss": [], "epoch_loss": [], "epoch_end_step": []})
    videos_seen: int = 0  # by this rank, in this process: the throughput figure
    started: float = field(default_factory=time.perf_counter)  # train() restarts it at the first epoch

    @property
    def per_rank_batch(self) -> int:
        return max(1, self.config.batch_size // self.world)

    def videos_per_second(self) -> float:
        """Of this rank; times `world` for the run's."""
        elapsed = time.perf_counter() - self.started
        return self.videos_seen / elapsed if elapsed > 0 else 0.0


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


def make_scheduler(optimizer: torch.optim.Optimizer, config: Config) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once an epoch. Cosine runs from learning_rate to 0 at the end of the last epoch."""
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.lr_decay_epochs), config.lr_decay)


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
    `max_steps` stops the run early (at that step in all), checkpointed so that it can continue.
    """
    config.validate()
    groups = find_row_groups(data_uri, config.level, split, pattern, s3)
    rank, world = distributed()
    # rank 0 writes every file of the folder: it alone holds it, from before it reads the folder's last.pt
    with checkpoint.one_writer(out_uri, s3) if rank == 0 else nullcontext():
        state = starting_state(config, out_uri, resume, s3)
        if rank == 0:
            checkpoint.sweep_temporaries(out_uri, s3)
        data = {
            "uri": data_uri,
            "split": split,
            "pattern": pattern,
            "world": world,
            "workers": config.num_workers,
            "bucket_window": BUCKET_WINDOW if level_spec(config.level).per_frame else 1,  # shapes each epoch's order
        }
        run = build_run(config, state, pick_device(device), rank, world, data)
        policy = CheckpointPolicy(out_uri, s3, every=checkpoint_every)

        def reached_max_steps() -> bool:
            return max_steps is not None and run.position.step >= max_steps

        run.started = time.perf_counter()
        while run.position.epoch < config.epochs and not reached_max_steps():
            batches = epoch_batches(run, groups, s3)
            losses = train_epoch(run, batches, policy, max_steps, progress and rank == 0)
            if reached_max_steps() and run.position.batches_done < len(batches) + batches.skip_total:
                policy.stopped_mid_epoch(run)
                break
            end_epoch(run, losses)
            policy.epoch_ended(run)
            log.info("epoch %d: mean loss per video %.4f", run.position.epoch, run.history["epoch_loss"][-1])
        final_uri, sha256 = policy.publish_final(run)
        return TrainResult(
            final_uri,
            run.position.epoch,
            run.position.step,
            run.videos_per_second() * world,
            run.history,
            sha256,
            rank,
        )


def starting_state(config: Config, out_uri: str, resume: str | None, s3: S3Config | None) -> dict | None:
    """The checkpoint state a run starts from: the whole state of one already under `out_uri` (this run,
    continued), else the weights alone of `resume` (fine-tuning), else None (fresh weights)."""
    if (last := checkpoint.latest(out_uri, s3)) is not None:
        state = checkpoint.load(last, s3)
        checkpoint.check_architecture(state, config, last)
        log.info("continuing from %s (epoch %d, %d batches in)", last, state["epoch"], state["batches_done"])
        return state
    if resume:
        state = checkpoint.load(resume, s3)
        checkpoint.check_architecture(state, config, resume)
        log.info("fine-tuning from %s", resume)
        return {"model": state["model"]}
    return None


def build_run(config: Config, state: dict | None, device: torch.device, rank: int, world: int, data: dict) -> Run:
    """Model, optimizer and scheduler on `device`, restored from `state`.

    The seed is set before the model is built (its initial weights), and a continued run's RNG state
    is restored after, so that a resumed run draws what an uninterrupted one would have.
    """
    torch.manual_seed(config.seed)
    model = build_model(config).to(device)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config)
    precision = precision_for(config.precision, device)
    precision.apply(model, device)
    scaler = precision.grad_scaler(device)
    run = Run(config, model, model, optimizer, scheduler, device, rank, world, data, precision, scaler)
    if state is not None:
        restore(run, state)
    if rank == 0:
        log.info("training in %s", precision.summary(model, device))
    if world > 1:
        run.net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return run


def restore(run: Run, state: dict) -> None:
    """Load `state` into `run`: the weights always; optimizer, scheduler, position, history and RNG when it
    is a whole checkpoint (a run continued) rather than weights alone (fine-tuning)."""
    run.model.load_state_dict(state["model"])
    if "optimizer" not in state:
        return
    # A run stopped mid-epoch resumes into the rest of that epoch's plan: only the same plan continues it.
    # Checkpoints from before length bucketing planned without it (window 1).
    saved_window = state.get("data", {}).get("bucket_window", 1)
    if state["batches_done"] and saved_window != run.data["bucket_window"]:
        raise DataError(
            f"the checkpoint stopped {state['batches_done']} batches into epoch {state['epoch']} of a plan with "
            f"length-bucket window {saved_window}, this run plans with {run.data['bucket_window']}: resume from "
            "a checkpoint taken at an epoch's end (epoch-NNN.pt), or train anew"
        )
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if state.get("grad_scaler"):  # empty when the run had no scaler; ignored by a disabled one
        run.scaler.load_state_dict(state["grad_scaler"])
    run.position = Position(state["epoch"], state["batches_done"], state["step"])
    run.history = state["history"]
    torch.set_rng_state(state["rng"])
    if run.device.type == "cuda" and state.get("cuda_rng"):
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def snapshot(run: Run) -> dict:
    """What a checkpoint holds: enough to continue the run bit for bit (`restore`), and to tell what it
    is (config, architecture, data) without the code that trained it."""
    return {
        "config": run.config.to_dict(),
        "architecture": run.config.architecture(),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "grad_scaler": run.scaler.state_dict(),
        "epoch": run.position.epoch,
        "batches_done": run.position.batches_done,
        "step": run.position.step,
        "history": run.history,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if run.device.type == "cuda" else [],
        "data": run.data,
    }


def epoch_batches(run: Run, groups: list, s3: S3Config | None) -> ParquetBatches:
    """This rank's batches of the run's current epoch, less those already trained on."""
    config = run.config
    batches = ParquetBatches(
        groups,
        config.level,
        config.num_classes,
        EpochSpec(
            run.per_rank_batch,
            seed=config.seed,
            epoch=run.position.epoch,
            workers=config.num_workers,
            shuffle=True,
            drop_last=True,
            rank=run.rank,
            world=run.world,
            max_frames=config.max_frames,
            bucket_window=run.data["bucket_window"],
            skip_batches=run.position.batches_done,
        ),
        s3=s3,
    )
    if len(batches) == 0 and run.position.batches_done == 0:
        raise DataError(
            f"{run.data['uri']}: fewer videos in split {run.data['split']!r} than one batch of {run.per_rank_batch}"
        )
    return batches


LOSS_SYNC_STEPS = 32  # steps between reads of the loss back to the host: each read waits for the GPU


def _to_host(losses: list[torch.Tensor]) -> list[float]:
    return torch.stack(losses).tolist()  # one copy, one wait, for all of them


def train_epoch(
    run: Run, batches: ParquetBatches, policy: "CheckpointPolicy", max_steps: int | None, show_bar: bool
) -> list[float]:
    """One optimizer step per batch of `batches` (stopping at step `max_steps`); returns each step's loss
    per video. The losses stay on the device and are read back every LOSS_SYNC_STEPS steps (nanoGPT's
    discipline: a read per step stalls the GPU's queue) and before every checkpoint; raises
    TrainingDiverged at the first that is not finite, naming its step, before any checkpoint holds it."""
    config, position = run.config, run.position
    report = _EpochReport(run, len(batches), show_bar)
    run.net.train()
    losses: list[float] = []
    unread: list[torch.Tensor] = []  # per-video losses of the steps since the last read

    def read_back() -> None:
        if not unread:
            return
        first = position.step - len(unread) + 1
        for step, per_video in enumerate(_to_host(unread), start=first):
            if not math.isfinite(per_video):
                raise TrainingDiverged(f"loss became {per_video} at step {step}: lower the learning rate")
            run.history["step_loss"].append(per_video)
            losses.append(per_video)
            report.step(len(losses), per_video)
        unread.clear()

    for batch in loader(batches, config.num_workers, pin_memory=run.device.type == "cuda"):
        batch = to_device(batch, run.device)
        with run.precision.autocast(run.device):
            logits = forward(run.net, batch, config.level)
        loss = loss_fn(logits, batch["labels"], config.stages)
        run.optimizer.zero_grad(set_to_none=True)
        # Without a scaler (every policy but fp16) these are loss.backward() and optimizer.step(). With one,
        # step() unscales the gradients and skips the step if any is inf or nan; gradient clipping, if it is
        # ever added, goes after run.scaler.unscale_(run.optimizer), on the true gradients.
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        scale = run.scaler.get_scale()  # 1.0 without a scaler
        run.scaler.update()
        if run.scaler.get_scale() < scale and run.rank == 0:
            # The summed loss gives large gradients: from GradScaler's initial 2^16 the first few steps
            # overflow fp16 and are skipped while the scale backs off, then one every 2000 steps it tries higher.
            log.info("step %d skipped: fp16 gradients overflowed at loss scale %g", position.step + 1, scale)
        position.step += 1
        position.batches_done += 1
        size = batch["labels"].shape[0]
        run.videos_seen += size
        unread.append(loss.detach().float() / size)
        stopping = max_steps is not None and position.step >= max_steps
        if len(unread) >= LOSS_SYNC_STEPS or policy.saves_after(position.step) or stopping:
            read_back()
        policy.step_done(run)
        if stopping:
            break
    read_back()
    report.close()
    return losses


def end_epoch(run: Run, losses: list[float]) -> None:
    """Move the run on to the next epoch: the position, the learning rate schedule and the history."""
    run.position.epoch += 1
    run.position.batches_done = 0
    run.scheduler.step()
    run.history["epoch_loss"].append(sum(losses) / max(1, len(losses)))
    run.history["epoch_end_step"].append(run.position.step)


@dataclass
class CheckpointPolicy:
    """When a run writes which checkpoint under `out_uri` (rank 0 alone writes; other ranks do nothing):

    - `last.pt` and the loss plot every `every` steps (0: never between epochs), when the run stops
      mid-epoch (max_steps) and after every epoch: what a continued run starts from;
    - `epoch-NNN.pt` after each epoch, older ones pruned (checkpoint.prune);
    - at the end, `final-stepNNNNNNN.pt`, written once and never overwritten: the file a model version
      points at, since last.pt moves on when the run is continued.
    """

    out_uri: str
    s3: S3Config | None
    every: int = 0

    def saves_after(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def step_done(self, run: Run) -> None:
        if self.saves_after(run.position.step):
            self._save(run, epoch=None)

    def stopped_mid_epoch(self, run: Run) -> None:
        self._save(run, epoch=None)

    def epoch_ended(self, run: Run) -> None:
        self._save(run, epoch=run.position.epoch)

    def publish_final(self, run: Run) -> tuple[str, str]:
        """The final checkpoint's URI and sha256 (empty on ranks other than 0)."""
        uri = checkpoint.final_uri(self.out_uri, run.position.step)
        if run.rank != 0:
            return uri, ""
        sha256 = _publish_final(uri, snapshot(run), self.s3)
        plot_losses(run.history, checkpoint.loss_plot_uri(uri), self.s3)  # the version's, never rewritten
        return uri, sha256

    def _save(self, run: Run, epoch: int | None) -> None:
        if run.rank != 0:
            return
        state = snapshot(run)
        if epoch is not None:
            checkpoint.save(checkpoint.epoch_uri(self.out_uri, epoch), state, self.s3)
            checkpoint.prune(self.out_uri, epoch, self.s3)
        plot_losses(run.history, join(self.out_uri, checkpoint.LOSS_PLOT), self.s3)  # the run's, as it goes
        checkpoint.save(join(self.out_uri, checkpoint.LAST), state, self.s3)


def _publish_final(uri: str, state: dict, s3: S3Config | None) -> str:
    """Write the run's final checkpoint once and return its sha256. One already there (a retried or
    repeated run that ended at the same step) is kept if it holds these weights; other weights are a
    model version's, which are never overwritten."""
    if not store_for(uri, s3).exists(uri):
        return checkpoint.save_hashed(uri, state, s3)
    existing, sha256 = checkpoint.load_hashed(uri, s3)
    if not checkpoint.same_weights(existing.get("model", {}), state["model"]):
        raise checkpoint.CheckpointError(
            f"{uri} already holds other weights than this run's at step {state['step']}: a final checkpoint "
            "is never overwritten; train into a new folder"
        )
    return sha256


class _EpochReport:
    """What a person sees of an epoch: a tqdm bar on a terminal, else (Airflow's task log) about 10 log
    lines an epoch, from rank 0 alone."""

    def __init__(self, run: Run, batches: int, show_bar: bool):
        self.run, self.batches = run, batches
        self.bar = _progress(batches, f"epoch {run.position.epoch + 1}/{run.config.epochs}", show_bar)

    def step(self, done: int, per_video: float) -> None:
        rate = self.run.videos_per_second()
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{per_video:.3f}", videos_s=f"{rate:.0f}")
            self.bar.update(1)
        elif self.run.rank == 0 and done % max(1, self.batches // 10) == 0:
            log.info(
                "epoch %d/%d: %d/%d batches, loss %.3f per video, %.0f videos/s",
                self.run.position.epoch + 1,
                self.run.config.epochs,
                done,
                self.batches,
                per_video,
                rate * self.run.world,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_losses(history: dict, uri: str, s3: S3Config | None = None) -> str:
    """The loss per video at each step and each epoch's mean, from a checkpoint's `history`, written to `uri`."""
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
    with store_for(uri, s3).publish(uri) as path:
        fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return uri


def _progress(total: int, description: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="batch", dynamic_ncols=True)
