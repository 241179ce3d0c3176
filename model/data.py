"""The DataLoader over an epoch's batches (model/parquet_reader.py, planned by model/epoch_plan.py), for
training and evaluation: worker processes, their errors raised as themselves, batches moved to the device.
The names callers need from the three are importable from here.
"""

import multiprocessing

import torch
from torch.utils.data import DataLoader

from model.epoch_plan import BUCKET_WINDOW, EpochSpec, WorkerPlan, padded_fraction, plan_epoch, plan_nbytes
from model.parquet_reader import DataError, ParquetBatches, RowGroup, WorkerFailure, find_row_groups
from storage.formats.yt8m_spec import FRAME, dequantize

__all__ = [
    "BUCKET_WINDOW",
    "DataError",
    "EpochSpec",
    "ParquetBatches",
    "RowGroup",
    "WorkerPlan",
    "find_row_groups",
    "loader",
    "padded_fraction",
    "plan_epoch",
    "plan_nbytes",
    "to_device",
]


class _Loader(DataLoader):
    def __iter__(self):
        for batch in super().__iter__():
            if isinstance(batch, WorkerFailure):
                raise batch.error
            yield batch


def loader(dataset: ParquetBatches, workers: int, pin_memory: bool) -> DataLoader:
    """The dataset's batches, read by `workers` processes; an error of a worker's data (a file replaced
    since the epoch was planned, an unreadable one) is raised here as itself."""
    if workers:
        _allow_worker_processes()
    # Its own generator: a DataLoader draws a seed from the global RNG when it starts, which would
    # shift the dropout masks of a resumed run away from those of an uninterrupted one.
    return _Loader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(0),
    )


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
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    for name in FRAME.feature_names:  # frame level's are quantized; video level's means are floats already
        if name in moved:
            moved[name] = dequantize(moved[name].float())
    moved["labels"] = moved["labels"].float()
    return moved
