"""The epoch plan in numpy arrays: the same batches as the list-of-tuples plan it replaced, compact at the
scale of the real train split, and a loader that streams over many files with one open."""

import time
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model import parquet_reader
from model.data import EpochSpec, ParquetBatches, RowGroup, WorkerPlan, loader, plan_epoch, plan_nbytes
from model.epoch_plan import _round_robin
from storage.formats.parquet_layout import FRAME_SCHEMA, VIDEO_SCHEMA
from tests.support.reads import count_group_reads

# --- the reference: the list-of-tuples plan as it was before the numpy one, kept verbatim -------------------


def reference_plan_epoch(groups, batch_size, seed, epoch, workers, shuffle, drop_last, rank=0, world=1):
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(groups)) if shuffle else np.arange(len(groups))
    plans_by_rank = []
    for r in range(world):
        rank_groups = order[r::world]
        plans = []
        for w in range(workers):
            pairs = []
            for g in rank_groups[w::workers]:
                rows = rng.permutation(groups[g].rows) if shuffle else np.arange(groups[g].rows)
                pairs.extend((int(g), int(row)) for row in rows)
            batches = [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]
            if drop_last and batches and len(batches[-1]) < batch_size:
                batches.pop()
            plans.append(batches)
        plans_by_rank.append(plans)
    if world > 1:
        steps = min(sum(len(b) for b in plans) for plans in plans_by_rank)
        plans_by_rank = [reference_trim(plans, steps) for plans in plans_by_rank]
    return plans_by_rank[rank]


def reference_round_robin(lengths, steps):
    taken = [0] * len(lengths)
    worker = 0
    for _ in range(min(steps, sum(lengths))):
        while taken[worker] >= lengths[worker]:
            worker = (worker + 1) % len(lengths)
        taken[worker] += 1
        worker = (worker + 1) % len(lengths)
    return taken, worker


def reference_trim(plans, steps):
    taken, _ = reference_round_robin([len(p) for p in plans], steps)
    return [p[:n] for p, n in zip(plans, taken)]


def reference_served(groups, batch_size, seed, epoch, workers, shuffle, drop_last, rank, world, skip_batches):
    """The batches ParquetBatches yielded (no worker processes), from the reference plan: rotated after the
    skipped batches, then DataLoader's round robin."""
    plans = reference_plan_epoch(groups, batch_size, seed, epoch, workers, shuffle, drop_last, rank, world)
    skip, after = reference_round_robin([len(p) for p in plans], skip_batches)
    plans, skip = plans[after:] + plans[:after], skip[after:] + skip[:after]
    iterators = [iter(p[s:]) for p, s in zip(plans, skip)]
    active, served = list(range(len(iterators))), []
    while active:
        for w in list(active):
            batch = next(iterators[w], None)
            if batch is None:
                active.remove(w)
            else:
                served.append(batch)
    return served


def _pairs(plan: WorkerPlan, i: int) -> list[tuple[int, int]]:
    group, row = plan.batch(i)
    return list(zip(group.tolist(), row.tolist()))


def _groups(seed: int, n: int) -> list[RowGroup]:
    """Row groups of uneven sizes, a few empty and a few smaller than a batch."""
    sizes = np.random.default_rng(seed).integers(0, 40, n)
    sizes[::7] = 0
    return [RowGroup(f"file{i // 3}.parquet", i % 3, int(s)) for i, s in enumerate(sizes)]


# --- the plan ----------------------------------------------------------------------------------------------

CASES = [  # seed, epoch, workers, rank, world, shuffle, drop_last, batch_size, row groups
    (0, 0, 1, 0, 1, True, True, 8, 30),
    (3, 1, 2, 0, 1, True, True, 8, 30),
    (3, 2, 2, 0, 1, True, False, 7, 31),
    (5, 0, 4, 0, 1, False, False, 16, 25),
    (5, 0, 3, 0, 1, False, True, 5, 25),
    (7, 4, 2, 0, 2, True, True, 8, 40),
    (7, 4, 2, 1, 2, True, True, 8, 40),
    (11, 3, 3, 2, 4, True, False, 6, 45),
    (11, 3, 3, 3, 4, True, True, 6, 45),
    (13, 0, 2, 1, 3, False, False, 9, 20),
    (17, 9, 5, 7, 8, True, True, 4, 60),
    (19, 1, 4, 1, 2, True, False, 64, 12),  # batches larger than row groups, workers with nothing
    (23, 0, 6, 0, 1, True, True, 3, 4),  # more workers than row groups
]


@pytest.mark.parametrize("seed, epoch, workers, rank, world, shuffle, drop_last, batch_size, n", CASES)
def test_plan_is_the_list_of_tuples_plan_batch_by_batch(
    seed, epoch, workers, rank, world, shuffle, drop_last, batch_size, n
):
    groups = _groups(seed, n)
    expected = reference_plan_epoch(groups, batch_size, seed, epoch, workers, shuffle, drop_last, rank, world)
    plans = plan_epoch(groups, EpochSpec(batch_size, seed, epoch, workers, shuffle, drop_last, rank, world))
    assert len(plans) == len(expected) == workers
    for plan, batches in zip(plans, expected):
        assert plan.group.dtype == plan.row.dtype == np.int32
        assert len(plan) == len(batches)
        assert [_pairs(plan, i) for i in range(len(plan))] == batches


@pytest.mark.parametrize("seed, epoch, workers, rank, world, shuffle, drop_last, batch_size, n", CASES)
@pytest.mark.parametrize("skip_batches", [0, 1, 3, 10, 1000])
def test_dataset_serves_the_same_batches_after_skipping(
    seed, epoch, workers, rank, world, shuffle, drop_last, batch_size, n, skip_batches
):
    groups = _groups(seed, n)
    expected = reference_served(groups, batch_size, seed, epoch, workers, shuffle, drop_last, rank, world, skip_batches)
    dataset = ParquetBatches(
        groups,
        "video",
        10,
        EpochSpec(batch_size, seed, epoch, workers, shuffle, drop_last, rank, world, skip_batches=skip_batches),
    )
    served = []
    dataset._load = lambda group, row: served.append(list(zip(group.tolist(), row.tolist())))  # no files read
    for _ in dataset:
        pass
    assert served == expected and len(dataset) == len(expected)


def test_round_robin_is_the_step_by_step_one():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        lengths = rng.integers(0, 12, rng.integers(1, 7)).tolist()
        steps = int(rng.integers(0, sum(lengths) + 3))
        assert _round_robin(lengths, steps) == reference_round_robin(lengths, steps), (lengths, steps)
    started = time.perf_counter()
    assert _round_robin([1_000_000, 999_999, 1_000_000, 3], 2_500_000)[0] == [833_333, 833_332, 833_332, 3]
    assert time.perf_counter() - started < 0.1


# --- at the scale of the real train split --------------------------------------------------------------------

FILES, GROUPS_PER_FILE, VIDEOS = 3844, 2, 3_900_000


def train_split() -> list[RowGroup]:
    """3,844 files of two row groups, 3.9 M videos: the real train split's shape (plan_epoch reads only rows)."""
    n = FILES * GROUPS_PER_FILE
    sizes = np.full(n, VIDEOS // n)
    sizes[: VIDEOS % n] += 1
    return [
        RowGroup(f"s3://yt8m/frame/train/train{i // GROUPS_PER_FILE:04d}.parquet", i % GROUPS_PER_FILE, int(s))
        for i, s in enumerate(sizes)
    ]


def test_plan_of_the_whole_train_split_is_compact():
    groups = train_split()
    assert sum(g.rows for g in groups) == VIDEOS
    tracemalloc.start()
    try:
        started = time.perf_counter()
        plans = plan_epoch(groups, EpochSpec(1024, seed=0, epoch=3, workers=4, shuffle=True, drop_last=True))
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    nbytes = plan_nbytes(plans)
    assert nbytes == 8 * sum(len(p.group) for p in plans) and nbytes < 100e6
    assert peak < 150e6  # a tuple per video would be ~250 MB (tuple + two ints) before any list
    assert sum(len(p) for p in plans) == sum(len(p.group) for p in plans) // 1024 >= VIDEOS // 1024 - 4
    assert seconds < 10


def test_dataset_over_the_whole_train_split_reports_its_plan():
    groups = train_split()
    steps = []
    for rank in (0, 7):
        dataset = ParquetBatches(
            groups, "frame", 3862, EpochSpec(256, seed=1, workers=4, rank=rank, world=8, skip_batches=100)
        )
        assert plan_nbytes(dataset.plans) == sum(p.group.nbytes + p.row.nbytes for p in dataset.plans) < 100e6 / 8
        assert dataset.skip_total == 100
        steps.append(len(dataset) + dataset.skip_total)
    assert steps[0] == steps[1] >= VIDEOS // 8 // 256 - 8  # ranks step in lockstep


# --- streaming over many files -------------------------------------------------------------------------------


def _video_files(folder, files: int, rows_per_group: list[int]) -> tuple[list[RowGroup], list[str]]:
    groups, ids = [], []
    rng = np.random.default_rng(0)
    for f in range(files):
        uri = str(folder / f"test{f:04d}.parquet")
        with pq.ParquetWriter(uri, VIDEO_SCHEMA) as writer:
            for g, rows in enumerate(rows_per_group):
                names = [f"v{f:03d}-{g}-{r:02d}" for r in range(rows)]
                writer.write_table(
                    pa.table(
                        {
                            "id": names,
                            "labels": [[int(rng.integers(10))] for _ in names],
                            "mean_rgb": [rng.random(1024, np.float32).tolist() for _ in names],
                            "mean_audio": [rng.random(128, np.float32).tolist() for _ in names],
                        },
                        schema=VIDEO_SCHEMA,
                    )
                )
                groups.append(RowGroup(uri, g, rows))
                ids += names
    return groups, ids


class _CountingStore:
    """store_for's stores, wrapped to count the streams open at once."""

    def __init__(self, store_for):
        self.store_for, self.open, self.most, self.opened = store_for, 0, 0, 0

    def __call__(self, uri, s3=None):
        store, counter = self.store_for(uri, s3), self

        class Counted:
            def open_read(self, uri, fingerprint=None):
                stream = store.open_read(uri, fingerprint=fingerprint)
                counter.open += 1
                counter.opened += 1
                counter.most = max(counter.most, counter.open)
                close = stream.close

                def counted_close():
                    if not stream.closed:
                        counter.open -= 1
                    close()

                stream.close = counted_close
                return stream

        return Counted()


def test_one_dataset_over_many_files_streams_them_one_at_a_time(tmp_path, monkeypatch):
    groups, ids = _video_files(tmp_path, files=40, rows_per_group=[5, 3])
    counting = _CountingStore(parquet_reader.store_for)
    monkeypatch.setattr(parquet_reader, "store_for", counting)
    dataset = ParquetBatches(
        groups, "video", 10, EpochSpec(7, workers=1, shuffle=False, drop_last=False)
    )  # batches span files
    batches = list(dataset)
    assert [i for b in batches for i in b["ids"]] == ids  # every video once, in file order
    assert batches[-1]["mean_rgb"].shape == (len(ids) % 7, 1024)
    assert counting.opened == 40 and counting.most == 1 and counting.open == 0  # nothing left open at the end
    assert dataset._cached == {}

    shuffled = ParquetBatches(groups, "video", 10, EpochSpec(7, seed=2, workers=3))
    batches = list(shuffled)
    served = [i for b in batches for i in b["ids"]]
    assert len(set(served)) == len(served) > len(ids) - 3 * 7 and set(served) <= set(ids)
    assert all(len(b["ids"]) == 7 for b in batches)
    assert counting.most == 1 and counting.open == 0


def test_worker_processes_stream_their_own_plans(tmp_path):
    groups, ids = _video_files(tmp_path, files=12, rows_per_group=[4, 6])
    dataset = ParquetBatches(groups, "video", 10, EpochSpec(8, workers=2, shuffle=False, drop_last=False))
    served = [i for b in loader(dataset, 2, pin_memory=False) for i in b["ids"]]
    in_process = [
        i
        for b in ParquetBatches(groups, "video", 10, EpochSpec(8, workers=2, shuffle=False, drop_last=False))
        for i in b["ids"]
    ]
    assert served == in_process and sorted(served) == sorted(ids)


def _frame_files(folder, files: int, rows_per_group: list[int]) -> list[RowGroup]:
    groups, rng = [], np.random.default_rng(1)
    for f in range(files):
        uri = str(folder / f"train{f:04d}.parquet")
        with pq.ParquetWriter(uri, FRAME_SCHEMA) as writer:
            for g, rows in enumerate(rows_per_group):
                frames = rng.integers(0, 9, rows)  # some longer than max_frames, some empty
                writer.write_table(
                    pa.table(
                        {
                            "id": [f"v{f}-{g}-{r}" for r in range(rows)],
                            "labels": [
                                rng.choice(10, int(rng.integers(1, 4)), replace=False).tolist() for _ in range(rows)
                            ],
                            "num_frames": frames.astype(np.int32),
                            "rgb": [rng.integers(0, 256, n * 1024, np.uint8).tobytes() for n in frames],
                            "audio": [rng.integers(0, 256, n * 128, np.uint8).tobytes() for n in frames],
                        },
                        schema=FRAME_SCHEMA,
                    )
                )
                groups.append(RowGroup(uri, g, rows))
    return groups


def test_frame_batches_read_each_row_group_once_and_are_the_videos(tmp_path, monkeypatch):
    groups = _frame_files(tmp_path, files=4, rows_per_group=[5, 4, 6])
    tables = {uri: pq.read_table(uri).to_pylist() for uri in {g.uri for g in groups}}
    reads, held = count_group_reads(monkeypatch)
    dataset = ParquetBatches(groups, "frame", 10, EpochSpec(8, seed=4, workers=1, drop_last=False, max_frames=6))
    batches = list(dataset)
    assert sorted(reads) == list(range(len(groups)))  # every row group read once in the epoch (one worker)
    assert max(held) == 1  # unbucketed (no lengths): one row group's columns held at a time
    served = [(plan.group, plan.row) for plan in dataset.plans]
    flat = np.concatenate([g for g, _ in served]), np.concatenate([r for _, r in served])
    assert sum(len(b["ids"]) for b in batches) == len(flat[0]) == sum(g.rows for g in groups)
    for batch in batches:
        length = batch["mask"].shape[1]
        for i, video_id in enumerate(batch["ids"]):
            f, g, r = video_id[1:].split("-")
            video = tables[str(tmp_path / f"train{int(f):04d}.parquet")][sum(([5, 4, 6])[: int(g)]) + int(r)]
            n = min(6, video["num_frames"])
            rgb = np.frombuffer(video["rgb"], np.uint8).reshape(-1, 1024)[:n]
            audio = np.frombuffer(video["audio"], np.uint8).reshape(-1, 128)[:n]
            assert np.array_equal(batch["rgb"][i, :n].numpy(), rgb) and not batch["rgb"][i, n:].any()
            assert np.array_equal(batch["audio"][i, :n].numpy(), audio) and not batch["audio"][i, n:].any()
            assert batch["mask"][i].tolist() == [True] * n + [False] * (length - n)
            assert sorted(np.flatnonzero(batch["labels"][i].numpy()).tolist()) == sorted(video["labels"])
        assert length == max(1, max(min(6, int(m.sum())) for m in batch["mask"]))
