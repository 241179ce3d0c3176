"""Batches of an epoch from the Parquet layout, on local disk or S3: the row groups of a split found
from file footers, then each worker's planned batches (model/epoch_plan.py) read streaming, one file open
and the row groups of one window in memory per worker. Features travel as uint8 and are dequantized on
the device (model/data.py `to_device`).
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from model.epoch_plan import EpochSpec, WorkerPlan, _round_robin, plan_epoch
from storage.errors import VtagError
from storage.formats.parquet_layout import SCHEMAS, SEGMENT_FRAME_SCHEMA
from storage.formats.yt8m_spec import AUDIO_DIM, FRAME, MAX_FRAMES, RGB_DIM, level_spec
from storage.objectstore import S3Config, StoreError, store_for


class DataError(VtagError, ValueError):
    pass


@dataclass(frozen=True)
class RowGroup:
    uri: str
    index: int
    rows: int
    # The file's fingerprint when the epoch was planned (ObjectInfo.fingerprint): reading it checks the
    # file is still that content, so a file replaced mid-run fails the run instead of feeding it rows
    # the plan never counted. None: not pinned.
    fingerprint: str | None = None
    # Frame level: each row's frame count, capped at MAX_FRAMES (uint16), for length bucketing; None when
    # not read (video level, or find_row_groups(lengths=False)).
    num_frames: np.ndarray | None = field(default=None, compare=False, repr=False)


READ_THREADS = 16  # files whose footers (and frame counts) find_row_groups reads at once


def find_row_groups(
    data_uri: str,
    level: str,
    split: str,
    pattern: str = "*.parquet",
    s3: S3Config | None = None,
    lengths: bool | None = None,
) -> list[RowGroup]:
    """Row groups of the split's files under `<data>/<level>/<split>/`, after checking each file's schema.

    At frame level, unless `lengths` is False, also reads each row group's num_frames column for
    plan_epoch's length bucketing: one small column chunk per row group, never the features (on S3 one
    ranged GET per row group on top of the footer's: ~35,000 for the 3.9 M-video train split, ~54,000
    at 6.1 M videos, ~4 bytes a video before snappy), held as 2 bytes a video (12 MB at 6.1 M)."""
    lengths = level_spec(level).per_frame and lengths is not False  # video level has no num_frames
    folder = f"{data_uri.rstrip('/')}/{level}/{split}"
    store = store_for(folder, s3)
    try:
        files = store.list(folder, pattern)
    except StoreError as exc:
        raise DataError(f"cannot read split {split!r}: {exc}") from None
    # One file after another would be one round trip after another: ~54,000 of them at full size on S3.
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        per_file = pool.map(lambda info: _file_row_groups(store, info, level, lengths), files)
        groups = [group for file_groups in per_file for group in file_groups]
    if sum(g.rows for g in groups) == 0:
        raise DataError(f"no videos in {folder} (pattern {pattern!r}): the split is empty")
    return groups


def _file_row_groups(store, info, level: str, lengths: bool) -> list[RowGroup]:
    """One file's row groups, its schema checked, with each group's frame counts when `lengths`."""
    groups = []
    with store.open_read(info.uri, fingerprint=info.fingerprint) as f:
        reader = pq.ParquetFile(f)
        metadata = reader.metadata
        schema = metadata.schema.to_arrow_schema()
        expected = SCHEMAS[level]
        versions = (expected, SEGMENT_FRAME_SCHEMA.remove_metadata()) if level == FRAME.name else (expected,)
        if not any(schema.remove_metadata().equals(version) for version in versions):  # v2: segment ratings too
            raise DataError(
                f"{info.uri}: not the {level}-level layout: columns {schema.names} "
                f"({', '.join(str(t) for t in schema.types)}), expected {expected.names}"
            )
        for i in range(metadata.num_row_groups):
            frames = None
            if lengths:
                column = reader.read_row_group(i, columns=["num_frames"]).column(0).to_numpy()
                frames = np.clip(column, 0, MAX_FRAMES).astype(np.uint16)
            groups.append(RowGroup(info.uri, i, metadata.row_group(i).num_rows, info.fingerprint, frames))
    return groups


class ParquetBatches(IterableDataset):
    """Batches of one epoch, as dicts of CPU tensors: frame level `rgb`, `audio` (uint8, B x T x dim),
    `mask` (bool, B x T); video level `mean_rgb`, `mean_audio` (float32); both `labels` (uint8 multi-hot,
    B x classes) and `ids`.

    `spec` is the epoch; `plans` (a WorkerPlan per DataLoader worker, public numpy arrays; `plan_nbytes`
    sums them) and `skip` (batches each worker skips) are its plan. Streams: one
    Parquet file open at a time per worker, whatever the number of files, and the columns of the row
    groups still to be used in the current window (one row group's without bucketing)."""

    def __init__(
        self, groups: list[RowGroup], level: str, num_classes: int, spec: EpochSpec, s3: S3Config | None = None
    ):
        super().__init__()
        self.groups, self.level, self.num_classes, self.max_frames, self.s3 = (
            groups, level, num_classes, spec.max_frames, s3
        )  # fmt: skip
        plans = plan_epoch(groups, spec)
        skip, after = _round_robin([len(p) for p in plans], spec.skip_batches)
        # A new DataLoader starts its round robin at worker 0: rotate the plans so that worker 0 serves
        # the one that was next, and a resumed epoch yields the very batches the uninterrupted one would.
        self.plans, self.skip = plans[after:] + plans[:after], skip[after:] + skip[:after]
        self.skip_total = sum(skip)
        self._file: tuple[str, object, pq.ParquetFile] | None = None  # (uri, stream, reader): the one open file
        self._cached: dict[int, dict] = {}  # row group -> its columns, while the window still uses it
        self._ahead: list[np.ndarray] = []  # row groups the plans' current windows use after this batch

    def __len__(self) -> int:
        return sum(len(p) - s for p, s in zip(self.plans, self.skip))

    def __getstate__(self) -> dict:  # to spawned workers: no open file, no cached columns
        return {**self.__dict__, "_file": None, "_cached": {}}

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        plans = self.plans if info is None else [self.plans[worker]]
        skips = self.skip if info is None else [self.skip[worker]]
        try:
            if info is None and len(plans) > 1:  # no worker processes: serve the workers' plans in DataLoader's order
                yield from self._interleave(plans, skips)
                return
            for i in range(skips[0], len(plans[0])):
                yield self._batch(plans[0], i)
        except (StoreError, DataError) as exc:
            if info is None:
                raise
            # In a worker process: hand the error itself to the main process (see WorkerFailure).
            yield WorkerFailure(exc)
        finally:  # end of the epoch (or the iterator dropped): nothing stays open or held
            self._close()
            self._cached = {}

    def _interleave(self, plans: list[WorkerPlan], skips: list[int]):
        next_batch = list(skips)
        active = [w for w in range(len(plans)) if next_batch[w] < len(plans[w])]
        while active:
            for w in list(active):
                # The other workers' windows are still under way: keep their groups too.
                others = [plans[v].window_rest(next_batch[v], after=False) for v in active if v != w]
                yield self._batch(plans[w], next_batch[w], others)
                next_batch[w] += 1
                if next_batch[w] >= len(plans[w]):
                    active.remove(w)

    def _batch(self, plan: WorkerPlan, i: int, others: list[np.ndarray] = ()) -> dict:
        self._ahead = [plan.window_rest(i), *others]
        return self._load(*plan.batch(i))

    def _parquet(self, uri: str, fingerprint: str | None = None) -> pq.ParquetFile:
        """The file's reader; opening it closes the one open before. One open file is enough: a worker's
        reader reads a row group whole, once (once a window with bucketing: see _columns), and the next
        is in the same file only when it follows in file order (shuffle=False, e.g. inference over a
        night's files), where the file is still the open one. A shuffled plan jumps between random files,
        where a cache of a few would hit about never and opening costs one footer read per 32 MiB row
        group. So open files stay one per worker, not one per file of the split."""
        if self._file is not None and self._file[0] == uri:
            return self._file[2]
        self._close()
        stream = store_for(uri, self.s3).open_read(uri, fingerprint=fingerprint)
        try:
            reader = pq.ParquetFile(stream)
        except BaseException:
            stream.close()
            raise
        self._file = (uri, stream, reader)
        return reader

    def _close(self) -> None:
        if self._file is not None:
            _, stream, reader = self._file
            self._file = None
            reader.close()
            stream.close()

    def _columns(self, group_index: int, upcoming: np.ndarray) -> dict:
        """The row group's columns as numpy, cached while the rest of the batch (`upcoming`, this run
        included) or of its window uses them: one group at a time without bucketing, as the plan keeps a
        group's rows together; a window's groups with it, each read once a window."""
        if group_index in self._cached:
            return self._cached[group_index]
        # Groups done with can go before this one is read.
        keep = [upcoming, *self._ahead]
        self._cached = {g: c for g, c in self._cached.items() if any((used == g).any() for used in keep)}
        group = self.groups[group_index]
        table = self._parquet(group.uri, group.fingerprint).read_row_group(group.index)
        columns = {"id": table.column("id").to_pylist(), "labels": table.column("labels").to_pylist()}
        level = level_spec(self.level)
        for name, dim in level.features:
            array = table.column(name).combine_chunks()
            if level.per_frame:  # binary: each video's frames end to end, as (offsets, bytes)
                offsets = np.frombuffer(array.buffers()[1], np.int32)[array.offset : array.offset + len(array) + 1]
                columns[name] = (offsets, np.frombuffer(array.buffers()[2], np.uint8))
            else:
                columns[name] = array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), dim)
        self._cached[group_index] = columns
        return columns

    def _load(self, group: np.ndarray, row: np.ndarray) -> dict:
        """The batch's videos, in runs of the same row group (long runs without bucketing, as the plan
        keeps a group's rows together). A frame-level batch first copies its videos' frames out of each
        group, then pads them to the longest, so that a group's columns can go once the batch and its
        window are done with them: no group is read twice for one batch (a batch of 1024 spans several
        32 MiB row groups) nor, with bucketing, for one window."""
        size = len(group)
        labels = np.zeros((size, self.num_classes), np.uint8)
        ids = []
        features = _PaddedFrames(size, self.max_frames) if level_spec(self.level).per_frame else _MeanFeatures(size)
        cuts = [0, *(np.flatnonzero(group[1:] != group[:-1]) + 1).tolist(), size]
        for start, stop in zip(cuts[:-1], cuts[1:]):
            columns = self._columns(int(group[start]), group[start:])
            for i, r in enumerate(row[start:stop].tolist(), start):
                ids.append(columns["id"][r])
                labels[i, columns["labels"][r]] = 1
                features.take(i, columns, r)
        return {**features.tensors(), "labels": torch.from_numpy(labels), "ids": ids}


class _PaddedFrames:
    """A frame-level batch's features: `rgb`, `audio` (uint8, B x T x dim) and `mask` (bool, B x T), T
    the batch's longest video after the cap at max_frames. Each video's frames are copied out of its row
    group when taken, so the group's columns can go before the batch is complete."""

    def __init__(self, size: int, max_frames: int):
        self.size, self.max_frames = size, max_frames
        self.frames: list[tuple[np.ndarray, np.ndarray]] = []  # (rgb, audio) of each video, in batch order

    def take(self, i: int, columns: dict, r: int) -> None:
        offsets, values = columns["rgb"]
        n = min(self.max_frames, (offsets[r + 1] - offsets[r]) // RGB_DIM)
        audio_offsets, audio_values = columns["audio"]
        self.frames.append(
            (
                values[offsets[r] : offsets[r] + n * RGB_DIM].reshape(n, RGB_DIM).copy(),
                audio_values[audio_offsets[r] : audio_offsets[r] + n * AUDIO_DIM].reshape(n, AUDIO_DIM).copy(),
            )
        )

    def tensors(self) -> dict:
        length = max(1, max(len(video_rgb) for video_rgb, _ in self.frames))
        rgb = np.zeros((self.size, length, RGB_DIM), np.uint8)
        audio = np.zeros((self.size, length, AUDIO_DIM), np.uint8)
        mask = np.zeros((self.size, length), bool)
        for i, (video_rgb, video_audio) in enumerate(self.frames):
            n = len(video_rgb)
            rgb[i, :n], audio[i, :n], mask[i, :n] = video_rgb, video_audio, True
        return {"rgb": torch.from_numpy(rgb), "audio": torch.from_numpy(audio), "mask": torch.from_numpy(mask)}


class _MeanFeatures:
    """A video-level batch's features: `mean_rgb` and `mean_audio` (float32, B x dim)."""

    def __init__(self, size: int):
        self.mean_rgb = np.empty((size, RGB_DIM), np.float32)
        self.mean_audio = np.empty((size, AUDIO_DIM), np.float32)

    def take(self, i: int, columns: dict, r: int) -> None:
        self.mean_rgb[i] = columns["mean_rgb"][r]
        self.mean_audio[i] = columns["mean_audio"][r]

    def tensors(self) -> dict:
        return {"mean_rgb": torch.from_numpy(self.mean_rgb), "mean_audio": torch.from_numpy(self.mean_audio)}


class WorkerFailure:
    """A StoreError or DataError raised in a DataLoader worker, sent to the main process as a batch.
    Raised in the worker, DataLoader would re-raise it as "Caught ObjectChangedError in DataLoader worker
    process 0." with the traceback as text (or as a RuntimeError, for an exception whose constructor
    takes other arguments than one message), losing the one line that names the file."""

    def __init__(self, error: Exception):
        self.error = error

    def __reduce__(self):
        # Exceptions pickle as cls(*args), which fails for ObjectChangedError(uri, expected, found).
        return _rebuild_failure, (type(self.error), self.error.args, self.error.__dict__)


def _rebuild_failure(cls: type, args: tuple, attributes: dict) -> WorkerFailure:
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(attributes)
    return WorkerFailure(error)
