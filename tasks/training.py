"""Train, register, evaluate and promote: the yt8m_train DAG's tasks, one function each, and `vtag train|evaluate`.

A model's way to production: `train_model` writes checkpoints and returns the final one's URI, sha256
and figures; `register_model` records it as a model version (status `trained`); `evaluate_model`
scores a version and records the evaluation; `promote` makes it production if it is at least as good
(tasks/review.py: or a person decides).
`train_and_register` is the first two in one, for `vtag train`.
"""

import logging
import os
import uuid

from storage.database import db, registry
from storage.objectstore import S3Config, canonical_uri, join, store_for
from tasks import settings

log = logging.getLogger(__name__)


def train_model(
    data_uri: str,
    out_uri: str,
    level: str,
    *,
    preset: str | None = None,
    overrides: dict | None = None,
    split: str = "train",
    pattern: str = "*.parquet",
    resume: str | None = None,
    s3: S3Config | None = None,
    checkpoint_every: int = 0,
    progress: bool = True,
) -> dict:
    """Train a model into `out_uri` (continuing a run already there); registers nothing.

    Returns what `register_model` records, JSON-serializable (an XCom): checkpoint_uri and
    checkpoint_sha256 (the final checkpoint; the sha256 empty on torchrun ranks other than 0), epochs,
    steps, videos_per_second, final_loss (the last epoch's mean per video, None before one ended),
    level, preset, config (Config.to_dict), data_uri, split, rank.
    """
    import torch

    from model.config import load_config
    from model.train import train

    data_uri, out_uri = canonical_uri(data_uri), canonical_uri(out_uri)
    config = load_config(preset, level, overrides, cuda=torch.cuda.is_available())
    result = train(
        config,
        data_uri,
        out_uri,
        split=split,
        pattern=pattern,
        resume=resume and canonical_uri(resume),
        s3=s3,
        checkpoint_every=checkpoint_every,
        progress=progress,
    )
    epoch_loss = result.history.get("epoch_loss")
    return {
        "checkpoint_uri": result.checkpoint_uri,
        "checkpoint_sha256": result.checkpoint_sha256,
        "epochs": result.epochs,
        "steps": result.steps,
        "videos_per_second": result.videos_per_second,
        "final_loss": epoch_loss[-1] if epoch_loss else None,
        "level": config.level,
        "preset": config.preset,
        "config": config.to_dict(),
        "data_uri": data_uri,
        "split": split,
        "rank": result.rank,
    }


def register_model(db_url: str, trained: dict, *, run_id: str | None = None, s3: S3Config | None = None) -> dict:
    """Record `trained` (train_model's result) as a model version with status `trained`, with the loss curve
    training drew for its final checkpoint; again, the same checkpoint is the same version. Returns
    `trained` with its `version`."""
    from model import checkpoint

    db.require_current(db_url)
    loss_plot = checkpoint.loss_plot_uri(trained["checkpoint_uri"])  # training drew it beside the final checkpoint
    state = checkpoint.load(trained["checkpoint_uri"], s3, sha256=trained["checkpoint_sha256"] or None)
    weights = checkpoint.publish_weights(trained["checkpoint_uri"], state, s3)
    del state  # a seed-size checkpoint's optimizer state is a gigabyte
    with db.transaction(db_url) as conn:
        version = registry.register(
            conn,
            level=trained["level"],
            preset=trained["preset"],
            checkpoint_uri=trained["checkpoint_uri"],
            config=trained["config"],
            data_uri=trained["data_uri"],
            train_split=trained["split"],
            epochs=trained["epochs"],
            steps=trained["steps"],
            run_id=run_id,
            checkpoint_sha256=trained["checkpoint_sha256"],
            loss_plot_uri=loss_plot if store_for(loss_plot, s3).exists(loss_plot) else None,
            weights=weights,
        )
    log.info("model version %d: %s", version, trained["checkpoint_uri"])
    return {**trained, "version": version}


def train_and_register(data_uri: str, out_uri: str, level: str, db_url: str, **train_options) -> dict:
    """`train_model`, then `register_model` (`vtag train`). Under torchrun, rank 0 alone talks to the
    database; the other ranks return version None."""
    if os.environ.get("RANK", "0") == "0":  # fails on an unreachable or outdated database now, not after training
        db.require_current(db_url)
    trained = train_model(data_uri, out_uri, level, **train_options)
    if trained["rank"] != 0:
        return {**trained, "version": None}
    return register_model(db_url, trained, s3=train_options.get("s3"))


def evaluate_model(
    checkpoint_uri: str | None,
    data_uri: str,
    db_url: str,
    *,
    split: str = "validate",
    pattern: str = "*.parquet",
    s3: S3Config | None = None,
    version: int | None = None,
    precision: str | None = None,
) -> dict:
    """Score a model version (`version`, or the one `checkpoint_uri` is registered as, registered now if
    it is not), write an `evaluations` row and a plot beside the checkpoint, under a name of this evaluation's
    own (`eval-v<version>-<split>-<12 hex>.png`: another version's or evaluation's never replaces it). What
    is scored is the version's own checkpoint, its sha256 verified: the evaluation belongs to exactly those
    weights; the row records the exact videos scored (set_fingerprint), what promotion compares on."""
    from model.evaluate import evaluate, plot

    data_uri = canonical_uri(data_uri)
    db.require_current(db_url)
    if version is None:
        version = ensure_registered(db_url, checkpoint_uri, s3)
    with db.transaction(db_url) as conn:
        registered = registry.get_version(conn, version)
    evaluation = evaluate(
        registered["checkpoint_uri"],
        data_uri,
        split,
        pattern,
        s3,
        sha256=registered["checkpoint_sha256"],
        precision=precision,
    )
    beside = canonical_uri(checkpoint_uri) if checkpoint_uri else registered["checkpoint_uri"]
    name = f"eval-v{version}-{split}-{uuid.uuid4().hex[:12]}.png"
    plot_uri = plot(evaluation, f"model version {version} on {split}", join(beside.rsplit("/", 1)[0], name), s3)
    with db.transaction(db_url) as conn:
        record = registry.EvaluationRecord(
            split, data_uri, pattern, evaluation.metrics, evaluation.videos, evaluation.seconds, plot_uri,
            evaluation.set_fingerprint, _class_ap(evaluation),
        )  # fmt: skip
        registry.record_evaluation(conn, version, record)
    return {
        **evaluation.metrics,
        "videos": evaluation.videos,
        "version": version,
        "plot_uri": plot_uri,
        "split": split,
        "checkpoint_uri": registered["checkpoint_uri"],
    }


def _class_ap(evaluation) -> dict[int, tuple[int, float]]:
    """label_id -> (positives, average precision) of each class with a positive among the videos scored."""
    if evaluation.class_ap is None:
        return {}
    return {
        label: (int(n), float(evaluation.class_ap[label]))
        for label, n in enumerate(evaluation.class_positives)
        if n > 0
    }


def ensure_registered(
    db_url: str, checkpoint_uri: str, s3: S3Config | None = None, registry_uri: str | None = None
) -> int:
    """The model version of the checkpoint's current content; a checkpoint trained elsewhere is
    registered on first use, with its inference artifact. A version never points at a file training
    rewrites: a checkpoint under such a name (last.pt, epoch-NNN.pt, any but a run's final one) is
    registered as its immutable copy (checkpoint.freeze) in `registry_uri` (default: the models store's
    `registered/` folder), so a later run into the same folder cannot change the version's weights.
    Nothing is written anywhere before the file has been validated as a checkpoint."""
    from model import checkpoint

    checkpoint_uri = canonical_uri(checkpoint_uri)
    if checkpoint.is_immutable(checkpoint_uri):
        with db.transaction(db_url) as conn:
            version = registry.version_by_checkpoint(conn, checkpoint_uri)
        if version is not None:  # its sha256 is checked when the version's checkpoint is loaded
            return version
    sha256, fingerprint = checkpoint.content(checkpoint_uri, s3)
    with db.transaction(db_url) as conn:
        version = registry.version_by_sha256(conn, sha256)
    if version is not None:  # these very weights are a version already (last.pt as its run's final checkpoint)
        return version
    # Checked before anything is copied or registered: a version is only ever weights that load and are finite.
    state = checkpoint.load(checkpoint_uri, s3, sha256=sha256)
    config = checkpoint.config_of(state, checkpoint_uri)
    checkpoint.model_of(state, config, checkpoint_uri)
    registry_uri = canonical_uri(registry_uri or join(settings.default_models_uri(), checkpoint.REGISTERED))
    frozen_uri = checkpoint.freeze(checkpoint_uri, sha256, fingerprint, registry_uri, s3)
    weights = checkpoint.publish_weights(frozen_uri, state, s3)
    data = state.get("data", {})
    loss_plot = None
    if state.get("history", {}).get("step_loss"):  # drawn from this checkpoint's own history, under its key
        from model.train import plot_losses

        loss_plot = checkpoint.loss_plot_uri(frozen_uri)
        if not store_for(loss_plot, s3).exists(loss_plot):
            plot_losses(state["history"], loss_plot, s3)
    with db.transaction(db_url) as conn:
        return registry.register(
            conn,
            level=config.level,
            preset=config.preset,
            checkpoint_uri=frozen_uri,
            config=config.to_dict(),
            data_uri=data.get("uri", ""),
            train_split=data.get("split", ""),
            epochs=state.get("epoch", 0),
            steps=state.get("step", 0),
            checkpoint_sha256=sha256,
            loss_plot_uri=loss_plot,
            weights=weights,
        )


def with_production_scored(db_url: str, s3: S3Config | None, decide, *args, **kwargs):
    """`decide(conn, *args, **kwargs)` in one transaction; when it needs production's evaluation on the candidate's
    set (registry.NeedsEvaluation), production is scored on that set first and `decide` runs again."""
    try:
        with db.transaction(db_url) as conn:
            return decide(conn, *args, **kwargs)
    except registry.NeedsEvaluation as need:
        evaluate_model(
            need.checkpoint_uri,
            need.data_uri,
            db_url,
            split=need.split,
            pattern=need.pattern,
            s3=s3,
            version=need.version,
        )
    with db.transaction(db_url) as conn:
        return decide(conn, *args, **kwargs)


def promote(db_url: str, version: int, split: str = "validate", s3: S3Config | None = None) -> dict:
    """Promote if at least as good as production on the same evaluation set, scoring production on
    it first when it never was."""
    db.require_current(db_url)
    promoted, reason = with_production_scored(db_url, s3, registry.promote_if_better, version, split)
    log.info(reason)
    return {"version": version, "promoted": promoted, "reason": reason}


def evaluate_segments(checkpoint_uri: str, data_uri: str, method: str = "model", top_n: int = 100_000, **where):
    """The checkpoint's segment mAP@N over the split's rated segments (model/segments.py); writes nothing.
    `where`: split, pattern, s3."""
    from model.devices import pick_device
    from model.evaluate import load_model
    from model.segments import evaluate_segments as evaluate

    device = pick_device()
    model, config = load_model(canonical_uri(checkpoint_uri), device, where.get("s3"))
    return evaluate(model, config, canonical_uri(data_uri), device, method, top_n, **where)


def evaluate_submission(submission_uri: str, data_uri: str, top_n: int = 100_000, **where):
    """A segment submission's mAP@N over the split's rated segments (model/segments.py); writes nothing."""
    from model.segments import evaluate_submission as evaluate

    return evaluate(canonical_uri(submission_uri), canonical_uri(data_uri), top_n, **where)


def finetune_segments(checkpoint_uri: str, data_uri: str, out_uri: str, db_url: str, **options) -> dict:
    """Fine-tune a frame-level checkpoint on a split's rated segments (model/segment_finetune.py) and
    register the result as a model version (`vtag finetune`). `options`: FinetuneSpec's fields, split,
    pattern, s3."""
    from model.segment_finetune import FinetuneSpec, finetune

    db.require_current(db_url)
    fields = {k: options.pop(k) for k in list(options) if k in FinetuneSpec.__dataclass_fields__}
    uris = (canonical_uri(checkpoint_uri), canonical_uri(data_uri), canonical_uri(out_uri))
    tuned = finetune(*uris, FinetuneSpec(**fields), **options)
    return register_model(db_url, tuned, s3=options.get("s3"))
