"""Batch inference: score the videos the production model has not scored yet, keep each video's top k
labels in the database, and write the exports people know (Google's CSV, the seed's pickle).

A night is planned, then scored in parts, then finished:

- `plan_night` (tasks/night_plan.py) starts (or restarts) the night's run and cuts its pending videos
  into parts;
- `tag_part` (tasks/night_parts.py) scores one part, on whichever GPU worker runs it; a retry redoes only
  its part;
- `finish_night` joins the fragments into the night's exports, publishes the night's rows and closes the run.

The DAG runs the parts as mapped tasks (`open_night` is its first task); `run_inference` (the command line,
and the tests) runs all three in one process. What a night is asked travels as one NightRequest, how this
process does the work as NightOptions.
"""

import logging
from dataclasses import dataclass, field, fields
from datetime import datetime

from storage.database import db, partitions, prediction_writes, run_locks, runs
from storage.formats import exports, segment_exports
from storage.objectstore import S3Config
from tasks.night_parts import (
    CHUNK_VIDEOS,
    CSV_TOP,
    IncompleteNight,
    NightOptions,
    NonFiniteScores,
    PartReport,
    load_scorer,
    tag_part,
)
from tasks.night_plan import (
    MAX_K,
    MAX_PARTS,
    PART_VIDEOS,
    InferenceError,
    NightPlan,
    NightRequest,
    NoProductionModel,
    count_pending,
    cut_parts,
    fail_run,
    lock_timeout,
    plan_night,
    resolve,
)
from tasks.settings import night_layers

__all__ = [
    "CHUNK_VIDEOS",
    "CSV_TOP",
    "MAX_K",
    "MAX_PARTS",
    "PART_VIDEOS",
    "DryRunOnly",
    "IncompleteNight",
    "InferenceError",
    "InferenceReport",
    "NightOptions",
    "NightPlan",
    "NightRequest",
    "NoProductionModel",
    "NonFiniteScores",
    "PartReport",
    "count_pending",
    "cut_parts",
    "finish_night",
    "load_scorer",
    "open_night",
    "plan_night",
    "retire_old_versions",
    "run_inference",
    "tag_part",
]

log = logging.getLogger(__name__)


@dataclass
class InferenceReport:
    run_id: int | None
    model_version: int
    videos: int
    rows_written: int
    exports: list[str] = field(default_factory=list)


class DryRunOnly(Exception):
    """Not an error: a dry run's finding (what a night would score), for the DAG to show as a skip."""


def open_night(
    db_url: str,
    request: NightRequest,
    *,
    dry_run: bool = False,
    s3: S3Config | None = None,
    lock_timeout_s: float | None = None,
) -> NightPlan:
    """The nightly DAG's first task in one call: the night planned, a night with nothing to score finished
    at once (its run closed, empty exports: no part to wait for); with `dry_run`, only counted, told by
    DryRunOnly."""
    if dry_run:
        version, videos = count_pending(db_url, request, s3)
        raise DryRunOnly(f"dry run: model version {version} would score {videos} videos")
    plan = plan_night(db_url, request, s3, lock_timeout_s=lock_timeout_s)
    if not plan.parts:
        finish_night(db_url, plan, s3)
    return plan


def finish_night(db_url: str, plan: NightPlan, s3: S3Config | None = None) -> InferenceReport:
    """Close the night: if every part succeeded, join their export fragments, then publish the parts' rows
    and mark the run succeeded in one transaction; otherwise mark it failed, naming the parts, and raise.
    A night that fails here (exports unwritable, a row that would not land) publishes nothing: what the
    views served before stays served."""
    ours = sorted(p["part"] for p in plan.parts)
    with db.transaction(db_url) as conn:
        parts = [p for p in runs.parts_of(conn, plan.run_id) if p["part"] in ours]
    unfinished = [p for p in parts if p["status"] != "succeeded"]
    if unfinished:
        error = "parts not succeeded: " + ", ".join(
            f"{p['part']} ({p['status']}{': ' + p['error'] if p['error'] else ''})" for p in unfinished[:10]
        )
        fail_run(db_url, plan.run_id, error)
        raise InferenceError(f"run {plan.run_id}: {error}")
    # The parts' committed counters, whatever wrote them (a try of an older release, a part's row edited):
    short = [(p["part"], gap) for p in parts if (gap := runs.shortfall(p, plan.k))]
    if len(parts) != len(ours) or short:
        error = "incomplete: " + (
            "; ".join(f"part {n}: {gap}" for n, gap in short[:10])
            or f"{len(ours) - len(parts)} planned parts missing from inference_parts"
        )
        fail_run(db_url, plan.run_id, error)
        raise IncompleteNight(f"run {plan.run_id}: {error}")
    try:
        uris = exports.join_night(plan.exports_uri, ours, s3)
        if plan.segments:  # the starter's segment submission, class by class from the parts' fragments
            uris.append(segment_exports.join_night(plan.exports_uri, ours, s3=s3))
        with db.transaction(db_url) as conn:  # the night's rows become the version's with its success
            published = prediction_writes.publish(
                conn, plan.run_id, plan.model_version, plan.level, ours, plan.k, replace_any=bool(plan.video_ids)
            )
            # a targeted rescoring's exports hold its videos alone: the night's own stay the ones served
            run = runs.finish_run(conn, plan.run_id, exports_uri=plan.exports_uri if plan.whole else None)
            parts = [p for p in runs.parts_of(conn, plan.run_id) if p["part"] in ours]  # less what was left out
    except BaseException as exc:
        fail_run(db_url, plan.run_id, f"finishing: {type(exc).__name__}: {exc}")
        raise
    if published.filled:
        partitions.vacuum_analyze(db_url, published.filled)
    log.info(
        "run %d: %d videos, %d rows, model version %d",
        plan.run_id,
        run["videos_done"],
        run["rows_written"],
        plan.model_version,
    )
    return InferenceReport(
        plan.run_id,
        plan.model_version,
        sum(p["videos_done"] for p in parts),
        sum(p["rows_written"] for p in parts),
        uris,
    )


def run_inference(
    db_url: str, logical_date: datetime, *, dry_run: bool = False, s3: S3Config | None = None, **asked
) -> InferenceReport:
    """Score what the model has not scored up to `logical_date` (or the given videos) and store the top k:
    the whole night in this process, its parts one after another. `asked`: NightRequest's fields (what the
    night is) and NightOptions' (how this process does it), as keywords."""
    options = {f.name for f in fields(NightOptions)}
    how = NightOptions(**{k: v for k, v in asked.items() if k in options})
    request = NightRequest(logical_date, **{k: v for k, v in asked.items() if k not in options})
    if dry_run:
        return InferenceReport(None, *count_pending(db_url, request, s3), 0)
    night = resolve(db_url, request, s3)  # once: the model it loads is the one the plan names
    scorer = load_scorer(
        night.version["checkpoint_uri"], s3, night.version["checkpoint_sha256"], how.precision, night.weights
    )
    # Two runs of the same night at once (a task's retry while a lost try still runs, `vtag infer`
    # beside the DAG) would share one run: the later start would empty the earlier one's rows under it.
    # They take turns instead, the later replacing the run.
    engine = db.engine_for(db_url)
    when = night.request.logical_date
    with run_locks.run_lock(engine, when, night.number, timeout_s=lock_timeout(how.lock_timeout_s)) as lock:
        plan = plan_night(db_url, night, s3, locked=True)
        for part in plan.parts:
            try:
                tag_part(
                    db_url,
                    plan,
                    part,
                    s3=s3,
                    scorer=scorer,
                    lock=lock,
                    batch_size=how.batch_size,
                    chunk_videos=how.chunk_videos,
                    progress=how.progress,
                )
            except BaseException as exc:
                fail_run(db_url, plan.run_id, f"part {part['part']}: {type(exc).__name__}: {exc}")
                raise
        return finish_night(db_url, plan, s3)


def retire_old_versions(db_url: str, keep: int) -> list[int]:
    """Retire the predictions of every model version but the newest `keep` that have predictions;
    a production version always keeps them. Returns the versions retired."""
    if keep < 1:
        raise InferenceError(f"keep must be at least 1, not {keep}")
    db.require_current(db_url)
    with db.transaction(db_url) as conn:
        older = partitions.versions_with_predictions(conn)[keep:]
    retired = [v["version"] for v in older if v["status"] != "production"]
    for version in retired:  # one transaction each: a version retired stays retired if a later one fails
        with db.transaction(db_url) as conn:
            partitions.retire(conn, version)
    return retired


def merge_night_layers(db_url: str, at_most: int | None = None) -> dict[int, int]:
    """Merge the later nights of every version that has more than `at_most` of them as layers of their own
    (tasks.settings.night_layers: $VTAG_NIGHT_LAYERS, 7) into its base, one version a transaction; the rows
    stay served throughout. Off the night's path: the nights' rows were published when they finished.
    Returns {version: rows merged}."""
    at_most = night_layers(at_most, "at_most")
    db.require_current(db_url)
    with db.transaction(db_url) as conn:
        versions = [v["version"] for v in partitions.versions_with_predictions(conn)]
        due = [v for v in versions if len(partitions.layers(conn, v)) > at_most]
    merged = {}
    for version in due:
        with db.transaction(db_url) as conn:
            merged[version] = partitions.merge_layers(conn, version)
        partitions.vacuum_analyze(db_url, partitions.base_name(version))
    return merged
