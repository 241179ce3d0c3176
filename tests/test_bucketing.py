"""Length bucketing of frame-level batches: still every video once an epoch, still an exact resume, far
less padding on YouTube-8M's lengths, and a reader that reads each row group once a window."""

import time
import tracemalloc
from collections import Counter
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.data import (
    BUCKET_WINDOW,
    EpochSpec,
    ParquetBatches,
    RowGroup,
    find_row_groups,
    padded_fraction,
    plan_epoch,
    plan_nbytes,
)
from storage.formats.parquet_layout import FRAME_SCHEMA
from tasks.synth import draw_num_frames
from tests.support.reads import count_group_reads


def _groups(seed: int, n: int, max_rows: int = 40) -> list[RowGroup]:
    """Row groups of uneven sizes (a few empty), their videos' lengths drawn as synth draws them."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, max_rows, n)
    sizes[::7] = 0
    return [
        RowGroup(f"file{i // 3}.parquet", i % 3, int(s), num_frames=draw_num_frames(rng, int(s)).astype(np.uint16))
        for i, s in enumerate(sizes)
    ]


def _without_lengths(groups: list[RowGroup]) -> list[RowGroup]:
    return [RowGroup(g.uri, g.index, g.rows, g.fingerprint) for g in groups]


def _videos(plans) -> list[tuple[int, int]]:
    return [pair for plan in plans for pair in zip(plan.group.tolist(), plan.row.tolist())]


CASES = [  # seed, epoch, workers, rank, world, drop_last, batch_size, row groups
    (0, 0, 1, 0, 1, True, 8, 30),
    (0, 1, 1, 0, 1, False, 8, 30),
    (3, 2, 2, 0, 1, False, 7, 31),
    (5, 0, 3, 0, 1, True, 5, 25),
    (7, 4, 2, 0, 2, True, 8, 40),
    (11, 3, 3, 0, 4, False, 6, 45),
    (17, 9, 5, 0, 8, True, 4, 60),
    (19, 1, 4, 0, 2, False, 64, 12),  # batches larger than row groups, workers with nothing
]


@pytest.mark.parametrize("seed, epoch, workers, rank, world, drop_last, batch_size, n", CASES)
@pytest.mark.parametrize("window", [2, BUCKET_WINDOW])
def test_bucketed_epoch_keeps_every_worker_s_videos_and_batch_counts(
    seed, epoch, workers, rank, world, drop_last, batch_size, n, window
):
    groups = _groups(seed, n)
    everyone = []
    for r in range(world):
        spec = EpochSpec(batch_size, seed, epoch, workers, True, drop_last, r, world)
        plain = plan_epoch(_without_lengths(groups), spec)
        bucketed = plan_epoch(groups, replace(spec, bucket_window=window))
        for p, b in zip(plain, bucketed, strict=True):
            assert b.window == window and p.window == 1
            assert len(b) == len(p) and Counter(_videos([b])) == Counter(_videos([p]))  # the same videos, reordered
            assert all(len(b.batch(i)[0]) == batch_size for i in range(len(b) - 1))  # only the last may be short
        everyone += _videos(bucketed)
    assert len(set(everyone)) == len(everyone)  # no video twice, across workers and ranks
    if world == 1 and not drop_last:
        assert sorted(everyone) == sorted((g, r) for g, group in enumerate(groups) for r in range(group.rows))


def test_windows_hold_batches_of_similar_lengths_in_a_shuffled_order():
    groups = _groups(1, 80)
    (plan,) = plan_epoch(
        groups, EpochSpec(8, seed=1, epoch=0, workers=1, shuffle=True, drop_last=True, bucket_window=4)
    )
    (plain,) = plan_epoch(
        _without_lengths(groups), EpochSpec(8, seed=1, epoch=0, workers=1, shuffle=True, drop_last=True)
    )
    assert _videos([plan]) != _videos([plain])
    lengths = np.array([groups[g].num_frames[r] for g, r in _videos([plan])]).reshape(-1, 8)
    for window in np.array_split(lengths, range(4, len(lengths), 4)):
        ranges = sorted((int(b.min()), int(b.max())) for b in window)
        # Sorted then cut: one batch's longest is at most the next batch's shortest.
        assert all(high <= low for (_, high), (low, _) in zip(ranges, ranges[1:]))
    firsts = [int(np.argmin([b.min() for b in w])) for w in np.array_split(lengths, range(4, len(lengths), 4))]
    assert len(set(firsts)) > 1  # the shortest batch is not always first: the batches are shuffled


def test_bucketing_is_deterministic_and_differs_by_epoch_and_seed():
    groups = _groups(2, 50)

    def order(seed, epoch):
        return _videos(
            plan_epoch(groups, EpochSpec(8, seed=seed, epoch=epoch, workers=2, shuffle=True, drop_last=True))
        )

    assert order(4, 1) == order(4, 1)
    assert order(4, 1) != order(4, 2) and order(4, 1) != order(5, 1)


def test_without_lengths_or_shuffle_or_a_window_the_plan_is_unbucketed():
    groups = _groups(3, 30)
    plain = _videos(
        plan_epoch(_without_lengths(groups), EpochSpec(8, seed=3, epoch=0, workers=2, shuffle=True, drop_last=True))
    )
    assert (
        _videos(
            plan_epoch(groups, EpochSpec(8, seed=3, epoch=0, workers=2, shuffle=True, drop_last=True, bucket_window=1))
        )
        == plain
    )
    in_order = _videos(
        plan_epoch(_without_lengths(groups), EpochSpec(8, seed=3, epoch=0, workers=2, shuffle=False, drop_last=False))
    )
    assert (
        _videos(plan_epoch(groups, EpochSpec(8, seed=3, epoch=0, workers=2, shuffle=False, drop_last=False)))
        == in_order
    )  # inference's order is kept


@pytest.mark.parametrize("workers, world, rank", [(1, 1, 0), (2, 1, 0), (3, 2, 1)])
@pytest.mark.parametrize("skip_batches", [0, 1, 3, 5, 9, 1000])
def test_resumed_bucketed_epoch_serves_the_rest_of_the_uninterrupted_one(workers, world, rank, skip_batches):
    groups = _groups(6, 60)

    def served(skip):
        dataset = ParquetBatches(
            groups,
            "frame",
            10,
            EpochSpec(6, seed=8, epoch=2, workers=workers, rank=rank, world=world, skip_batches=skip),
        )
        assert all(p.window == BUCKET_WINDOW for p in dataset.plans)
        batches = []
        dataset._load = lambda group, row: batches.append(list(zip(group.tolist(), row.tolist())))  # no files read
        for _ in dataset:
            pass
        return batches

    assert served(skip_batches) == served(0)[skip_batches:]


def test_padding_falls_to_a_few_percent_on_youtube_8m_lengths():
    groups = _groups(9, 400, max_rows=260)  # ~45k videos, row groups of ~130 like real 32 MiB ones
    for batch_size in (32, 128):
        plain = padded_fraction(
            plan_epoch(
                _without_lengths(groups),
                EpochSpec(batch_size, seed=0, epoch=0, workers=2, shuffle=True, drop_last=True),
            ),
            groups,
        )
        bucketed = padded_fraction(
            plan_epoch(groups, EpochSpec(batch_size, seed=0, epoch=0, workers=2, shuffle=True, drop_last=True)), groups
        )
        assert 0.12 < plain < 0.17  # nearly every batch has a 300-frame video; the mean is ~257
        assert bucketed < 0.05 and bucketed < plain / 3
    capped = plan_epoch(
        groups, EpochSpec(32, seed=0, epoch=0, workers=2, shuffle=True, drop_last=True, max_frames=20)
    )  # sorted by the capped lengths
    assert padded_fraction(capped, groups, max_frames=20) == 0.0  # every video is longer than 20 frames


def test_bucketed_plan_of_the_whole_train_split_stays_compact():
    n, videos = 3844 * 2, 3_900_000
    sizes = np.full(n, videos // n)
    sizes[: videos % n] += 1
    rng = np.random.default_rng(0)
    groups = [
        RowGroup(
            f"s3://yt8m/frame/train/train{i // 2:04d}.parquet",
            i % 2,
            int(s),
            None,
            draw_num_frames(rng, int(s)).astype(np.uint16),
        )
        for i, s in enumerate(sizes)
    ]
    lengths_nbytes = sum(g.num_frames.nbytes for g in groups)
    assert lengths_nbytes == 2 * videos  # the lengths: 2 bytes a video, read once a run
    tracemalloc.start()
    try:
        started = time.perf_counter()
        plans = plan_epoch(groups, EpochSpec(1024, seed=0, epoch=3, workers=4, shuffle=True, drop_last=True))
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(p.window == BUCKET_WINDOW for p in plans)
    assert plan_nbytes(plans) == 8 * sum(len(p.group) for p in plans) < 40e6
    assert peak < 60e6  # the plan plus a worker's lengths (2 bytes a video) and one window's sort at a time
    assert seconds < 10


# --- reading: real Parquet files ---------------------------------------------------------------------------


def _frame_split(root, files: int, rows_per_group: list[int]) -> dict[str, int]:
    """Frame-level files under root/frame/train/, videos of 1-12 frames; returns each id's frame count."""
    folder = root / "frame" / "train"
    folder.mkdir(parents=True)
    rng, lengths = np.random.default_rng(2), {}
    for f in range(files):
        with pq.ParquetWriter(folder / f"train{f:04d}.parquet", FRAME_SCHEMA) as writer:
            for g, rows in enumerate(rows_per_group):
                frames = rng.integers(1, 13, rows)
                ids = [f"v{f}-{g}-{r}" for r in range(rows)]
                lengths.update(zip(ids, frames.tolist()))
                writer.write_table(
                    pa.table(
                        {
                            "id": ids,
                            "labels": [[int(rng.integers(10))] for _ in ids],
                            "num_frames": frames.astype(np.int32),
                            "rgb": [np.full(n * 1024, n, np.uint8).tobytes() for n in frames],
                            "audio": [np.full(n * 128, n, np.uint8).tobytes() for n in frames],
                        },
                        schema=FRAME_SCHEMA,
                    )
                )
    return lengths


def test_find_row_groups_reads_the_lengths_at_frame_level(tmp_path):
    lengths = _frame_split(tmp_path, files=2, rows_per_group=[5, 3])
    groups = find_row_groups(str(tmp_path), "frame", "train")
    assert [g.num_frames.dtype for g in groups] == [np.uint16] * 4
    read = {f"v{f}-{g.index}-{r}": int(n) for f, g in zip([0, 0, 1, 1], groups) for r, n in enumerate(g.num_frames)}
    assert read == lengths
    assert all(g.num_frames is None for g in find_row_groups(str(tmp_path), "frame", "train", lengths=False))


def test_bucketed_batches_are_the_videos_and_read_each_group_once_a_window(tmp_path, monkeypatch):
    lengths = _frame_split(tmp_path, files=6, rows_per_group=[9, 7, 8])
    groups = find_row_groups(str(tmp_path), "frame", "train")
    reads, held = count_group_reads(monkeypatch)
    dataset = ParquetBatches(groups, "frame", 10, EpochSpec(4, seed=1, workers=1, max_frames=10, bucket_window=3))
    (plan,) = dataset.plans
    batches = list(dataset)
    served = [i for b in batches for i in b["ids"]]
    assert sorted(served) == sorted(lengths) and len(batches) == len(lengths) // 4  # every video once
    for batch in batches:
        for i, video_id in enumerate(batch["ids"]):
            n = min(10, lengths[video_id])
            assert batch["mask"][i].sum() == n and (batch["rgb"][i, :n] == lengths[video_id]).all()
            assert not batch["rgb"][i, n:].any()
    windows = [plan.group[s : s + 12] for s in range(0, len(plan.group), 12)]
    # Each group read at most once per window that uses it (a group that straddles two windows may stay
    # held across), never once per batch.
    assert set(reads) == set(range(len(groups))) and len(reads) <= sum(len(np.unique(w)) for w in windows)
    assert len(reads) < sum(len(np.unique(b)) for b in np.split(plan.group, len(plan)))
    assert max(held) <= max(len(np.unique(w)) for w in windows)
    assert dataset._cached == {}  # nothing held after the epoch
    padding = 1 - sum(int(b["mask"].sum()) for b in batches) / sum(b["mask"].numel() for b in batches)
    assert padding == pytest.approx(padded_fraction(dataset.plans, groups, max_frames=10))

    resumed = ParquetBatches(
        groups, "frame", 10, EpochSpec(4, seed=1, workers=1, max_frames=10, bucket_window=3, skip_batches=4)
    )
    assert [b["ids"] for b in resumed] == [b["ids"] for b in batches[4:]]
