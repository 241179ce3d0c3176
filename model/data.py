"""Streaming batches from the Parquet layout, on local disk or S3, for training and evaluation.

An epoch's order is a plan computed from Parquet metadata alone: row groups shuffled across shards,
rows shuffled within each row group, row groups dealt to DataLoader workers (and DDP ranks). The plan
is deterministic for (seed, epoch), so a resumed run skips exactly the batches it had trained on
without reading them. Features travel as uint8 and are dequantized on the device.
"""

import multiprocessing
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from storage.objectstore import S3Config, StoreError, store_for
from storage.parquet_layout import SCHEMAS

RGB_DIM, AUDIO_DIM = 1024, 128


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class RowGroup:
    uri: str
    index: int
    rows: int


def find_row_groups(data_uri: str, level: str, split: str, pattern: str = "*.parquet",
                    s3: S3Config | None = None) -> list[RowGroup]:
    """Row groups of the split's files under `<data>/<level>/<split>/`, after checking each file's schema."""
    folder = f"{data_uri.rstrip('/')}/{level}/{split}"
    store = store_for(folder, s3)
    try:
        files = store.list(folder, pattern)
    except StoreError as exc:
        raise DataError(f"cannot read split {split!r}: {exc}") from None
    groups = []
    for info in files:
        with store.open_read(info.uri) as f:
            metadata = pq.ParquetFile(f).metadata
            schema = metadata.schema.to_arrow_schema()
        expected = SCHEMAS[level]
        if not schema.remove_metadata().equals(expected):
            raise DataError(f"{info.uri}: not the {level}-level layout: columns {schema.names} "
                            f"({', '.join(str(t) for t in schema.types)}), expected {expected.names}")
        groups += [RowGroup(info.uri, i, metadata.row_group(i).num_rows) for i in range(metadata.num_row_groups)]
    if sum(g.rows for g in groups) == 0:
        raise DataError(f"no videos in {folder} (pattern {pattern!r}): the split is empty")
    return groups


def plan_epoch(groups: list[RowGroup], batch_size: int, seed: int, epoch: int, workers: int, shuffle: bool,
               drop_last: bool, rank: int = 0, world: int = 1) -> list[list[list[tuple[int, int]]]]:
    """For this rank, each worker's batches; a batch is a list of (row group index, row) pairs.

    Every rank gets the same number of batches (DDP steps in lockstep), trimmed to the smallest.
    """
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
            batches = [pairs[i:i + batch_size] for i in range(0, len(pairs), batch_size)]
            if drop_last and batches and len(batches[-1]) < batch_size:
                batches.pop()
            plans.append(batches)
        plans_by_rank.append(plans)
    if world > 1:
        steps = min(sum(len(b) for b in plans) for plans in plans_by_rank)
        plans_by_rank = [_trim(plans, steps) for plans in plans_by_rank]
    return plans_by_rank[rank]


def _round_robin(lengths: list[int], steps: int) -> tuple[list[int], int]:
    """After `steps` batches of DataLoader's in-order round robin over workers (which passes over
    exhausted ones): how many each worker has delivered, and which worker is next."""
    taken = [0] * len(lengths)
    worker = 0
    for _ in range(min(steps, sum(lengths))):
        while taken[worker] >= lengths[worker]:
            worker = (worker + 1) % len(lengths)
        taken[worker] += 1
        worker = (worker + 1) % len(lengths)
    return taken, worker


def _trim(plans: list[list], steps: int) -> list[list]:
    taken, _ = _round_robin([len(p) for p in plans], steps)
    return [p[:n] for p, n in zip(plans, taken)]


class ParquetBatches(IterableDataset):
    """Batches of one epoch, as dicts of CPU tensors: frame level `rgb`, `audio` (uint8, B x T x dim),
    `mask` (bool, B x T); video level `mean_rgb`, `mean_audio` (float32); both `labels` (uint8 multi-hot,
    B x classes) and `ids`."""

    def __init__(self, groups: list[RowGroup], level: str, batch_size: int, num_classes: int, max_frames: int = 300,
                 seed: int = 0, epoch: int = 0, shuffle: bool = True, drop_last: bool = True, skip_batches: int = 0,
                 workers: int = 1, rank: int = 0, world: int = 1, s3: S3Config | None = None):
        super().__init__()
        self.groups, self.level, self.num_classes, self.max_frames, self.s3 = groups, level, num_classes, max_frames, s3
        plans = plan_epoch(groups, batch_size, seed, epoch, max(1, workers), shuffle, drop_last, rank, world)
        skip, after = _round_robin([len(p) for p in plans], skip_batches)
        # A new DataLoader starts its round robin at worker 0: rotate the plans so that worker 0 serves
        # the one that was next, and a resumed epoch yields the very batches the uninterrupted one would.
        self.plans, self.skip = plans[after:] + plans[:after], skip[after:] + skip[:after]
        self.skip_total = sum(skip)
        self._files: dict[str, pq.ParquetFile] = {}
        self._cached: tuple[int, dict] | None = None

    def __len__(self) -> int:
        return sum(len(p) - s for p, s in zip(self.plans, self.skip))

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        plans = self.plans if info is None else [self.plans[worker]]
        skips = self.skip if info is None else [self.skip[worker]]
        if info is None and len(plans) > 1:  # no worker processes: serve the workers' plans in DataLoader's order
            yield from self._interleave(plans, skips)
            return
        for batch in plans[0][skips[0]:]:
            yield self._load(batch)

    def _interleave(self, plans, skips):
        iterators = [iter(p[s:]) for p, s in zip(plans, skips)]
        active = list(range(len(iterators)))
        while active:
            for w in list(active):
                batch = next(iterators[w], None)
                if batch is None:
                    active.remove(w)
                else:
                    yield self._load(batch)

    def _columns(self, group_index: int) -> dict:
        """The row group's columns as numpy, cached while consecutive batches use the same group."""
        if self._cached is not None and self._cached[0] == group_index:
            return self._cached[1]
        group = self.groups[group_index]
        if group.uri not in self._files:
            self._files[group.uri] = pq.ParquetFile(store_for(group.uri, self.s3).open_read(group.uri))
        table = self._files[group.uri].read_row_group(group.index)
        columns = {"id": table.column("id").to_pylist(), "labels": table.column("labels").to_pylist()}
        for name in ("rgb", "audio") if self.level == "frame" else ("mean_rgb", "mean_audio"):
            array = table.column(name).combine_chunks()
            if self.level == "frame":
                offsets = np.frombuffer(array.buffers()[1], np.int32)[array.offset:array.offset + len(array) + 1]
                columns[name] = (offsets, np.frombuffer(array.buffers()[2], np.uint8))
            else:
                dim = RGB_DIM if name == "mean_rgb" else AUDIO_DIM
                columns[name] = array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), dim)
        self._cached = (group_index, columns)
        return columns

    def _load(self, batch: list[tuple[int, int]]) -> dict:
        size = len(batch)
        labels = np.zeros((size, self.num_classes), np.uint8)
        ids = []
        if self.level == "frame":
            frame_counts = []
            for g, row in batch:
                offsets, _ = self._columns(g)["rgb"]
                frame_counts.append(min(self.max_frames, (offsets[row + 1] - offsets[row]) // RGB_DIM))
            length = max(1, max(frame_counts))
            rgb = np.zeros((size, length, RGB_DIM), np.uint8)
            audio = np.zeros((size, length, AUDIO_DIM), np.uint8)
            mask = np.zeros((size, length), bool)
        else:
            mean_rgb = np.empty((size, RGB_DIM), np.float32)
            mean_audio = np.empty((size, AUDIO_DIM), np.float32)
        for i, (g, row) in enumerate(batch):
            columns = self._columns(g)
            ids.append(columns["id"][row])
            labels[i, columns["labels"][row]] = 1
            if self.level == "frame":
                n = frame_counts[i]
                for name, out, dim in (("rgb", rgb, RGB_DIM), ("audio", audio, AUDIO_DIM)):
                    offsets, values = columns[name]
                    out[i, :n] = values[offsets[row]:offsets[row] + n * dim].reshape(n, dim)
                mask[i, :n] = True
            else:
                mean_rgb[i] = columns["mean_rgb"][row]
                mean_audio[i] = columns["mean_audio"][row]
        features = ({"rgb": torch.from_numpy(rgb), "audio": torch.from_numpy(audio), "mask": torch.from_numpy(mask)}
                    if self.level == "frame" else
                    {"mean_rgb": torch.from_numpy(mean_rgb), "mean_audio": torch.from_numpy(mean_audio)})
        return {**features, "labels": torch.from_numpy(labels), "ids": ids}


def loader(dataset: ParquetBatches, workers: int, pin_memory: bool) -> DataLoader:
    if workers:
        _allow_worker_processes()
    # Its own generator: a DataLoader draws a seed from the global RNG when it starts, which would
    # shift the dropout masks of a resumed run away from those of an uninterrupted one.
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=4 if workers else None,
                      generator=torch.Generator().manual_seed(0))


def _allow_worker_processes() -> None:
    """A Celery prefork worker (Airflow's CeleryExecutor) runs tasks in daemonic processes, and
    multiprocessing forbids those children, so the DataLoader could not start its workers. The task's
    process is Airflow's own fork for this one task, supervised and reaped by Airflow, so clearing the
    inherited flag is safe there."""
    process = multiprocessing.current_process()
    if process.daemon:
        process._config["daemon"] = False


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a batch; features stay uint8 on the way (4x less to copy) and are dequantized there."""
    from model.attention_lstm import dequantize

    moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if "rgb" in moved:
        moved["rgb"], moved["audio"] = dequantize(moved["rgb"]), dequantize(moved["audio"])
    moved["labels"] = moved["labels"].float()
    return moved
