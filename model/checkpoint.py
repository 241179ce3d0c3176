"""Checkpoints in the object store: written atomically, loaded as weights-only pickles (no code runs)."""

import io

import torch

from model.config import Config, ConfigError
from storage.objectstore import S3Config, join, store_for

FORMAT = "vtag-checkpoint-1"
LAST = "last.pt"
KEEP_EPOCHS = 3  # epoch checkpoints kept besides last.pt (a seed-size one is ~1 GB with its optimizer)


class CheckpointError(ValueError):
    pass


def epoch_uri(out_uri: str, epoch: int) -> str:
    return join(out_uri, f"epoch-{epoch:03d}.pt")


def final_uri(out_uri: str, step: int) -> str:
    """The immutable checkpoint of a run's end: model versions point at it, never at last.pt."""
    return join(out_uri, f"final-step{step:07d}.pt")


def save(uri: str, state: dict, s3: S3Config | None = None) -> str:
    with store_for(uri, s3).publish(uri) as path:
        torch.save({"format": FORMAT, **state}, path)
    return uri


def load(uri: str, s3: S3Config | None = None) -> dict:
    store = store_for(uri, s3)
    if not store.exists(uri):
        raise CheckpointError(f"no checkpoint at {uri}")
    with store.open_read(uri) as f:
        data = f.read()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{uri} is not a vtag checkpoint: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{uri} is not a vtag checkpoint (format {state.get('format') if isinstance(state, dict) else None!r})")
    return state


def config_of(state: dict, uri: str) -> Config:
    try:
        return Config.from_dict(state["config"])
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{uri}: unreadable config: {exc}") from None


def check_architecture(state: dict, config: Config, uri: str) -> None:
    theirs = state.get("architecture")
    if theirs != config.architecture():
        raise CheckpointError(f"{uri} holds another architecture: {theirs} (this run: {config.architecture()})")


def latest(out_uri: str, s3: S3Config | None = None) -> str | None:
    uri = join(out_uri, LAST)
    return uri if store_for(uri, s3).exists(uri) else None


def prune(out_uri: str, newest_epoch: int, s3: S3Config | None = None) -> None:
    """Delete the epoch checkpoint that fell out of the KEEP_EPOCHS most recent."""
    if newest_epoch > KEEP_EPOCHS:
        old = epoch_uri(out_uri, newest_epoch - KEEP_EPOCHS)
        store_for(old, s3).delete(old)
