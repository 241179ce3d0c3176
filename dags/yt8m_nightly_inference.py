"""The yt8m_nightly_inference DAG: wiring only. Its documentation (shown in the Airflow UI) is the DAG
function's docstring."""

from datetime import timedelta

import pendulum
import yt8m_params as form
from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference, Param, dag, task

from storage.formats.yt8m_spec import (  # constants only: cheap to parse
    NUM_CLASSES,
    SEGMENT_CLASSES,
    SEGMENT_METHODS,
    TOP_K,
)
from tasks.settings import night_deadline, schedule, start_date  # no heavy imports: os, re, datetime

MAX_SEGMENTS = len(SEGMENT_CLASSES)


def _deadline() -> list[DeadlineAlert]:
    """$VTAG_NIGHT_DEADLINE after the run was queued (scheduled, backfilled and manual runs alike);
    empty: none. The callback runs in the triggerer, which imports it by its dotted path."""
    interval = night_deadline()
    if interval is None:
        return []
    return [
        DeadlineAlert(
            reference=DeadlineReference.DAGRUN_QUEUED_AT,
            interval=interval,
            callback=AsyncCallback("airflow_glue.alerts.night_deadline_missed"),
            name="night not finished",
        )
    ]


@dag(
    dag_id="yt8m_nightly_inference",
    schedule=schedule("VTAG_NIGHTLY_CRON", "0 2 * * *"),  # empty: manual and backfill runs only
    start_date=start_date("VTAG_NIGHTLY_START", "2026-11-01T00:00:00Z"),
    catchup=True,
    max_active_runs=1,  # nights in order: a night started beside another would score that one's videos again
    tags=["yt8m"],
    deadline=_deadline() or None,
    params={
        "top_k": Param(TOP_K, type="integer", minimum=1, maximum=NUM_CLASSES, title="Labels kept per video (k)"),
        "level": form.level("Level of the production model"),
        "model_version": form.optional("integer", "Model version override", "Empty: the production model.", minimum=1),
        "video_ids": Param(
            [],
            type="array",
            items={"type": "string", "pattern": "^[A-Za-z0-9_-]{1,32}$"},
            title="Videos to (re)score",
            description="Empty: everything not scored yet.",
        ),
        "shard_pattern": form.optional(
            "string", "Parquet file pattern", "Only videos from matching files, e.g. train00*.parquet. Empty: all."
        ),
        "part_videos": Param(
            250_000,
            type="integer",
            minimum=1,
            title="Videos per part",
            description="A night is scored in parts of about this many videos, one GPU task each.",
        ),
        "segments": Param(
            0,
            type="integer",
            minimum=0,
            maximum=MAX_SEGMENTS,
            title="Segments kept per video",
            description="Each video's best 5-second segments over the 1,000 segment-rated classes, with the "
            "second each starts at (frame-level models). 0: none.",
        ),
        "segment_method": Param(
            "attention",
            type="string",
            enum=list(SEGMENT_METHODS),
            title="How segments are scored",
            description="attention: the AttentionLSTM's attention over the video places its scores (one pass); "
            "model: the model run over each segment's 5 frames alone.",
        ),
        "keep_prediction_versions": form.optional(
            "integer",
            "Keep predictions of N versions",
            "After a good night, drop the predictions of all but the newest N "
            "model versions (production always stays). Empty: keep all.",
            minimum=1,
        ),
        "dry_run": form.flag("Dry run", "Count what would be scored; write nothing."),
        "lock_timeout_s": form.optional(
            "integer",
            "Wait for another run (s)",
            "How long planning and each part wait for an earlier try of the same night "
            "that still holds its lock, then fail naming it. Empty: $VTAG_LOCK_TIMEOUT_S or 600.",
            minimum=0,
        ),
    },
)
def yt8m_nightly_inference():
    """Nightly: tag the videos that arrived with the production model's top-k labels, in the database.
    The work lives in `tasks/inference.py`.

    **When**: `$VTAG_NIGHTLY_CRON` (default 02:00 UTC, after ingest; empty: manual and backfill runs
    only) from `$VTAG_NIGHTLY_START`, with catchup: missed nights run in order, one at a time. Each run
    scores what was ingested up to its logical date and the model has not scored yet, so a night costs
    what arrived. Skipped while there is no production model.

    **Params**: `top_k` (labels kept per video), `level` (of the production model), `model_version`
    (empty: production), `video_ids` (only these, scored again; empty: everything not scored yet),
    `shard_pattern` (only videos from matching Parquet files), `part_videos` (about this many videos
    per part, one GPU task each), `segments` and `segment_method` (each video's best 5-second segments,
    kept in `segment_predictions`, and the starter's `segments.csv`), `keep_prediction_versions` (after a good night, drop the predictions
    of all but the newest N versions; production always stays), `dry_run` (count what would be
    scored, write nothing), `lock_timeout_s` (how long to wait for an earlier try of the same night
    that still holds its lock).

    **Reads** the catalogue (`videos`, in the `yt8m_db` database), the Parquet files it points at, and
    the model version's checkpoint (its sha256 verified). **Writes** the
    run (`inference_runs`), one row per video and label to `predictions` (partitioned per model
    version; the view `production_labels` and the queries in `sql/queries/` read them), and the exports (Google's CSV, the
    seed's pickle) to `<yt8m_exports_uri>/<logical date>/`.

    **Tasks**: `plan_night` cuts what the night must score into parts (ranges of Parquet files);
    `tag_part` scores each part as a mapped task in the `gpu` pool, on whichever GPU worker is free;
    `finish_night` joins the parts' exports, publishes the night's rows and closes the run;
    `merge_night_layers` merges a version's later nights into its base once more than
    `$VTAG_NIGHT_LAYERS` (7) wait as layers of their own; `retire_old_predictions` applies
    `keep_prediction_versions`.

    **Rerun and backfill**: a retried part redoes only itself; rerunning a date (clear the run)
    replaces that run's rows. Backfill with
    `airflow backfill create --dag-id yt8m_nightly_inference --from-date ... --to-date ...`.
    """

    @task
    def plan_night(params: dict, logical_date=None, run_id=None) -> list[dict]:
        """One item per part to score, each with what every part needs to know of the night."""
        from airflow.sdk.exceptions import AirflowSkipException

        from airflow_glue import config as cfg
        from storage.formats.exports import night_folder
        from tasks.inference import DryRunOnly, NightRequest, NoProductionModel, open_night

        when = logical_date or pendulum.now("UTC")  # a manual run may have no logical date in Airflow 3
        request = NightRequest(
            when,
            top_k=params["top_k"],
            level=params["level"],
            model_version=params["model_version"],
            video_ids=params["video_ids"] or None,
            shard_pattern=params["shard_pattern"] or None,
            exports_uri=night_folder(cfg.exports_uri(), when),
            airflow_run_id=run_id,
            part_videos=params["part_videos"],
            segments=params.get("segments") or 0,
            segment_method=params.get("segment_method") or "attention",
        )
        try:
            plan = open_night(
                cfg.db_url(),
                request,
                dry_run=params["dry_run"],
                s3=cfg.s3_config(),
                lock_timeout_s=params.get("lock_timeout_s"),
            )
        except (DryRunOnly, NoProductionModel) as exc:  # nothing to tag (with) yet: not a failure
            raise AirflowSkipException(str(exc)) from None
        print(
            f"run {plan.run_id}, model version {plan.model_version}: {sum(p['videos'] for p in plan.parts)} videos "
            f"in {len(plan.parts)} parts"
        )
        night = {**plan.as_dict(), "parts": []}
        return [{"night": night, "part": part} for part in plan.parts]

    @task(
        pool="gpu",
        queue="gpu",
        retries=3,
        retry_delay=timedelta(minutes=2),
        retry_exponential_backoff=True,
        map_index_template="part {{ task.op_kwargs['work']['part']['part'] }}: "
        "{{ task.op_kwargs['work']['part']['videos'] }} videos",
    )
    def tag_part(work: dict, params: dict | None = None) -> dict:
        """Score one part of the night (its Parquet files) and write its rows and export fragments;
        a retry redoes only this part."""
        from airflow_glue import config as cfg
        from tasks.inference import NightPlan, tag_part

        part = work["part"]
        report = tag_part(
            cfg.db_url(),
            NightPlan.from_dict(work["night"]),
            part,
            s3=cfg.s3_config(),
            lock_timeout_s=(params or {}).get("lock_timeout_s"),
        )
        print(
            f"part {part['part']} ({part['first_uri']} .. {part['last_uri']}): {report.videos} videos, "
            f"{report.rows_written} rows"
        )
        return {"part": report.part, "videos": report.videos, "rows_written": report.rows_written}

    @task(trigger_rule="none_skipped")  # after every part, failed ones included: the run row must say so
    def finish_night(work: list[dict] | None) -> dict:
        """Join the parts' export fragments into the night's exports and close the run: succeeded, or
        failed naming the parts that failed."""
        from airflow.sdk.exceptions import AirflowFailException

        from airflow_glue import config as cfg
        from tasks.inference import NightPlan, finish_night

        if not work:
            raise AirflowFailException("plan_night failed: there is no plan to finish")

        plan = NightPlan.from_dict({**work[0]["night"], "parts": [w["part"] for w in work]})
        report = finish_night(cfg.db_url(), plan, cfg.s3_config())
        print(f"model version {report.model_version}: {report.videos} videos, {report.rows_written} rows")
        return {
            "run_id": report.run_id,
            "model_version": report.model_version,
            "videos": report.videos,
            "rows_written": report.rows_written,
            "exports": report.exports,
        }

    @task(trigger_rule="none_failed")  # also after a quiet night: the layers of earlier nights may be due
    def merge_night_layers() -> dict[str, int]:
        """Merge the later nights' layers of each model version's predictions into its base once it has
        more than `$VTAG_NIGHT_LAYERS` (7) of them; the night's rows were already served when it finished."""
        from airflow_glue import config as cfg
        from tasks.inference import merge_night_layers

        merged = merge_night_layers(cfg.db_url())
        print(f"rows merged into their version's base: {merged or 'none due'}")
        return {str(version): rows for version, rows in merged.items()}

    @task(trigger_rule="none_failed")  # also after a quiet night (no part, finish skipped)
    def retire_old_predictions(params: dict) -> list[int]:
        """Drop the predictions of all but the newest `keep_prediction_versions` model versions
        (production always stays); nothing when the param is empty or on a dry run."""
        from airflow_glue import config as cfg
        from tasks.inference import retire_old_versions

        if params["keep_prediction_versions"] is None or params["dry_run"]:
            return []
        retired = retire_old_versions(cfg.db_url(), params["keep_prediction_versions"])
        print(f"retired the predictions of model versions {retired or 'none'}")
        return retired

    work = plan_night()
    # A mapped task's doc is its doc_md argument alone (Airflow skips the docstring there): pass it on.
    parts = tag_part.override(doc_md=tag_part.function.__doc__).expand(work=work)
    parts >> finish_night(work) >> merge_night_layers() >> retire_old_predictions()


yt8m_nightly_inference()
