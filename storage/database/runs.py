"""The bookkeeping of inference runs: a night's row in inference_runs and its parts' rows in
inference_parts, whose counters say whether the night's rows all landed.

A night is started (`start_run`), planned (`record_parts`), scored part by part (`start_part`, then
chunks counted by `storage.database.prediction_writes.write_chunk` under `this_try`, then `finish_part`) and
closed (`finish_run`); a run's totals are always the sums of its parts' (`refresh_run_totals`), and a
part or night succeeds only when its counters add up (`shortfall`).
"""

from datetime import datetime

from sqlalchemy import Connection, and_, delete, func, insert, select, update

from storage.database import label_counts
from storage.database.db import utcnow
from storage.database.partitions import drop_run_tables
from storage.database.run_locks import LostRunLock
from storage.database.schema import inference_label_counts, inference_parts, inference_runs, model_versions
from storage.errors import VtagError


class RowsLost(VtagError, ValueError):
    """Rows a run scored did not all land, or landed beside another run's: the chunk, part or night fails
    (a ValueError: the command line prints it as its one line)."""


class SupersededTry(LostRunLock):
    """A newer try of this part started (this one was presumed dead): its writes must not land."""


def start_run(
    conn: Connection,
    logical_date: datetime,
    model_version: int,
    top_k: int,
    airflow_run_id: str | None,
    clear: bool = True,
) -> int:
    """The run of (logical date, model version), its earlier parts, counts and unpublished rows forgotten
    unless `clear` is False. Call it holding the night's run_lock.

    Nothing served changes here: the rows an earlier try of the night published stay visible until this
    one publishes its own in their place (`storage.database.prediction_writes.publish`), so a rerun that
    fails leaves the night's served rows as they were."""
    run = conn.execute(
        select(inference_runs.c.run_id)
        .where(inference_runs.c.logical_date == logical_date, inference_runs.c.model_version == model_version)
        .with_for_update()
    ).first()
    values = {
        "top_k": top_k,
        "status": "running",
        "videos_total": 0,
        "videos_done": 0,
        "rows_written": 0,
        "error": None,
        "airflow_run_id": airflow_run_id,
        "started_at": utcnow(),
        "finished_at": None,
        "load_table": None,  # releases before part tables loaded a first night here
    }
    conn.execute(
        update(model_versions)
        .where(model_versions.c.version == model_version, model_versions.c.predictions_retired_at.is_not(None))
        .values(predictions_retired_at=None)
    )  # scoring again after a retirement
    if run is None:
        return conn.execute(
            insert(inference_runs)
            .values(logical_date=logical_date, model_version=model_version, **values)
            .returning(inference_runs.c.run_id)
        ).scalar_one()
    run_id = run.run_id
    if clear:
        drop_run_tables(conn, model_version, run_id)
        conn.execute(delete(inference_label_counts).where(inference_label_counts.c.run_id == run_id))
        conn.execute(delete(inference_parts).where(inference_parts.c.run_id == run_id))
    kept = () if clear else ("videos_total", "videos_done", "rows_written", "load_table")
    conn.execute(
        update(inference_runs)
        .where(inference_runs.c.run_id == run_id)
        .values(**{k: v for k, v in values.items() if k not in kept})
    )
    return run_id


def record_parts(conn: Connection, run_id: int, parts: list[dict]) -> list[dict]:
    """The night's plan: one row per part (a range of Parquet files). A targeted rescoring adds its
    parts after those of the night's earlier plan; returns the parts with their numbers."""
    first = conn.execute(
        select(func.coalesce(func.max(inference_parts.c.part) + 1, 0)).where(inference_parts.c.run_id == run_id)
    ).scalar()
    numbered = [{**p, "part": first + i} for i, p in enumerate(parts)]
    rows = [
        {
            "run_id": run_id,
            "part": p["part"],
            "first_uri": p["first_uri"],
            "last_uri": p["last_uri"],
            "files": p["files"],
            "status": "planned",
            "videos_total": p["videos"],
            "videos_done": 0,
            "rows_written": 0,
            "attempts": 0,
        }
        for p in numbered
    ]
    for start in range(0, len(rows), 5000):
        conn.execute(insert(inference_parts), rows[start : start + 5000])
    refresh_run_totals(conn, run_id)
    return numbered


def start_part(conn: Connection, run_id: int, part: int) -> dict:
    """Mark a part running, its counters and label counts reset: a retry counts its videos afresh.
    Returns the part's row as it was (its `attempts` says whether an earlier try may have written)."""
    row = conn.execute(
        select(inference_parts)
        .where(inference_parts.c.run_id == run_id, inference_parts.c.part == part)
        .with_for_update()
    ).first()
    if row is None:
        raise LookupError(f"run {run_id} has no part {part}: was the night planned again since?")
    conn.execute(
        delete(inference_label_counts).where(
            inference_label_counts.c.run_id == run_id, inference_label_counts.c.part == part
        )
    )
    conn.execute(
        update(inference_parts)
        .where(inference_parts.c.run_id == run_id, inference_parts.c.part == part)
        .values(
            status="running",
            videos_done=0,
            rows_written=0,
            error=None,
            attempts=inference_parts.c.attempts + 1,
            started_at=utcnow(),
            finished_at=None,
        )
    )
    # A part run again after its night had finished (cleared in the UI) reopens the night.
    conn.execute(
        update(inference_runs)
        .where(inference_runs.c.run_id == run_id, inference_runs.c.status != "running")
        .values(status="running", error=None, finished_at=None)
    )
    return {**row._asdict(), "attempt": row.attempts + 1}


def set_part_total(conn: Connection, run_id: int, part: int, total: int) -> None:
    conn.execute(
        update(inference_parts)
        .where(inference_parts.c.run_id == run_id, inference_parts.c.part == part)
        .values(videos_total=total)
    )


def shortfall(part: dict, rows_per_video: int) -> str | None:
    """What a part's counters say is missing (its videos not all written, or not k rows each), or None."""
    total, done, rows = part["videos_total"], part["videos_done"], part["rows_written"]
    if done != total:
        return f"{done} of its {total} videos written"
    if rows != done * rows_per_video:
        return f"{rows} rows written for {done} videos x {rows_per_video} = {done * rows_per_video}"
    return None


def this_try(run_id: int, part: int, attempt: int):
    return and_(
        inference_parts.c.run_id == run_id, inference_parts.c.part == part, inference_parts.c.attempts == attempt
    )


def finish_part(
    conn: Connection,
    run_id: int,
    part: int,
    counts: label_counts.LabelCounts | None = None,
    error: str | None = None,
    attempt: int | None = None,
    rows_per_video: int | None = None,
) -> "RowsLost | None":
    """A part's outcome; a succeeded part stores its label counts (how many videos got each label at each
    rank, how many of them were judged and true), in the transaction that marks it done. The run's totals follow its parts.
    With `attempt`, only if that try is still the part's latest (a superseded try changes nothing).
    With `rows_per_video`, success is checked against the part's committed counters (every video
    written, k rows each): a shortfall marks it failed and returns the RowsLost to raise once that is
    committed (raised in the caller's transaction, it would roll the mark back)."""
    current = conn.execute(
        select(inference_parts)
        .where(inference_parts.c.run_id == run_id, inference_parts.c.part == part)
        .with_for_update()
    ).first()
    if attempt is not None and (current is None or current.attempts != attempt):
        if error is None:
            raise SupersededTry(f"run {run_id} part {part}: try {attempt} was superseded by a newer try")
        return None
    missing = (
        None if error or rows_per_video is None or current is None else shortfall(current._asdict(), rows_per_video)
    )
    if missing:
        error = f"incomplete: {missing}"
    elif error is None and counts is not None:
        label_counts.store(conn, counts, run_id, part)
    conn.execute(
        update(inference_parts)
        .where(inference_parts.c.run_id == run_id, inference_parts.c.part == part)
        .values(status="failed" if error else "succeeded", error=error, finished_at=utcnow())
    )
    refresh_run_totals(conn, run_id)
    return RowsLost(f"run {run_id} part {part}: {error}") if missing else None


def refresh_run_totals(conn, run_id: int) -> None:
    of_run = inference_parts.c.run_id == run_id
    conn.execute(
        update(inference_runs)
        .where(inference_runs.c.run_id == run_id)
        .values(
            **{
                column: select(func.coalesce(func.sum(inference_parts.c[column]), 0)).where(of_run).scalar_subquery()
                for column in ("videos_total", "videos_done", "rows_written")
            }
        )
    )


def parts_of(conn: Connection, run_id: int) -> list[dict]:
    query = select(inference_parts).where(inference_parts.c.run_id == run_id).order_by(inference_parts.c.part)
    return [row._asdict() for row in conn.execute(query)]


def finish_run(conn: Connection, run_id: int, error: str | None = None, exports_uri: str | None = None) -> dict:
    """The night's outcome; its videos and rows are the sums of its parts'. `exports_uri`: the folder this
    run's exports were just written to, which its pages serve from then on."""
    refresh_run_totals(conn, run_id)
    exports = {"exports_uri": exports_uri} if exports_uri else {}
    conn.execute(
        update(inference_runs)
        .where(inference_runs.c.run_id == run_id)
        .values(status="failed" if error else "succeeded", error=error, finished_at=utcnow(), **exports)
    )
    return conn.execute(select(inference_runs).where(inference_runs.c.run_id == run_id)).first()._asdict()
