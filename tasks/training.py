"""Train, evaluate and promote: the work of the yt8m_train DAG's tasks and of `vtag train|evaluate`."""

import logging
import os

from storage import db, registry
from storage.objectstore import S3Config, join

log = logging.getLogger(__name__)


def train_model(data_uri: str, out_uri: str, level: str, db_url: str, *, preset: str | None = None,
                overrides: dict | None = None, split: str = "train", pattern: str = "*.parquet",
                resume: str | None = None, s3: S3Config | None = None, run_id: str | None = None,
                checkpoint_every: int = 0, progress: bool = True) -> dict:
    """Train a model and register it as a new model version (status `trained`)."""
    import torch

    from model.config import load_config
    from model.train import train

    config = load_config(preset, level, overrides, cuda=torch.cuda.is_available())
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone talks to the database
        db.upgrade(db_url)
    result = train(config, data_uri, out_uri, split=split, pattern=pattern, resume=resume, s3=s3,
                   checkpoint_every=checkpoint_every, progress=progress)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return {"version": None, "checkpoint_uri": result.checkpoint_uri, "rank": torch.distributed.get_rank()}
    version = registry.register(db_url, level=config.level, preset=config.preset, checkpoint_uri=result.checkpoint_uri,
                                config=config.to_dict(), data_uri=data_uri, train_split=split, epochs=result.epochs,
                                steps=result.steps, run_id=run_id)
    final_loss = result.history["epoch_loss"][-1] if result.history.get("epoch_loss") else None
    log.info("model version %d: %s", version, result.checkpoint_uri)
    return {"version": version, "checkpoint_uri": result.checkpoint_uri, "epochs": result.epochs, "steps": result.steps,
            "videos_per_second": result.videos_per_second, "final_loss": final_loss, "level": config.level}


def evaluate_model(checkpoint_uri: str, data_uri: str, db_url: str, *, split: str = "validate",
                   pattern: str = "*.parquet", s3: S3Config | None = None) -> dict:
    """Score a checkpoint, write an `evaluations` row and a plot beside the checkpoint."""
    from model.evaluate import evaluate, plot

    db.upgrade(db_url)
    evaluation = evaluate(checkpoint_uri, data_uri, split, pattern, s3)
    version = ensure_registered(db_url, checkpoint_uri, s3)
    plot_uri = plot(evaluation, f"model version {version} on {split}",
                    join(checkpoint_uri.rsplit("/", 1)[0], f"eval-{split}.png"), s3)
    registry.record_evaluation(db_url, version, split=split, data_uri=data_uri, pattern=pattern, metrics=evaluation.metrics,
                               videos=evaluation.videos, seconds=evaluation.seconds, plot_uri=plot_uri)
    return {**evaluation.metrics, "videos": evaluation.videos, "version": version, "plot_uri": plot_uri,
            "split": split}


def ensure_registered(db_url: str, checkpoint_uri: str, s3: S3Config | None = None) -> int:
    """The checkpoint's model version; a checkpoint trained elsewhere is registered on first use."""
    from model import checkpoint

    version = registry.version_by_checkpoint(db_url, checkpoint_uri)
    if version is not None:
        return version
    state = checkpoint.load(checkpoint_uri, s3)
    config = checkpoint.config_of(state, checkpoint_uri)
    data = state.get("data", {})
    return registry.register(db_url, level=config.level, preset=config.preset, checkpoint_uri=checkpoint_uri,
                             config=config.to_dict(), data_uri=data.get("uri", ""), train_split=data.get("split", ""),
                             epochs=state.get("epoch", 0), steps=state.get("step", 0))


def promote(db_url: str, version: int, split: str = "validate", s3: S3Config | None = None) -> dict:
    """Promote if at least as good as production on the same evaluation set, scoring production on
    it first when it never was."""
    try:
        promoted, reason = registry.promote_if_better(db_url, version, split)
    except registry.NeedsEvaluation as need:
        evaluate_model(need.checkpoint_uri, need.data_uri, db_url, split=need.split, pattern=need.pattern, s3=s3)
        promoted, reason = registry.promote_if_better(db_url, version, split)
    log.info(reason)
    return {"version": version, "promoted": promoted, "reason": reason}
