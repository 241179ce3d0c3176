"""Train, evaluate and promote a YouTube-8M model whenever ingest lands new Parquet (or on demand).

The work lives in tasks/training.py. Training runs in the `gpu` pool and queue; its checkpoints go to a
folder named after the DAG run, so a retried training task continues from its last checkpoint.
"""

import re
from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task
from yt8m_assets import YT8M_PARQUET
from yt8m_params import URI_PATTERN


def _optional(kind: str, title: str, **limits) -> Param:
    return Param(None, type=["null", kind], title=title, description="Empty: the preset's value.", **limits)


@dag(
    dag_id="yt8m_train",
    schedule=[YT8M_PARQUET],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["yt8m"],
    params={
        "data": Param(
            None,
            type=["null", "string"],
            pattern=URI_PATTERN,
            title="Parquet root URI",
            description="Empty: where the triggering ingest wrote, else the yt8m_parquet_uri variable.",
        ),
        "level": Param("frame", enum=["frame", "video"], title="Level"),
        "preset": Param(
            "",
            enum=["", "seed", "small", "video"],
            title="Model preset",
            description="Empty: seed on a GPU and small on a CPU for frame level, video for video level.",
        ),
        "epochs": _optional("integer", "Epochs", minimum=1),
        "batch_size": _optional("integer", "Batch size", minimum=1),
        "learning_rate": _optional("number", "Learning rate", exclusiveMinimum=0),
        "max_frames": _optional("integer", "Max frames", minimum=1, maximum=300),
        "resume_checkpoint": Param(
            None,
            type=["null", "string"],
            pattern=URI_PATTERN,
            title="Resume from checkpoint",
            description="Start from this checkpoint's weights (fine-tuning).",
        ),
        "checkpoint_every": Param(
            1000,
            type="integer",
            minimum=0,
            title="Checkpoint every N steps",
            description="Besides every epoch; 0: epochs only. A crash loses at most this much.",
        ),
        "train_split": Param("train", enum=["train", "validate", "test"], title="Train on split"),
        "train_pattern": Param("*.parquet", type="string", minLength=1, title="Train file pattern"),
        "eval_split": Param("validate", enum=["train", "validate", "test"], title="Evaluate on split"),
        "eval_pattern": Param("*.parquet", type="string", minLength=1, title="Evaluation file pattern"),
    },
)
def yt8m_train():
    @task(pool="gpu", queue="gpu", retries=2, retry_delay=timedelta(minutes=1))
    def train(params: dict, run_id: str, triggering_asset_events=None) -> dict:
        from storage.objectstore import join
        from tasks import airflow_config as cfg
        from tasks.training import train_model

        event_dest = None
        for events in (triggering_asset_events or {}).values():
            event_dest = (events[-1].extra or {}).get("dest") or event_dest
        data = params["data"] or event_dest or cfg.parquet_uri(None)
        out = join(cfg.models_uri(), re.sub(r"[^A-Za-z0-9._-]", "_", run_id))
        overrides = {k: params[k] for k in ("epochs", "batch_size", "learning_rate", "max_frames")}
        result = train_model(
            data,
            out,
            params["level"],
            cfg.db_url(),
            preset=params["preset"] or None,
            overrides=overrides,
            split=params["train_split"],
            pattern=params["train_pattern"],
            resume=params["resume_checkpoint"] or None,
            s3=cfg.s3_config(),
            run_id=run_id,
            checkpoint_every=params["checkpoint_every"],
            progress=False,
        )
        return {**result, "data": data}

    @task
    def evaluate(trained: dict, params: dict) -> dict:
        from tasks import airflow_config as cfg
        from tasks.training import evaluate_model

        # The version trained, by number: its checkpoint is scored with its sha256 verified.
        return evaluate_model(
            trained["checkpoint_uri"],
            trained["data"],
            cfg.db_url(),
            split=params["eval_split"],
            pattern=params["eval_pattern"],
            s3=cfg.s3_config(),
            version=trained["version"],
        )

    @task
    def register_and_promote(evaluation: dict) -> dict:
        from tasks import airflow_config as cfg
        from tasks.training import promote

        return promote(cfg.db_url(), evaluation["version"], evaluation["split"], cfg.s3_config())

    register_and_promote(evaluate(train()))


yt8m_train()
