"""The yt8m_train DAG: wiring only. Its documentation (shown in the Airflow UI) is the DAG function's docstring."""

import re
from datetime import timedelta

import pendulum
import yt8m_params as form
from airflow.sdk import Param, dag, task
from yt8m_assets import YT8M_PARQUET
from yt8m_review import PromotionReview

from model.config import presets  # reads model/presets.toml; no torch: cheap to parse


def _optional(kind: str, title: str, **limits) -> Param:
    return form.optional(kind, title, "Empty: the preset's value.", **limits)


@dag(
    dag_id="yt8m_train",
    schedule=[YT8M_PARQUET],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["yt8m"],
    params={
        "data": form.location(
            "Parquet root URI", "Empty: where the triggering ingest wrote, else the yt8m_parquet_uri variable."
        ),
        "level": form.level("Level"),
        "preset": Param(
            "",
            enum=["", *presets()],
            title="Model preset",
            description="Empty: seed on a GPU and small on a CPU for frame level, video for video level.",
        ),
        "epochs": _optional("integer", "Epochs", minimum=1),
        "batch_size": _optional("integer", "Batch size", minimum=1),
        "learning_rate": _optional("number", "Learning rate", exclusiveMinimum=0),
        "max_frames": _optional("integer", "Max frames", minimum=1, maximum=300),
        "resume_checkpoint": form.location(
            "Resume from checkpoint", "Start from this checkpoint's weights (fine-tuning)."
        ),
        "checkpoint_every": Param(
            1000,
            type="integer",
            minimum=0,
            title="Checkpoint every N steps",
            description="Besides every epoch; 0: epochs only. A crash loses at most this much.",
        ),
        "train_split": form.split("train", "Train on split"),
        "train_pattern": form.file_pattern("*.parquet", "Train file pattern"),
        "eval_split": form.split("validate", "Evaluate on split"),
        "eval_pattern": form.file_pattern("*.parquet", "Evaluation file pattern"),
        "require_approval": form.flag(
            "Require a person's approval",
            "Off: promote when the GAP is at least production's. On: a person approves or rejects.",
        ),
        "approval_timeout_hours": Param(
            72,
            type=["null", "number"],
            exclusiveMinimum=0,
            title="Approval timeout (hours)",
            description="Unanswered after this long, the model stays unpromoted. Empty: wait for an answer.",
        ),
    },
)
def yt8m_train():
    """Train a YouTube-8M model, register it, evaluate it and promote it if it is at least as good as
    production: `train -> register -> evaluate -> route -> promote`, each task one call into
    `tasks/training.py`. With `require_approval`, a person decides instead:
    `route -> prepare_review -> review -> decide` (`tasks/review.py`).

    **When**: each time `yt8m_ingest` updates the `yt8m_parquet` asset (new Parquet), or triggered by
    hand with the form. One run at a time.

    **Params**: `data` (Parquet root; empty: where the triggering ingest wrote, else the
    `yt8m_parquet_uri` variable), `level` (frame or video), `preset` (empty: seed on a GPU, small on a
    CPU, video for video level), `epochs`, `batch_size`, `learning_rate`, `max_frames` (empty: the
    preset's), `resume_checkpoint` (start from those weights: fine-tuning), `checkpoint_every` (steps;
    0: epochs only), `train_split` / `train_pattern` and `eval_split` / `eval_pattern` (which files
    train and which score), `require_approval` (a person approves or rejects the candidate instead of
    the GAP rule) and `approval_timeout_hours` (how long the review waits; empty: until answered).

    **Review**: with `require_approval`, the `review` task waits in Airflow's **Required actions**
    (its task page, or Browse > Required Actions) showing the candidate's GAP, Hit@1, PERR and mAP
    next to production's on the same evaluation set, with links to the Video tags Models page.
    **Approve** makes it production (the former one archived) even with a lower GAP; **Reject** marks
    it `rejected`; no answer in time leaves it `trained`, unpromoted (`model_reviews` records each).
    While a review waits, the next run (a new ingest) queues behind it.

    **Reads** `<data>/<level>/<train_split>/` and `<data>/<level>/<eval_split>/`. **Writes** checkpoints,
    the loss plot and the evaluation plot to `<yt8m_models_uri>/<run id>/` (`last.pt`, `epoch-NNN.pt`,
    `final-stepNNNNNNN.pt`, the one registered); rows in `model_versions` (status `trained`, then
    `production`, the former production `archived`, or `rejected`), `evaluations` and `model_reviews` in
    the `yt8m_db` database.

    **Rerun**: clearing `train` continues from the run folder's last checkpoint (its 2 retries do the
    same), so a crash loses at most `checkpoint_every` steps; registering the same checkpoint again is
    the same version. Clearing `evaluate` or `promote` scores or compares again. A new run trains a new
    model in its own folder: to retrain on older data, trigger with `data` (and the splits or patterns)
    set; there is no schedule to backfill.
    """

    @task(pool="gpu", queue="gpu", retries=2, retry_delay=timedelta(minutes=1))
    def train(params: dict, run_id: str, triggering_asset_events=None) -> dict:
        """Train on the GPU pool into a folder named after the DAG run; returns the final checkpoint's
        URI, sha256 and figures (epochs, steps, videos/s, final loss)."""
        from airflow_glue import config as cfg
        from storage.objectstore import join
        from tasks import training

        event_dest = None
        for events in (triggering_asset_events or {}).values():
            event_dest = (events[-1].extra or {}).get("dest") or event_dest
        data = params["data"] or event_dest or cfg.parquet_uri(None)
        out = join(cfg.models_uri(), re.sub(r"[^A-Za-z0-9._-]", "_", run_id))
        overrides = {k: params[k] for k in ("epochs", "batch_size", "learning_rate", "max_frames")}
        return training.train_model(
            data,
            out,
            params["level"],
            preset=params["preset"] or None,
            overrides=overrides,
            split=params["train_split"],
            pattern=params["train_pattern"],
            resume=params["resume_checkpoint"] or None,
            s3=cfg.s3_config(),
            checkpoint_every=params["checkpoint_every"],
            progress=False,
        )

    @task
    def register(trained: dict, run_id: str) -> dict:
        """Record the final checkpoint as a model version (status `trained`) with this DAG run's id."""
        from airflow_glue import config as cfg
        from tasks import training

        return training.register_model(cfg.db_url(), trained, run_id=run_id, s3=cfg.s3_config())

    @task
    def evaluate(registered: dict, params: dict) -> dict:
        """Score the version on `eval_split` / `eval_pattern` (its checkpoint's sha256 verified) and
        record the evaluation; the plot goes beside the checkpoint."""
        from airflow_glue import config as cfg
        from tasks import training

        return training.evaluate_model(
            registered["checkpoint_uri"],
            registered["data_uri"],
            cfg.db_url(),
            split=params["eval_split"],
            pattern=params["eval_pattern"],
            s3=cfg.s3_config(),
            version=registered["version"],
        )

    @task.branch
    def route(params: dict) -> str:
        """`promote` by the GAP rule, or, with `require_approval`, `prepare_review` for a person to decide."""
        return "prepare_review" if params["require_approval"] else "promote"

    @task
    def promote(evaluation: dict) -> dict:
        """Make the version production if its GAP is at least production's on the same evaluation set
        (production is scored on it first if it never was); otherwise it is `rejected`."""
        from airflow_glue import config as cfg
        from tasks import training

        return training.promote(cfg.db_url(), evaluation["version"], evaluation["split"], cfg.s3_config())

    @task
    def prepare_review(evaluation: dict, params: dict, run_id: str) -> dict:
        """Record a pending review: the candidate's evaluation next to production's on the same set
        (production scored there first if it never was); returns the subject and body `review` shows."""
        from airflow_glue import config as cfg
        from tasks import review

        hours = params["approval_timeout_hours"]
        return review.request_review(
            cfg.db_url(),
            evaluation["version"],
            evaluation["split"],
            run_id=run_id,
            timeout=timedelta(hours=hours) if hours else None,
            s3=cfg.s3_config(),
            pages_url=cfg.ui_url(),
        )

    answer = PromotionReview(
        task_id="review",
        subject="{{ ti.xcom_pull(task_ids='prepare_review')['subject'] }}",
        body="{{ ti.xcom_pull(task_ids='prepare_review')['body'] }}",
        doc_md="Waits for a person to **Approve** or **Reject** the candidate (Required actions), at most "
        "`approval_timeout_hours`; returns the decision and who took it.",
    )

    @task
    def decide(prepared: dict, answer: dict) -> dict:
        """Act on the answer: approved makes the version production (the former one archived), rejected
        marks it `rejected`, timed out leaves it `trained`; the review row records it."""
        from airflow_glue import config as cfg
        from tasks import review

        return review.record_answer(cfg.db_url(), prepared["review_id"], answer["decision"], answer["by"])

    evaluated = evaluate(register(train()))
    prepared = prepare_review(evaluated)
    evaluated >> route() >> [promote(evaluated), prepared]
    prepared >> answer
    decide(prepared, answer.output)


yt8m_train()
