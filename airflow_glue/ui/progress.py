"""A night's progress as its page shows it, from the run's and its parts' committed counters: parts done of
total, videos and rows so far, the rate since it started, the estimated finish and the deadline.

The parts' counters move with every chunk a part commits (storage/database/prediction_writes.py), the run's
own only when the night publishes, so while a night runs its figures are the parts' sums."""

from datetime import UTC, datetime, timedelta

AIRFLOW_DAG = "yt8m_nightly_inference"


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)  # SQLite keeps no offset: stored in UTC


def night_progress(run: dict, deadline: timedelta | None, now: datetime | None = None) -> dict:
    """`run` as storage.database.views.night returns it (its parts included); `deadline`: how long after
    it started the night must have finished (tasks.settings.night_deadline), None for none."""
    now = now or datetime.now(UTC)
    parts = run["parts"]
    started, finished = _utc(run["started_at"]), _utc(run["finished_at"])
    running = run["status"] == "running"
    if running:
        videos = sum(p["videos_done"] for p in parts)
        rows = sum(p["rows_written"] for p in parts)
        total = max(run["videos_total"], sum(p["videos_total"] for p in parts))
    else:
        videos, rows, total = run["videos_done"], run["rows_written"], run["videos_total"]
    elapsed = ((finished or now) - started).total_seconds() if started else 0.0
    rate = videos / elapsed if elapsed > 0 else 0.0
    eta = None
    if running and rate > 0:
        eta = now + timedelta(seconds=max(0, total - videos) / rate)
    due = started + deadline if started and deadline else None
    return {
        "status": run["status"],
        "parts_done": sum(p["status"] == "succeeded" for p in parts),
        "parts_total": len(parts),
        "parts_failed": sum(p["status"] == "failed" for p in parts),
        "videos_done": videos,
        "videos_total": total,
        "rows_written": rows,
        "fraction": videos / total if total else (1.0 if not running else 0.0),
        "elapsed_s": elapsed,
        "videos_per_s": rate,
        "eta": eta,
        "deadline": due,
        "late": bool(due and (eta or finished or now) > due),
        "parts": [
            {k: p[k] for k in ("part", "status", "videos_done", "videos_total", "rows_written", "attempts")}
            for p in parts
        ],
    }


def airflow_run_path(run: dict) -> str | None:
    """The Airflow UI's page of the DAG run that scored this night; None for a night `vtag infer` ran."""
    from urllib.parse import quote

    if not run.get("airflow_run_id"):
        return None
    return f"/dags/{AIRFLOW_DAG}/runs/{quote(run['airflow_run_id'], safe='')}"
