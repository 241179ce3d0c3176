"""Fine-tuning a frame-level model on rated segments, as the 2019 segment challenge's winners did.

Each rated (segment, class) of a split's videos is one example: the segment's 5 frames alone, its target the
rating (1: the class is there, 0: it is not), its loss the sigmoid cross-entropy of that one class's logit
(the other classes are not rated for that segment, so they teach nothing). The model starts from a trained
checkpoint; the fine-tuned weights are written as a checkpoint of their own, in the same format, so that
they are registered, evaluated, promoted and scored by nights like any version. It is not a training run to
resume (no optimizer state): fine-tuning again starts from a checkpoint.
"""

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from model import checkpoint
from model.data import EpochSpec, ParquetBatches, find_row_groups, loader, to_device
from model.segments import SegmentError, read_ratings
from model.train import plot_losses
from storage.formats.yt8m_spec import FRAME, SEGMENT_FRAMES
from storage.objectstore import S3Config


@dataclass(frozen=True)
class FinetuneSpec:
    epochs: int = 2
    learning_rate: float = 1e-4
    batch_size: int = 64  # videos a step: their rated segments together
    seed: int = 0


def _ratings_by_video(ratings: dict[tuple[str, int], float]) -> dict[str, np.ndarray]:
    """{video: rows of (start second, class, rating)} of read_ratings' {("video:start", class): rating}."""
    by_video: dict[str, list[tuple[int, int, float]]] = {}
    for (segment, label), score in ratings.items():
        video, start = segment.rsplit(":", 1)
        by_video.setdefault(video, []).append((int(start), label, score))
    return {video: np.asarray(rows, dtype=np.float64) for video, rows in by_video.items()}


def _rated_examples(batch: dict, lengths: torch.Tensor, by_video: dict[str, np.ndarray]):
    """(video index in the batch, start, class, rating) tensors of the batch's rated segments that lie within
    the frames it loaded (a rating past the model's max_frames has no frames to learn from)."""
    rows = []
    for b, video in enumerate(batch["ids"]):
        for start, label, score in by_video.get(video, ()):
            if start + SEGMENT_FRAMES <= int(lengths[b]):
                rows.append((b, int(start), int(label), score))
    if not rows:
        return None
    index, starts, labels, targets = zip(*rows)
    return torch.tensor(index), torch.tensor(starts), torch.tensor(labels), torch.tensor(targets, dtype=torch.float32)


def finetune(
    checkpoint_uri: str,
    data_uri: str,
    out_uri: str,
    spec: FinetuneSpec = FinetuneSpec(),
    *,
    split: str = "validate",
    pattern: str = "*.parquet",
    s3: S3Config | None = None,
    device: torch.device | None = None,
) -> dict:
    """Fine-tune the checkpoint's model on the split's rated segments and publish the result
    (`checkpoint.final_uri(out_uri, steps)`); returns what tasks.training.register_model records."""
    from model.devices import pick_device

    device = device or pick_device()
    state = checkpoint.load(checkpoint_uri, s3)
    config = checkpoint.config_of(state, checkpoint_uri)
    if config.level != FRAME.name:
        raise SegmentError(f"{checkpoint_uri}: a {config.level}-level model; segments fine-tune a frame-level one")
    model = checkpoint.model_of(state, config, checkpoint_uri).to(device).train()
    del state
    groups = find_row_groups(data_uri, FRAME.name, split, pattern, s3, lengths=False)
    by_video = _ratings_by_video(read_ratings(groups, s3))
    if not by_video:
        raise SegmentError(f"no rated segments in split {split!r} of {data_uri}: ingest segment-rated shards")
    torch.manual_seed(spec.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.learning_rate)
    window = torch.arange(SEGMENT_FRAMES)
    history = {"step_loss": [], "epoch_loss": [], "epoch_end_step": []}  # model/train.py's shape: its loss plot
    steps, examples, started = 0, 0, time.perf_counter()
    for epoch in range(spec.epochs):
        plan = EpochSpec(spec.batch_size, seed=spec.seed, epoch=epoch, drop_last=False, max_frames=config.max_frames)
        epoch_loss, epoch_examples = 0.0, 0
        for batch in loader(ParquetBatches(groups, FRAME.name, config.num_classes, plan, s3), 0, False):
            moved = to_device(batch, device)
            rated = _rated_examples(batch, moved["mask"].sum(dim=1).cpu(), by_video)
            if rated is None:
                continue
            index, starts, labels, targets = (t.to(device) for t in rated)
            frames = starts[:, None] + window.to(device)
            mask = torch.ones(len(index), SEGMENT_FRAMES, dtype=torch.bool, device=device)
            logits = model(moved["rgb"][index[:, None], frames], moved["audio"][index[:, None], frames], mask)
            loss = F.binary_cross_entropy_with_logits(logits[torch.arange(len(index), device=device), labels], targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            history["step_loss"].append(loss.item())
            epoch_loss += history["step_loss"][-1] * len(index)
            epoch_examples += len(index)
        if not epoch_examples:
            raise SegmentError(
                f"no rated segment of split {split!r} lies within the model's {config.max_frames} frames"
            )
        if not np.isfinite(epoch_loss):
            raise SegmentError(
                f"fine-tuning diverged in epoch {epoch + 1} (loss {epoch_loss}): lower the learning rate"
            )
        history["epoch_loss"].append(epoch_loss / epoch_examples)
        history["epoch_end_step"].append(steps)
        examples += epoch_examples
    seconds = time.perf_counter() - started
    tuned = {
        "config": config.to_dict(),
        "architecture": config.architecture(),
        "model": model.state_dict(),
        "step": steps,
        "epoch": spec.epochs,
        "history": history,
        "finetuned": {"from": checkpoint_uri, "split": split, "segments": len(by_video), **vars(spec)},
    }
    uri = checkpoint.final_uri(out_uri, steps)
    sha256 = checkpoint.save_hashed(uri, tuned, s3)
    plot_losses(history, checkpoint.loss_plot_uri(uri), s3)
    return {
        "checkpoint_uri": uri,
        "checkpoint_sha256": sha256,
        "epochs": spec.epochs,
        "steps": steps,
        "videos_per_second": examples / seconds if seconds else 0.0,  # rated segments a second, here
        "final_loss": history["epoch_loss"][-1],
        "level": config.level,
        "preset": config.preset,
        "config": config.to_dict(),
        "data_uri": data_uri,
        "split": split,
        "rank": 0,
    }
