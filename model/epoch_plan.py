"""An epoch's order, planned from row-group sizes and frame counts alone (pure numpy, no file read).

Row groups shuffled across shards, rows shuffled within each row group, row groups dealt to DataLoader
workers (and DDP ranks); at frame level, videos of similar length are then batched together within windows
of a few batches (length bucketing), so that batches carry little padding. The plan is deterministic for
(seed, epoch), so a resumed run skips exactly the batches it had trained on without reading them: that is
the resume contract. The plan is numpy arrays (WorkerPlan, 8 bytes a video).
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from storage.formats.yt8m_spec import MAX_FRAMES

if TYPE_CHECKING:
    from model.parquet_reader import RowGroup

# Batches per length-sorted window (see plan_epoch). The padded-frame fraction falls about as 1/window
# (YouTube-8M's lengths: 14% unbucketed, 4% at 8, 2% at 16), and a worker holds one window's row groups
# (window x batch_size videos) instead of one row group: 8 is about what DataLoader's prefetch of
# 4 batches per worker holds already. 1 turns bucketing off.
BUCKET_WINDOW = 8


@dataclass(frozen=True)
class EpochSpec:
    """One epoch of one rank, as plan_epoch cuts it: with (seed, epoch) and the batches already done
    (`skip_batches`), what a checkpoint records to resume exactly where it stopped."""

    batch_size: int
    seed: int = 0
    epoch: int = 0
    workers: int = 1  # DataLoader workers (0 or 1: one plan)
    shuffle: bool = True
    drop_last: bool = True
    rank: int = 0
    world: int = 1
    max_frames: int = MAX_FRAMES
    bucket_window: int = BUCKET_WINDOW
    skip_batches: int = 0  # batches of the epoch already trained on (a resumed run skips them unread)


@dataclass(frozen=True, eq=False)
class WorkerPlan:
    """One DataLoader worker's batches of an epoch: its videos in order as two int32 arrays, `group` (index
    into the dataset's row groups) and `row` (row within that group). Batch i is the slice
    [i * batch_size, (i + 1) * batch_size); only the last may be shorter (drop_last and DDP trimming are
    applied by cutting the arrays). Eight bytes a video: 3.9 M videos plan in ~31 MB, shared copy-on-write
    by forked DataLoader workers (numpy arrays are not touched by refcounting, unlike lists of tuples).
    `window`: batches per length-bucketed window, whose rows mix the window's row groups (1: a row
    group's rows are contiguous)."""

    group: np.ndarray
    row: np.ndarray
    batch_size: int
    window: int = 1

    def __len__(self) -> int:
        return -(-len(self.group) // self.batch_size)

    def batch(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch i as (group indices, rows), views into the plan."""
        span = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.group[span], self.row[span]

    def window_rest(self, i: int, after: bool = True) -> np.ndarray:
        """The row groups of batch i's window from batch i + 1 on (after=False: from batch i on), a view:
        what a reader keeps while it loads batch i."""
        end = (i // self.window + 1) * self.window * self.batch_size
        return self.group[(i + after) * self.batch_size : end]

    @property
    def nbytes(self) -> int:
        return self.group.nbytes + self.row.nbytes


def plan_epoch(groups: "list[RowGroup]", spec: EpochSpec) -> list[WorkerPlan]:
    """For this rank, each worker's batches (a WorkerPlan per worker).

    Row groups are shuffled, dealt to ranks (`order[rank::world]`) and then to workers (`[w::workers]`),
    rows shuffled within each group; the random draws are `rng.permutation(len(groups))`, then one
    `rng.permutation(rows)` per group, rank after rank and worker after worker: that order is part of the
    contract (checkpoints record only (seed, epoch, batches done), so it must not change). Every rank gets
    the same number of batches (DDP steps in lockstep), trimmed to the smallest. Cost: per row group in
    Python, per video only in numpy.

    Length bucketing (shuffled plans whose groups carry num_frames, i.e. frame level, and
    bucket_window > 1): each worker's videos, in the order above, are cut into windows of bucket_window
    batches' worth, each window sorted by frame count (capped at max_frames; a stable sort, so equal
    lengths keep their random order), cut into batches, and its full batches shuffled. The windows
    permute videos within a worker's kept ones, so the epoch is the same set of videos, the same batch
    counts, and the draws above are untouched; the window shuffles draw from their own generator,
    seeded by (seed, epoch, rank, worker).
    """
    batch_size, seed, epoch, workers, rank, world = (
        spec.batch_size, spec.seed, spec.epoch, max(1, spec.workers), spec.rank, spec.world
    )  # fmt: skip
    shuffle, drop_last, max_frames, bucket_window = spec.shuffle, spec.drop_last, spec.max_frames, spec.bucket_window
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(groups)) if shuffle else np.arange(len(groups))
    sizes = np.fromiter((g.rows for g in groups), np.int64, len(groups))

    def dealt(r: int) -> list[np.ndarray]:
        rank_groups = order[r::world]
        return [rank_groups[w::workers] for w in range(workers)]

    def batches(videos: int) -> int:
        return videos // batch_size if drop_last else -(-videos // batch_size)

    mine = dealt(rank)
    videos = [int(sizes[g].sum()) for g in mine]
    counts = [batches(n) for n in videos]
    if world > 1:
        steps = min(sum(batches(int(sizes[g].sum())) for g in dealt(r)) for r in range(world))
        counts, _ = _round_robin(counts, steps)
    if shuffle:  # draw the permutations of the ranks before this one, to reach this rank's draws
        for r in range(rank):
            for worker_groups in dealt(r):
                for g in worker_groups:
                    rng.permutation(groups[g].rows)
    bucketed = shuffle and bucket_window > 1 and all(g.num_frames is not None for g in groups)
    plans = []
    for worker, (worker_groups, n, count) in enumerate(zip(mine, videos, counts)):
        keep = min(n, count * batch_size)
        group, row = np.empty(keep, np.int32), np.empty(keep, np.int32)
        length = np.empty(keep if bucketed else 0, np.uint16)
        start = 0
        for g in worker_groups:  # every group's permutation is drawn, kept or not, to keep the RNG stream
            rows = groups[g].rows
            perm = rng.permutation(rows) if shuffle else None
            stop = min(start + rows, keep)
            if stop > start:
                group[start:stop] = g
                row[start:stop] = perm[: stop - start] if shuffle else np.arange(stop - start)
                if bucketed:
                    length[start:stop] = groups[g].num_frames[row[start:stop]]
            start += rows
        if bucketed:
            windows = np.random.default_rng([seed, epoch, rank, worker, _BUCKET_STREAM])
            _bucket(group, row, np.minimum(length, max_frames), batch_size, bucket_window, windows)
        plans.append(WorkerPlan(group, row, batch_size, bucket_window if bucketed else 1))
    return plans


_BUCKET_STREAM = 1  # keeps the window shuffles' generator apart from any other seeded by (seed, epoch, ...)


def _bucket(
    group: np.ndarray, row: np.ndarray, length: np.ndarray, batch_size: int, window: int, rng: np.random.Generator
) -> None:
    """Sort each window of `window` batches by length and shuffle its full batches, in place; a short last
    batch stays last (WorkerPlan's batches are slices, and only the last may be short)."""
    span = window * batch_size
    for start in range(0, len(group), span):
        stop = min(start + span, len(group))
        order = start + np.argsort(length[start:stop], kind="stable")
        full = (stop - start) // batch_size
        batches = rng.permutation(full)
        order[: full * batch_size] = order[: full * batch_size].reshape(full, batch_size)[batches].ravel()
        group[start:stop], row[start:stop] = group[order], row[order]


def _round_robin(lengths: list[int], steps: int) -> tuple[list[int], int]:
    """After `steps` batches of DataLoader's in-order round robin over workers (which passes over
    exhausted ones): how many each worker has delivered, and which worker is next.

    Arithmetic, not step by step: the round robin is a series of passes, pass k taking one batch from
    each worker (in order) that has more than k; find the last complete pass by bisection."""
    lengths = np.asarray(lengths, np.int64)
    steps = min(steps, int(lengths.sum()))
    if steps <= 0:
        return [0] * len(lengths), 0
    low, high = 0, int(lengths.max())  # passes completed: the largest k with sum(min(lengths, k)) <= steps
    while low < high:
        mid = (low + high + 1) // 2
        if int(np.minimum(lengths, mid).sum()) <= steps:
            low = mid
        else:
            high = mid - 1
    taken = np.minimum(lengths, low)
    left = steps - int(taken.sum())  # batches into the next, incomplete pass
    active = np.flatnonzero(lengths > low)
    taken[active[:left]] += 1
    last = active[left - 1] if left else np.flatnonzero(lengths >= low)[-1]
    return taken.tolist(), int(last + 1) % len(lengths)


def plan_nbytes(plans: list[WorkerPlan]) -> int:
    """Bytes the epoch's plan holds (its numpy arrays): plan_epoch's result, or a dataset's `plans`."""
    return sum(p.nbytes for p in plans)


def padded_fraction(plans: list[WorkerPlan], groups: "list[RowGroup]", max_frames: int = MAX_FRAMES) -> float:
    """The share of the plan's frame slots that are padding: each batch is padded to its longest video
    (capped at max_frames), as _PaddedFrames does. From the plan and the groups' num_frames alone."""
    padded = slots = 0
    for plan in plans:
        for i in range(len(plan)):
            group, row = plan.batch(i)
            lengths = np.fromiter(
                (min(max_frames, int(groups[g].num_frames[r])) for g, r in zip(group.tolist(), row.tolist())),
                np.int64,
                len(group),
            )
            width = max(1, int(lengths.max()))
            slots += width * len(lengths)
            padded += width * len(lengths) - int(lengths.sum())
    return padded / max(1, slots)
