"""Where in a video each label is: scores for every 5-second segment from a frame-level model, and the
segment mAP@N of Google's segment challenge over rated segments (model/metrics.py `segment_map`).

Two ways to score a segment (issue 26, both measured by `vtag evaluate --segments --segment-method`):

- `model`: the trained model run over the segment's 5 frames alone, as if they were a short video;
- `attention`: the model run once over the whole video; a segment's score for a class is the video's score
  for it times the share of the AttentionLSTM's attention (the mean of its two modalities') that falls on
  the segment's frames, times the number of segments: the video's score where the attention is even.

A video's segments start at 0, 5, 10, ... seconds while 5 frames remain (frames are one a second), as the
starter's `inference.py --segment_labels` cuts them.
"""

import heapq
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch

from model.data import EpochSpec, ParquetBatches, RowGroup, find_row_groups, loader, to_device
from model.metrics import segment_map
from storage.errors import VtagError
from storage.formats.segment_exports import TOP_N, read_submission
from storage.formats.segment_rows import TopSegments
from storage.formats.yt8m_spec import FRAME, SEGMENT_CLASSES, SEGMENT_FEATURES, SEGMENT_FRAMES
from storage.formats.yt8m_spec import SEGMENT_METHODS as METHODS
from storage.objectstore import S3Config, store_for

SEGMENT_BATCH = 4096  # segments the `model` method scores at once


class SegmentError(VtagError, ValueError):
    pass


def segment_starts(num_frames: int) -> list[int]:
    return list(range(0, num_frames - SEGMENT_FRAMES + 1, SEGMENT_FRAMES))


def segment_scores(model, rgb, audio, mask, method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a batch (dequantized rgb, audio, mask on the model's device): (the videos' sigmoid scores,
    B x classes; their segments' for the rated classes the model has (`rated_classes`), B x S x R, S the
    most segments a video of the batch has, zero past a video's own; each video's number of segments, B).
    One pass of the model with `attention`; with `model`, a second over every segment of the batch at once
    (in slices of SEGMENT_BATCH segments)."""
    counts = mask.sum(dim=1) // SEGMENT_FRAMES
    batch, most = len(counts), int(counts.max()) if len(counts) else 0
    valid = torch.arange(most, device=mask.device)[None, :] < counts[:, None]
    if method == "attention":
        logits, attention = model.localise(rgb, audio, mask)
        videos = torch.sigmoid(logits.float())
        rated = videos[:, rated_classes(videos.shape[1], videos.device)]
        share = attention[:, : most * SEGMENT_FRAMES].float().reshape(batch, most, SEGMENT_FRAMES).sum(dim=2)
        segments = rated[:, None, :] * (share * counts[:, None])[:, :, None]
    else:
        videos = torch.sigmoid(model(rgb, audio, mask).float())
        classes = rated_classes(videos.shape[1], videos.device)
        rows, columns = valid.nonzero(as_tuple=True)
        frames = (columns * SEGMENT_FRAMES)[:, None] + torch.arange(SEGMENT_FRAMES, device=mask.device)
        segments = videos.new_zeros(batch, most, len(classes))
        ones = torch.ones(SEGMENT_BATCH, SEGMENT_FRAMES, dtype=torch.bool, device=mask.device)
        for start in range(0, len(rows), SEGMENT_BATCH):
            r, f = rows[start : start + SEGMENT_BATCH, None], frames[start : start + SEGMENT_BATCH]
            logits = model(rgb[r, f], audio[r, f], ones[: len(f)])
            segments[rows[start : start + SEGMENT_BATCH], columns[start : start + SEGMENT_BATCH]] = torch.sigmoid(
                logits.float()
            )[:, classes]
    return videos, segments * valid[:, :, None], counts


def score_segments(model, rgb, audio, mask, method: str) -> Iterator[tuple[int, list[int], np.ndarray]]:
    """For each video of a batch with at least one segment: (its index in the batch, its segment starts,
    the segments' sigmoid scores, segments x the rated classes the model has)."""
    _, segments, counts = segment_scores(model, rgb, audio, mask, method)
    segments = segments.cpu().numpy()
    for b, count in enumerate(counts.tolist()):
        if count:
            yield b, segment_starts(count * SEGMENT_FRAMES), segments[b, :count]


def rated_classes(num_classes: int, device=None) -> torch.Tensor:
    """The segment-rated classes a model of `num_classes` has, in SEGMENT_CLASSES' order."""
    return torch.tensor([c for c in SEGMENT_CLASSES if c < num_classes], dtype=torch.long, device=device)


def top_segments(segments: torch.Tensor, counts: torch.Tensor, num_classes: int, per_video: int) -> TopSegments:
    """The `per_video` best (segment, class) pairs of each video (segment_scores' output, of a model of
    `num_classes`)."""
    batch, most, _ = segments.shape
    classes = rated_classes(num_classes, segments.device)
    rated = segments.masked_fill(
        (torch.arange(most, device=segments.device)[None, :] >= counts[:, None])[:, :, None], float("-inf")
    )
    values, index = torch.topk(rated.reshape(batch, -1), min(per_video, most * len(classes)), dim=1)
    present = torch.isfinite(values)
    return TopSegments(
        classes[index % len(classes)].cpu().numpy().astype(np.int32),
        (index // len(classes) * SEGMENT_FRAMES).cpu().numpy().astype(np.int32),
        values.masked_fill(~present, 0).cpu().numpy().astype(np.float32),
        present.cpu().numpy(),
    )


@dataclass
class SegmentEvaluation:
    method: str
    top_n: int
    map_at_n: float
    segments_scored: int
    rated: int  # rated (segment, class) pairs in the split
    submission: dict[int, list[str]]  # per rated class, its best segments, "video:start", best first


def read_ratings(groups: list[RowGroup], s3: S3Config | None) -> dict[tuple[str, int], float]:
    """{("video:start", class): score} of every rated segment in the row groups of segment-rated files
    (find_row_groups' list: each file opened once, pinned to the content planned)."""
    ratings: dict[tuple[str, int], float] = {}
    by_file: dict[str, list[RowGroup]] = {}
    for group in groups:
        by_file.setdefault(group.uri, []).append(group)
    for uri, file_groups in by_file.items():
        with store_for(uri, s3).open_read(uri, fingerprint=file_groups[0].fingerprint) as f:
            reader = pq.ParquetFile(f)
            if not set(SEGMENT_FEATURES) <= set(reader.schema_arrow.names):
                continue  # a file without ratings (layout version 1)
            rows = [
                row
                for group in file_groups
                for row in reader.read_row_group(group.index, columns=["id", *SEGMENT_FEATURES]).to_pylist()
            ]
        for row in rows:
            starts, labels, scores = (row[name] for name in SEGMENT_FEATURES)
            for start, label, score in zip(starts, labels, scores):
                ratings[(f"{row['id']}:{start}", label)] = score
    return ratings


def evaluate_submission(submission_uri: str, data_uri: str, top_n: int = TOP_N, **where) -> SegmentEvaluation:
    """The segment mAP@N of a submission (a night's `segments.csv`, or the starter's) against the split's
    ratings, as segment_eval_inference.py scores one: its segments that are not rated do not count."""
    submission = read_submission(submission_uri, where.get("s3"))
    _, ratings = _split_ratings(data_uri, **where)
    ranked = sum(len(s) for s in submission.values())
    return SegmentEvaluation(
        "submission", top_n, segment_map(submission, ratings, top_n), ranked, len(ratings), submission
    )


def _split_ratings(data_uri: str, **where) -> tuple[list[RowGroup], dict[tuple[str, int], float]]:
    split, pattern, s3 = where.get("split", "validate"), where.get("pattern", "*.parquet"), where.get("s3")
    groups = find_row_groups(data_uri, FRAME.name, split, pattern, s3, lengths=False)
    ratings = read_ratings(groups, s3)
    if not ratings:
        raise SegmentError(f"no rated segments in split {split!r} of {data_uri}: ingest segment-rated shards")
    return groups, ratings


def evaluate_segments(
    model, config, data_uri: str, device, method: str = "model", top_n: int = TOP_N, **where
) -> SegmentEvaluation:
    """Score every segment of the split's videos, keep each rated class's best `top_n`, and compute the
    segment mAP@N against the split's ratings. `where`: split, pattern, s3 (as find_row_groups)."""
    if method not in METHODS:
        raise SegmentError(f"segment method must be one of {', '.join(METHODS)}, not {method!r}")
    if config.level != FRAME.name:
        raise SegmentError("segments are scored by a frame-level model")
    groups, ratings = _split_ratings(data_uri, **where)
    s3 = where.get("s3")
    labels = rated_classes(config.num_classes).tolist()
    best: dict[int, list[tuple[float, str]]] = {label: [] for label in labels}  # min-heaps of (score, segment)
    spec = EpochSpec(64, shuffle=False, drop_last=False, max_frames=config.max_frames)  # the frames it trained on
    batches = ParquetBatches(groups, FRAME.name, config.num_classes, spec, s3)
    scored = 0
    with torch.inference_mode():
        for batch in loader(batches, 0, pin_memory=False):
            moved = to_device(batch, device)
            for b, starts, seg_scores in score_segments(model, moved["rgb"], moved["audio"], moved["mask"], method):
                scored += len(starts)
                video = batch["ids"][b]
                for start, values in zip(starts, seg_scores.tolist()):
                    for label, value in zip(labels, values):
                        heap = best[label]
                        if len(heap) < top_n:
                            heapq.heappush(heap, (value, f"{video}:{start}"))
                        elif value > heap[0][0]:
                            heapq.heapreplace(heap, (value, f"{video}:{start}"))
    submission = {label: [s for _, s in sorted(heap, key=lambda e: (-e[0], e[1]))] for label, heap in best.items()}
    return SegmentEvaluation(method, top_n, segment_map(submission, ratings, top_n), scored, len(ratings), submission)
