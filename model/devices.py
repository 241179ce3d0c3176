"""Where the model runs: the device of this process, and the process group of a distributed run."""

import os

import torch


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def distributed() -> tuple[int, int]:
    """(rank, world size) of this process, joining the process group torchrun set up (NCCL on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)
