"""Scoring a checkpoint on a split with YouTube-8M's metrics, streamed batch by batch."""

import dataclasses
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from model import checkpoint
from model.config import Config
from model.data import EpochSpec, ParquetBatches, RowGroup, find_row_groups, loader, to_device
from model.devices import pick_device
from model.metrics import MetricsAccumulator
from model.networks import forward
from model.precision import precision_for
from storage.formats.yt8m_spec import TOP_K
from storage.objectstore import S3Config, store_for

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    metrics: dict
    videos: int
    seconds: float
    precision_at_k: list[float]  # k = 1..TOP_K (20), over all videos
    recall_at_k: list[float]
    set_fingerprint: str  # VideoSet: the exact videos scored
    class_ap: np.ndarray | None = None  # each class's average precision (NaN: no positive among the videos)
    class_positives: np.ndarray | None = None


class VideoSet:
    """The exact videos an evaluation scored, as one sha256 (the evaluation's `set_fingerprint`): how many,
    their ids, and the content of the files they were read from. The ids count as a set: an order-free sum
    of each id's sha256 (as a hash of the sorted ids would, in constant memory); the content as each file's
    name and store fingerprint, so a shard rewritten with new features under the same ids is another set.
    Two evaluations compare only on equal fingerprints."""

    def __init__(self, groups: list[RowGroup]):
        self.files = sorted({(g.uri.rsplit("/", 1)[-1], g.fingerprint or "") for g in groups})
        self.count, self.ids_sum = 0, 0

    def add(self, ids) -> None:
        for video_id in ids:
            digest = hashlib.sha256(str(video_id).encode("utf-8", "surrogatepass")).digest()
            self.ids_sum = (self.ids_sum + int.from_bytes(digest, "big")) % 2**256
        self.count += len(ids)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(f"{self.count}\n".encode())
        digest.update(self.ids_sum.to_bytes(32, "big"))
        for name, fingerprint in self.files:
            digest.update(f"\n{name}\t{fingerprint}".encode())
        return digest.hexdigest()


def load_model(
    checkpoint_uri: str,
    device: torch.device,
    s3: S3Config | None = None,
    sha256: str | None = None,
    precision: str | None = None,
    weights: tuple[str, str] | None = None,
) -> tuple[torch.nn.Module, Config]:
    """The checkpoint's model in eval mode. Pass a model version's `sha256` (registry column
    checkpoint_sha256) to refuse weights that changed since it was registered (CheckpointChangedError), and
    `precision` to score in another policy than the checkpoint's config names (the weights are the same).
    `weights`: the version's inference artifact (URI, sha256), read instead of the checkpoint: its weights
    alone, memory-mapped, hashed as they are read."""
    if weights is not None:
        uri = weights[0]
        state = checkpoint.load_weights(uri, s3, sha256=weights[1])
    else:
        uri = checkpoint_uri
        state = checkpoint.load(checkpoint_uri, s3, sha256=sha256)
    config = checkpoint.config_of(state, uri)
    if precision is not None:
        config = dataclasses.replace(config, precision=precision).validate()
    return checkpoint.model_of(state, config, uri, assign=weights is not None).to(device).eval(), config


def predict(
    model: torch.nn.Module, config: Config, batches, device: torch.device, segments: tuple[int, str] | None = None
) -> Iterator[tuple]:
    """(ids, sigmoid scores float32 B x C, multi-hot labels uint8) for each batch, without gradients, in the
    config's precision policy (a checkpoint's config: the policy it trained in if one was named, else the
    device's default). With `segments` (M, method: a frame-level model), a fourth item: each video's M best
    segments (model.segments.TopSegments), scored in the same pass where the method allows."""
    precision = precision_for(config.precision, device)
    precision.apply(model, device)
    log.info("scoring in %s", precision.summary(model, device))
    if segments is not None:
        from model.segments import segment_scores, top_segments
    with torch.inference_mode():
        for batch in batches:
            labels = batch["labels"].numpy()
            moved = to_device(batch, device)
            with precision.autocast(device):
                if segments is None:
                    logits = forward(model, moved, config.level)
                    yield batch["ids"], torch.sigmoid(logits.float()).cpu().numpy(), labels
                    continue
                scores, rated, counts = segment_scores(model, moved["rgb"], moved["audio"], moved["mask"], segments[1])
            top = top_segments(rated, counts, config.num_classes, segments[0])
            yield batch["ids"], scores.cpu().numpy(), labels, top


def predict_row_groups(
    model: torch.nn.Module,
    config: Config,
    groups: list[RowGroup],
    device: torch.device,
    batch_size: int,
    s3: S3Config | None = None,
    segments: tuple[int, str] | None = None,
) -> Iterator[tuple]:
    """`predict` over `groups` in their order, every video once (no shuffling, the last short batch kept),
    read by `config.num_workers` loader processes. The dataset and loader exist on return; reading starts
    with the first batch asked for. `segments`: as `predict`'s."""
    dataset = ParquetBatches(
        groups,
        config.level,
        config.num_classes,
        EpochSpec(batch_size, workers=config.num_workers, shuffle=False, drop_last=False, max_frames=config.max_frames),
        s3=s3,
    )
    return predict(model, config, loader(dataset, config.num_workers, device.type == "cuda"), device, segments)


def evaluate(
    checkpoint_uri: str,
    data_uri: str,
    split: str = "validate",
    pattern: str = "*.parquet",
    s3: S3Config | None = None,
    sha256: str | None = None,
    precision: str | None = None,
) -> Evaluation:
    dev = pick_device()
    model, config = load_model(checkpoint_uri, dev, s3, sha256=sha256, precision=precision)
    groups = find_row_groups(data_uri, config.level, split, pattern, s3, lengths=False)  # read in order: no buckets
    batches = predict_row_groups(model, config, groups, dev, min(config.batch_size, 256), s3)
    accumulator = MetricsAccumulator(config.num_classes, top_k=TOP_K)
    video_set = VideoSet(groups)
    hits_at = np.zeros(TOP_K)
    positives = 0
    started = time.perf_counter()
    for ids, scores, labels in batches:
        accumulator.add(scores, labels)
        video_set.add(ids)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :TOP_K]
        hits_at += np.take_along_axis(labels, top, axis=1).sum(axis=0)
        positives += int(labels.sum())
    seconds = time.perf_counter() - started
    videos = accumulator.num_videos
    cumulative = np.cumsum(hits_at)
    metrics, class_ap, class_positives = accumulator.result_by_class()
    return Evaluation(
        metrics=metrics,
        videos=videos,
        seconds=seconds,
        precision_at_k=(cumulative / (videos * np.arange(1, TOP_K + 1))).tolist(),
        recall_at_k=(cumulative / max(1, positives)).tolist(),
        set_fingerprint=video_set.fingerprint(),
        class_ap=class_ap,
        class_positives=class_positives,
    )


def plot(evaluation: Evaluation, title: str, uri: str, s3: S3Config | None = None) -> str:
    """Precision and recall of each video's top-k labels, k = 1..TOP_K (20), with the four metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = np.arange(1, TOP_K + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(k, evaluation.precision_at_k, "o-", label="precision@k")
    ax.plot(k, evaluation.recall_at_k, "s-", label="recall@k")
    m = evaluation.metrics
    ax.set_title(
        f"{title}\nGAP {m['gap']:.4f}  Hit@1 {m['hit_at_one']:.4f}  PERR {m['perr']:.4f}  "
        f"mAP {m['map']:.4f}  ({evaluation.videos} videos)",
        fontsize=9,
    )
    ax.set_xlabel("k (labels kept per video)")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(k)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with store_for(uri, s3).publish(uri) as path:
        fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return uri
