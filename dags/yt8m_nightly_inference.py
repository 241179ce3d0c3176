"""Nightly: tag the videos that arrived with the production model's top-k labels, in the database.

The work lives in tasks/inference.py. Each run scores what was ingested up to its logical date and
the production model has not scored yet, so a night costs what arrived; rerunning a date replaces
that run's rows. The schedule is $VTAG_NIGHTLY_CRON (default 02:00 UTC), with catchup: missed
nights run in order, and `airflow backfill create --dag-id yt8m_nightly_inference ...` works.
"""

import os
from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task


@dag(
    dag_id="yt8m_nightly_inference",
    schedule=os.environ.get("VTAG_NIGHTLY_CRON", "0 2 * * *") or None,  # empty: manual and backfill runs only
    start_date=pendulum.parse(os.environ.get("VTAG_NIGHTLY_START", "2026-11-01T00:00:00Z")),
    catchup=True,
    max_active_runs=2,
    tags=["yt8m"],
    params={
        "top_k": Param(20, type="integer", minimum=1, maximum=3862, title="Labels kept per video (k)"),
        "level": Param("frame", enum=["frame", "video"], title="Level of the production model"),
        "model_version": Param(None, type=["null", "integer"], minimum=1, title="Model version override",
                               description="Empty: the production model."),
        "video_ids": Param([], type="array", items={"type": "string", "pattern": "^[A-Za-z0-9_-]{1,32}$"},
                           title="Videos to (re)score", description="Empty: everything not scored yet."),
        "shard_pattern": Param(None, type=["null", "string"], title="Parquet file pattern",
                               description="Only videos from matching files, e.g. train00*.parquet. Empty: all."),
        "dry_run": Param(False, type="boolean", title="Dry run", description="Count what would be scored; write nothing."),
    },
)
def yt8m_nightly_inference():
    @task(pool="gpu", queue="gpu", retries=3, retry_delay=timedelta(minutes=2), retry_exponential_backoff=True)
    def tag_videos(params: dict, logical_date=None, run_id=None) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from tasks import airflow_config as cfg
        from tasks.inference import NoProductionModel, run_inference

        when = logical_date or pendulum.now("UTC")  # a manual run may have no logical date in Airflow 3
        try:
            report = run_inference(cfg.db_url(), when, top_k=params["top_k"], level=params["level"],
                                   model_version=params["model_version"], video_ids=params["video_ids"] or None,
                                   shard_pattern=params["shard_pattern"] or None, dry_run=params["dry_run"],
                                   exports_uri=f"{cfg.exports_uri().rstrip('/')}/{when:%Y-%m-%dT%H%M%S}",
                                   s3=cfg.s3_config(), airflow_run_id=run_id)
        except NoProductionModel as exc:
            raise AirflowSkipException(str(exc)) from None  # nothing to tag with yet: not a failure
        print(f"model version {report.model_version}: {report.videos} videos, {report.rows_written} rows")
        return {"run_id": report.run_id, "model_version": report.model_version, "videos": report.videos,
                "rows_written": report.rows_written, "exports": report.exports}

    tag_videos()


yt8m_nightly_inference()
