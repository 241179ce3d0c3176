"""Inference runs and their predictions: the bulk write path and the run bookkeeping.

Rows go in chunks, each chunk and the run's progress in one transaction, so a run is all-or-nothing
per chunk. PostgreSQL takes them with COPY (through a staging table when two runs scored the same
video at once, so they never collide); SQLite with executemany. Every chunk counts the rows the
database took: each video gets its k rows, or is left whole to the run that wrote it first, or the
chunk fails (`check_chunk`), and a part or night succeeds only when its counters add up (`shortfall`).
"""

import hashlib
import io
import logging
import os
import re
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
from sqlalchemy import and_, delete, exists, func, insert, select, update
from sqlalchemy import column as sa_column
from sqlalchemy import table as sa_table

from storage.db import engine_for, utcnow
from storage.schema import inference_label_counts, inference_parts, inference_runs, model_versions, predictions, videos

COLUMNS = ("video_id", "model_version", "rank", "label_id", "score", "run_id")

log = logging.getLogger(__name__)


PARTITION_LOCK = 0x76746167  # "vtag": serializes the creation of partitions (transaction-level)


def _lock_key(logical_date: datetime, model_version: int, part: int | None = None) -> int:
    """A signed 64-bit advisory-lock key for (model version, logical date[, part]). Alembic's lock
    (env.py) and PARTITION_LOCK are small constants: a clash costs at most a wait, never a wrong result."""
    suffix = "" if part is None else f":part{part}"
    digest = hashlib.blake2b(
        f"vtag-inference-run:{model_version}:{logical_date.isoformat()}{suffix}".encode(), digest_size=8
    )
    return int.from_bytes(digest.digest(), "big", signed=True)


class LostRunLock(RuntimeError):
    """The connection holding a run's lock went away while the run wrote: another run may have taken over."""


@dataclass(frozen=True)
class RunLockHolder:
    """Which PostgreSQL session holds which advisory lock: each chunk checks it still does."""

    pid: int
    key: int

    def check(self, conn) -> None:
        held = conn.exec_driver_sql(
            "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = %s AND objsubid = 1"
            " AND ((classid::bigint << 32) | objid::bigint) = %s",  # the 64-bit key, split in two oids
            (self.pid, self.key),
        ).first()
        if held is None:
            raise LostRunLock(
                f"the connection holding this run's lock (backend {self.pid}) is gone: stopping, "
                "so that a run which may have taken over is not written under"
            )


class RunLockTimeout(ValueError):
    """Another run held the night's lock longer than the caller would wait (a ValueError: the command
    line prints it as its one line)."""


LOCK_POLL_S = 0.5  # how often a waiting run tries the lock again: a polled wait can give up, a blocked one cannot


def _night_label(logical_date: datetime, model_version: int, part: int | None) -> str:
    return f"night {logical_date.isoformat()} of model version {model_version}" + (
        "" if part is None else f" (part {part})"
    )


def _timed_out(what: str, waited_s: float, holder: str) -> RunLockTimeout:
    return RunLockTimeout(
        f"{what} is locked by another run (waited {waited_s:g} s): {holder}; if that run is hung, "
        "end it, then retry (a longer wait: VTAG_LOCK_TIMEOUT_S or the lock_timeout_s parameter)"
    )


def _poll(try_once, timeout_s: float, warn) -> bool:
    """Call `try_once` until it returns True or `timeout_s` has passed; `warn` once when the first try fails."""
    deadline = time.monotonic() + timeout_s
    if try_once():
        return True
    warn()
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(LOCK_POLL_S, left))
        if try_once():
            return True
    return False


def _pg_holders(conn, key: int) -> str:
    held = conn.exec_driver_sql(
        "SELECT l.pid, a.application_name, a.backend_start FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
        " AND ((l.classid::bigint << 32) | l.objid::bigint) = %s ORDER BY l.pid LIMIT 3",
        (key,),
    ).all()
    conn.commit()
    if not held:
        return "its holder has just let go"
    return (
        "held by "
        + ", ".join(
            f"PostgreSQL backend {pid}"
            + (f" ({app})" if app else "")
            + (f" connected since {since:%Y-%m-%d %H:%M:%S %Z}" if since else "")
            for pid, app, since in held
        )
        + " (pg_terminate_backend(pid) ends one)"
    )


@contextmanager
def _pg_run_lock(engine, what: str, keys: list[tuple[str, int]], timeout_s: float):
    conn = engine.connect()
    taken: list[tuple[str, int]] = []
    started = time.monotonic()
    try:
        for mode, key in keys:

            def try_once(mode=mode, key=key) -> bool:
                got = conn.exec_driver_sql(f"SELECT pg_try_advisory_lock{mode}(%s)", (key,)).scalar()
                conn.commit()  # no transaction (and no snapshot) stays open while this waits
                return bool(got)

            if not _poll(
                try_once,
                max(0.0, timeout_s - (time.monotonic() - started)),
                lambda: log.warning(
                    "another run of %s is in progress: waiting for it to finish (at most %g s)", what, timeout_s
                ),
            ):
                raise _timed_out(what, timeout_s, _pg_holders(conn, key))
            taken.append((mode, key))
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        conn.commit()  # the session locks outlive the transaction; no transaction stays open
        yield RunLockHolder(pid, keys[-1][1])
    finally:
        try:
            for mode, key in reversed(taken):
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock{mode}(%s)", (key,))
            conn.commit()
        except Exception:  # the connection broke (server restarted): the locks went with it
            conn.invalidate()
        conn.close()


@contextmanager
def _file_run_lock(path: Path, what: str, timeout_s: float):
    import fcntl

    with open(path, "a+") as lock_file:

        def try_once() -> bool:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False

        if not _poll(
            try_once,
            timeout_s,
            lambda: log.warning(
                "another inference run on %s is in progress: waiting for it to finish (at most %g s)", path, timeout_s
            ),
        ):
            lock_file.seek(0)
            holder = lock_file.read().strip()
            raise _timed_out(
                what, timeout_s, f"held by process {holder} (lock file {path})" if holder else f"lock file {path}"
            )
        try:
            lock_file.seek(0)
            lock_file.truncate()
            lock_file.write(f"{os.getpid()} on {socket.gethostname()}\n")  # whom a waiting run names
            lock_file.flush()
            yield None  # a file lock cannot be lost while this process lives
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


@contextmanager
def run_lock(db_url: str, logical_date: datetime, model_version: int, part: int | None = None, *, timeout_s: float):
    """Held while a run of (logical date, model version), or one part of it, scores and writes.

    The whole night (`part` None: planning, or a `vtag infer` run) takes the night's lock exclusively;
    a part running as its own task takes it shared, beside its own part's lock exclusively. So parts
    of one night run side by side on several workers, two tries of one part take turns, and a rerun
    of the night waits for every part still running before it replaces their rows.

    A run waits at most `timeout_s` for an earlier one, then
    raises RunLockTimeout naming the holder: a hung try must not keep the next one waiting forever on
    its GPU slot.

    PostgreSQL: session advisory locks on a connection of their own, released when the run ends or its
    process dies (the server drops them with the connection). SQLite: a file lock beside the database,
    which every run and part shares (SQLite takes one writer at a time anyway)."""
    engine = engine_for(db_url)
    what = _night_label(logical_date, model_version, part)
    if engine.dialect.name == "postgresql":
        night = _lock_key(logical_date, model_version)
        keys = (
            [("", night)] if part is None else [("_shared", night), ("", _lock_key(logical_date, model_version, part))]
        )
        with _pg_run_lock(engine, what, keys, timeout_s) as holder:
            yield holder
        return
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield None
        return
    with _file_run_lock(Path(database).with_name(Path(database).name + "-inference.lock"), what, timeout_s):
        yield None


def partition_name(model_version: int) -> str:
    """The PostgreSQL partition of a model version's rows; an int, so it is safe to format into DDL."""
    return f"predictions_v{int(model_version)}"


def _table_exists(conn, table: str) -> bool:
    # pg_class read with this statement's snapshot: to_regclass's catalog cache can miss a table that
    # another transaction committed while this one waited for the lock.
    return (
        conn.exec_driver_sql(
            "SELECT 1 FROM pg_class WHERE relname = %s AND relnamespace = current_schema()::regnamespace", (table,)
        ).first()
        is not None
    )


def ensure_partition(conn, model_version: int) -> None:
    """Give the version its own partition (PostgreSQL), moving any rows of it out of the default one.
    Serialized by a transaction lock so that two runs starting at once do not both create it."""
    if conn.dialect.name != "postgresql":
        return
    table = partition_name(model_version)
    if _table_exists(conn, table):
        return
    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
    if _table_exists(conn, table):  # created by the run that held the lock before us
        return
    version = int(model_version)
    # Created apart and attached: ATTACH checks the default partition holds no rows of this version,
    # so they move first (there are none unless rows were written without a run, e.g. by hand).
    conn.exec_driver_sql(f"CREATE TABLE {table} (LIKE predictions INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
    conn.exec_driver_sql(f"INSERT INTO {table} SELECT * FROM predictions_default WHERE model_version = %s", (version,))
    conn.exec_driver_sql("DELETE FROM predictions_default WHERE model_version = %s", (version,))
    conn.exec_driver_sql(f"ALTER TABLE predictions ATTACH PARTITION {table} FOR VALUES IN ({version})")


def load_table_name(model_version: int, run_id: int) -> str:
    """The table a version's first full night loads into before it becomes the version's partition."""
    return f"predictions_v{int(model_version)}_run{int(run_id)}"


def start_run(
    db_url: str, logical_date: datetime, model_version: int, top_k: int, airflow_run_id: str | None, clear: bool = True
) -> int:
    """The run of (logical date, model version), emptied of its earlier rows and parts unless `clear` is
    False: a rerun replaces, never duplicates. Call it holding the night's run_lock.

    On PostgreSQL, a whole night of a version that has no partition yet (its first night: a full
    rescore after a promotion) loads into a table of its own without indexes, which finish_night
    indexes and attaches as the version's partition (`finalize_load`): COPY into a table with the
    primary key and the label index ran at 56,000 rows/s at a tenth of the full size here, and falls
    as the indexes outgrow memory, where a table without them takes rows several times as fast and
    the indexes are built once, sorted (benchmarks/scale.py)."""
    with engine_for(db_url).begin() as conn:
        run = conn.execute(
            select(inference_runs.c.run_id, inference_runs.c.load_table)
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
        }
        conn.execute(
            update(model_versions)
            .where(model_versions.c.version == model_version, model_versions.c.predictions_retired_at.is_not(None))
            .values(predictions_retired_at=None)
        )  # scoring again after a retirement
        if run is None:
            run_id = conn.execute(
                insert(inference_runs)
                .values(logical_date=logical_date, model_version=model_version, **values)
                .returning(inference_runs.c.run_id)
            ).scalar_one()
        else:
            run_id = run.run_id
            if clear:
                if run.load_table:  # an earlier try of this night loaded apart: its rows go with its table
                    table = load_table_name(model_version, run_id)
                    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
                conn.execute(
                    delete(predictions).where(
                        predictions.c.model_version == model_version, predictions.c.run_id == run_id
                    )
                )
                conn.execute(delete(inference_label_counts).where(inference_label_counts.c.run_id == run_id))
                conn.execute(delete(inference_parts).where(inference_parts.c.run_id == run_id))
            conn.execute(
                update(inference_runs)
                .where(inference_runs.c.run_id == run_id)
                .values(
                    **{
                        k: v
                        for k, v in values.items()
                        if clear or k not in ("videos_total", "videos_done", "rows_written")
                    }
                )
            )
        postgresql = conn.dialect.name == "postgresql"
        if clear and postgresql and not _table_exists(conn, partition_name(model_version)):
            table, version = load_table_name(model_version, run_id), int(model_version)
            conn.exec_driver_sql(
                f"CREATE TABLE {table} (LIKE predictions INCLUDING DEFAULTS, CHECK (model_version = {version}))"
            )
            conn.execute(update(inference_runs).where(inference_runs.c.run_id == run_id).values(load_table=table))
        else:
            ensure_partition(conn, model_version)
            if clear:
                conn.execute(update(inference_runs).where(inference_runs.c.run_id == run_id).values(load_table=None))
        return run_id


def write_target(db_url: str, run_id: int, clear: bool) -> str:
    """Where a plan of this run writes: its load table (a first whole night), else `predictions`."""
    with engine_for(db_url).connect() as conn:
        load = conn.execute(select(inference_runs.c.load_table).where(inference_runs.c.run_id == run_id)).scalar()
    return load if clear and load else "predictions"


def finalize_load(db_url: str, run_id: int) -> None:
    """Make a loaded night's rows the version's partition: index the load table (sorted builds) and
    attach it; if a partition appeared meanwhile (another night of the version), merge into it."""
    with engine_for(db_url).begin() as conn:
        run = conn.execute(select(inference_runs).where(inference_runs.c.run_id == run_id).with_for_update()).first()
        if run is None or not run.load_table or conn.dialect.name != "postgresql":
            return
        table, partition = load_table_name(run.model_version, run_id), partition_name(run.model_version)
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
        if _table_exists(conn, partition):
            _merge_load(conn, run, table)
        else:
            # The same definitions as the partitioned indexes, so that ATTACH adopts them instead of building.
            conn.exec_driver_sql(f"ALTER TABLE {table} ADD PRIMARY KEY (video_id, model_version, rank)")
            conn.exec_driver_sql(f"CREATE INDEX ON {table} (model_version, label_id, score DESC, video_id)")
            conn.exec_driver_sql(f"CREATE INDEX ON {table} USING brin (run_id)")
            conn.exec_driver_sql(f"ALTER TABLE {table} RENAME TO {partition}")
            conn.exec_driver_sql(
                f"ALTER TABLE predictions ATTACH PARTITION {partition} FOR VALUES IN ({int(run.model_version)})"
            )
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")  # merged (an attached one was renamed)
        conn.execute(update(inference_runs).where(inference_runs.c.run_id == run_id).values(load_table=None))
        log.info("run %d: its rows are now in %s", run_id, partition)


def _merge_load(conn, run, table: str) -> None:
    """Move a loaded night into the version's partition that another night of the version created
    meanwhile (rare: two first nights at once). A video that night already holds whole stays its and
    leaves this night's counts (parts, label counts); anything else that does not land fails the night
    (the transaction rolls back, the load table stays, a rerun writes exactly)."""
    columns, version = ", ".join(COLUMNS), int(run.model_version)
    conn.exec_driver_sql(
        f"INSERT INTO predictions ({columns}) SELECT {columns} FROM {table} l WHERE NOT EXISTS ("
        "SELECT 1 FROM predictions p WHERE p.model_version = l.model_version AND p.video_id = l.video_id) "
        "ON CONFLICT DO NOTHING"
    )
    # Only this rare path reads the load table again: the videos whose rows did not all land.
    skipped = conn.exec_driver_sql(
        f"SELECT l.video_id, COUNT(*) FROM {table} l LEFT JOIN predictions p ON p.model_version = l.model_version "
        "AND p.video_id = l.video_id AND p.rank = l.rank AND p.run_id = l.run_id "
        "GROUP BY l.video_id HAVING COUNT(p.video_id) < COUNT(*)"
    ).all()
    if not skipped:
        return
    k = skipped[0][1]
    elsewhere = check_chunk(conn, run.run_id, version, "predictions", [v for v, _ in skipped], k)
    conn.exec_driver_sql("CREATE TEMP TABLE vtag_elsewhere (video_id varchar(32) PRIMARY KEY) ON COMMIT DROP")
    conn.exec_driver_sql("INSERT INTO vtag_elsewhere SELECT unnest(%s::varchar[])", (list(elsewhere),))
    # Each video leaves the part whose file range holds it (a whole night's parts own disjoint ranges).
    bound = {"run": int(run.run_id), "version": version, "k": int(k)}
    conn.exec_driver_sql(
        "UPDATE inference_parts t SET videos_total = t.videos_total - x.n, videos_done = t.videos_done - x.n, "
        "rows_written = t.rows_written - x.n * %(k)s FROM (SELECT ip.part, COUNT(*) AS n FROM vtag_elsewhere e "
        "JOIN videos v ON v.video_id = e.video_id AND v.level = (SELECT level FROM model_versions WHERE version = %(version)s) "
        "JOIN inference_parts ip ON ip.run_id = %(run)s AND v.parquet_uri BETWEEN ip.first_uri AND ip.last_uri "
        "GROUP BY ip.part) x WHERE t.run_id = %(run)s AND t.part = x.part",
        bound,
    )
    conn.exec_driver_sql(
        "UPDATE inference_label_counts c SET videos = c.videos - x.n FROM (SELECT ip.part, l.rank, l.label_id, COUNT(*) AS n "
        "FROM vtag_elsewhere e JOIN videos v ON v.video_id = e.video_id AND v.level = (SELECT level FROM model_versions "
        "WHERE version = %(version)s) JOIN inference_parts ip ON ip.run_id = %(run)s AND v.parquet_uri BETWEEN ip.first_uri "
        f"AND ip.last_uri JOIN {table} l ON l.video_id = e.video_id GROUP BY ip.part, l.rank, l.label_id) x "
        "WHERE c.run_id = %(run)s AND c.part = x.part AND c.rank = x.rank AND c.label_id = x.label_id",
        bound,
    )
    conn.execute(
        delete(inference_label_counts).where(
            inference_label_counts.c.run_id == run.run_id, inference_label_counts.c.videos <= 0
        )
    )
    _refresh_run_totals(conn, run.run_id)
    log.info(
        "run %d: %d videos were scored by another night of model version %d at the same time and stay its: %s",
        run.run_id,
        len(elsewhere),
        version,
        _few(elsewhere),
    )


def _pending(model_version: int, until: datetime, level: str, exclude_run: int | None):
    """Videos ingested up to `until` that this model has not scored, counting the rows of `exclude_run`
    (the night being rerun) as not scored. One rank-1 probe per video of the version's partition."""
    scored = exists().where(
        and_(
            predictions.c.video_id == videos.c.video_id,
            predictions.c.model_version == model_version,
            predictions.c.rank == 1,
            predictions.c.run_id != (exclude_run or -1),
        )
    )
    return and_(videos.c.level == level, videos.c.ingested_at <= until, ~scored)


def pending_files(
    db_url: str, model_version: int, until: datetime, level: str, exclude_run: int | None = None
) -> list[tuple[str, int]]:
    """(Parquet URI, videos pending there) in URI order: what a night's plan cuts into parts."""
    query = (
        select(videos.c.parquet_uri, func.count())
        .where(_pending(model_version, until, level, exclude_run))
        .group_by(videos.c.parquet_uri)
        .order_by(videos.c.parquet_uri)
    )
    with engine_for(db_url).connect() as conn:
        return [(uri, count) for uri, count in conn.execute(query)]


def pending_videos(
    db_url: str,
    model_version: int,
    until: datetime,
    level: str,
    exclude_run: int | None = None,
    uri_range: tuple[str, str] | None = None,
) -> list[tuple[str, str]]:
    """(video id, Parquet URI) of the pending videos, optionally of the files in [first, last] only."""
    condition = _pending(model_version, until, level, exclude_run)
    if uri_range is not None:
        condition = and_(condition, videos.c.parquet_uri.between(*uri_range))
    query = (
        select(videos.c.video_id, videos.c.parquet_uri)
        .where(condition)
        .order_by(videos.c.parquet_uri, videos.c.video_id)
    )
    with engine_for(db_url).connect() as conn:
        return [tuple(row) for row in conn.execute(query)]


def record_parts(db_url: str, run_id: int, parts: list[dict]) -> list[dict]:
    """The night's plan: one row per part (a range of Parquet files). A targeted rescoring adds its
    parts after those of the night's earlier plan; returns the parts with their numbers."""
    with engine_for(db_url).begin() as conn:
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
        _refresh_run_totals(conn, run_id)
        return numbered


def start_part(db_url: str, run_id: int, part: int) -> dict:
    """Mark a part running, its counters and label counts reset: a retry counts its videos afresh.
    Returns the part's row as it was (its `attempts` says whether an earlier try may have written)."""
    with engine_for(db_url).begin() as conn:
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


def drop_run_rows(
    db_url: str,
    run_id: int,
    model_version: int,
    level: str,
    *,
    table: str = "predictions",
    uri_range: tuple[str, str] | None = None,
    ids: list[str] | None = None,
) -> None:
    """Drop what an earlier try of a part wrote for this run into `table`: the rows of the videos in its
    file range, or of the given videos (a targeted part, which shares its files with the night's other rows)."""
    target = sa_table(table, *(sa_column(c) for c in COLUMNS))
    with engine_for(db_url).begin() as conn:
        of_run = and_(target.c.model_version == model_version, target.c.run_id == run_id)
        if uri_range is not None:
            in_range = select(videos.c.video_id).where(
                videos.c.level == level, videos.c.parquet_uri.between(*uri_range)
            )
            conn.execute(delete(target).where(of_run, target.c.video_id.in_(in_range)))
        for start in range(0, len(ids or []), 5000):
            conn.execute(delete(target).where(of_run, target.c.video_id.in_(ids[start : start + 5000])))


def set_part_total(db_url: str, run_id: int, part: int, total: int) -> None:
    with engine_for(db_url).begin() as conn:
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


def finish_part(
    db_url: str,
    run_id: int,
    part: int,
    label_counts: np.ndarray | None = None,
    error: str | None = None,
    attempt: int | None = None,
    rows_per_video: int | None = None,
) -> None:
    """A part's outcome; a succeeded part stores how many videos got each label at each rank (a
    top_k x classes array), in the transaction that marks it done. The run's totals follow its parts.
    With `attempt`, only if that try is still the part's latest (a superseded try changes nothing).
    With `rows_per_video`, success is checked against the part's committed counters (every video
    written, k rows each): a shortfall marks it failed and raises RowsLost."""
    with engine_for(db_url).begin() as conn:
        current = conn.execute(
            select(inference_parts)
            .where(inference_parts.c.run_id == run_id, inference_parts.c.part == part)
            .with_for_update()
        ).first()
        if attempt is not None and (current is None or current.attempts != attempt):
            if error is None:
                raise SupersededTry(f"run {run_id} part {part}: try {attempt} was superseded by a newer try")
            return
        missing = (
            None if error or rows_per_video is None or current is None else shortfall(current._asdict(), rows_per_video)
        )
        if missing:
            error = f"incomplete: {missing}"
        elif error is None and label_counts is not None:
            ranks, label_ids = np.nonzero(label_counts)
            rows = [
                {"run_id": run_id, "part": part, "rank": int(r) + 1, "label_id": int(label), "videos": int(n)}
                for r, label, n in zip(ranks, label_ids, label_counts[ranks, label_ids])
            ]
            for start in range(0, len(rows), 20000):
                conn.execute(insert(inference_label_counts), rows[start : start + 20000])
        conn.execute(
            update(inference_parts)
            .where(inference_parts.c.run_id == run_id, inference_parts.c.part == part)
            .values(status="failed" if error else "succeeded", error=error, finished_at=utcnow())
        )
        _refresh_run_totals(conn, run_id)
    if missing:
        raise RowsLost(f"run {run_id} part {part}: {error}")


def _refresh_run_totals(conn, run_id: int) -> None:
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


def parts_of(db_url: str, run_id: int) -> list[dict]:
    with engine_for(db_url).connect() as conn:
        query = select(inference_parts).where(inference_parts.c.run_id == run_id).order_by(inference_parts.c.part)
        return [row._asdict() for row in conn.execute(query)]


def known_videos(db_url: str, ids: list[str], level: str) -> dict[str, str]:
    with engine_for(db_url).connect() as conn:
        found = {}
        for start in range(0, len(ids), 5000):
            query = select(videos.c.video_id, videos.c.parquet_uri).where(
                videos.c.level == level, videos.c.video_id.in_(ids[start : start + 5000])
            )
            found.update(dict(conn.execute(query).all()))
        return found


def forget(db_url: str, model_version: int, ids: list[str]) -> None:
    """Drop this model's predictions of these videos, so that they are scored again."""
    with engine_for(db_url).begin() as conn:
        for start in range(0, len(ids), 5000):
            conn.execute(
                delete(predictions).where(
                    predictions.c.model_version == model_version, predictions.c.video_id.in_(ids[start : start + 5000])
                )
            )


def prediction_table(
    run_id: int, model_version: int, ids: list[str], top_labels: np.ndarray, top_scores: np.ndarray
) -> pa.Table:
    """A chunk's rows, columnar: one row per (video, rank), built without a Python loop over rows."""
    count, k = top_labels.shape
    return pa.table(
        {
            "video_id": pa.array(np.repeat(np.asarray(ids, dtype=object), k), pa.string()),
            "model_version": pa.array(np.full(count * k, model_version, np.int32)),
            "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int16), count)),
            "label_id": pa.array(top_labels.reshape(-1).astype(np.int32)),
            "score": pa.array(top_scores.reshape(-1).astype(np.float64)),
            "run_id": pa.array(np.full(count * k, run_id, np.int32)),
        }
    )


def _csv(table: pa.Table) -> io.BytesIO:
    # Arrow's CSV writer: building the text row by row in Python took a third of the bulk path's time.
    buffer = io.BytesIO()
    pa_csv.write_csv(table, buffer, pa_csv.WriteOptions(include_header=False))
    buffer.seek(0)
    return buffer


def tuples(table: pa.Table) -> list[tuple]:
    return list(zip(*(column.to_pylist() for column in table.columns)))


def insert_bulk(conn, table: pa.Table, target: str = "predictions") -> int:
    """Insert prediction rows in the connection's transaction by the fastest path of its database, into
    `predictions` or a night's load table (PostgreSQL); returns the rows the database took.

    A video another run of the model already holds rows of is skipped whole (two nights scoring it at
    once: whichever wrote first keeps it), never mixed with this run's ranks; `check_chunk` then tells
    such videos from rows really lost. Only uniqueness conflicts are skipped: a NULL or a bad value
    fails the chunk, where SQLite's INSERT OR IGNORE used to drop the row silently."""
    if conn.dialect.name == "postgresql":
        if target != "predictions" and not re.fullmatch(r"predictions_v\d+_run\d+", target):
            raise ValueError(f"not a table predictions are written to: {target!r}")  # it is formatted into COPY
        return _copy_postgresql(conn.connection.driver_connection.cursor(), table, target)
    before = conn.connection.driver_connection.total_changes
    conn.exec_driver_sql(
        f"INSERT INTO predictions ({', '.join(COLUMNS)}) SELECT ?1, ?2, ?3, ?4, ?5, ?6 WHERE NOT EXISTS ("
        "SELECT 1 FROM predictions p WHERE p.video_id = ?1 AND p.model_version = ?2 AND p.run_id <> ?6) "
        "ON CONFLICT DO NOTHING",
        tuples(table),
    )
    return conn.connection.driver_connection.total_changes - before


def _copy_postgresql(cursor, table: pa.Table, target: str) -> int:
    """COPY straight into the table; only if a row is already there (another run scored the same video
    at the same time) go again through a staging table, skipping that run's videos whole, 40% slower."""
    import psycopg2.errors

    columns = ", ".join(COLUMNS)
    cursor.execute("SAVEPOINT vtag_copy")
    try:
        cursor.copy_expert(f"COPY {target} ({columns}) FROM STDIN WITH (FORMAT csv)", _csv(table))
        cursor.execute("RELEASE SAVEPOINT vtag_copy")
        return table.num_rows
    except psycopg2.errors.UniqueViolation:
        cursor.execute("ROLLBACK TO SAVEPOINT vtag_copy")
    cursor.execute("CREATE TEMP TABLE IF NOT EXISTS predictions_stage (LIKE predictions) ON COMMIT DELETE ROWS")
    cursor.copy_expert(f"COPY predictions_stage ({columns}) FROM STDIN WITH (FORMAT csv)", _csv(table))
    cursor.execute(
        f"INSERT INTO {target} ({columns}) SELECT {columns} FROM predictions_stage s WHERE NOT EXISTS ("
        f"SELECT 1 FROM {target} p WHERE p.video_id = s.video_id AND p.model_version = s.model_version "
        "AND p.run_id <> s.run_id) ON CONFLICT DO NOTHING"
    )
    written = cursor.rowcount
    cursor.execute("TRUNCATE predictions_stage")
    return written


class RowsLost(ValueError):
    """Rows a run scored did not all land, or landed beside another run's: the chunk, part or night fails
    (a ValueError: the command line prints it as its one line)."""


class SupersededTry(LostRunLock):
    """A newer try of this part started (this one was presumed dead): its writes must not land."""


def _this_try(run_id: int, part: int, attempt: int):
    return and_(
        inference_parts.c.run_id == run_id, inference_parts.c.part == part, inference_parts.c.attempts == attempt
    )


@dataclass(frozen=True)
class ChunkWritten:
    rows: int  # rows the database took
    videos: int  # videos whose rows this run wrote
    scored_elsewhere: tuple[str, ...] = ()  # videos another run of the model wrote at the same time, left to it


def _few(items, limit: int = 5) -> str:
    items = list(items)
    return ", ".join(map(str, items[:limit])) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_chunk(conn, run_id: int, model_version: int, target: str, ids: list[str], k: int) -> tuple[str, ...]:
    """After a chunk's insert took fewer rows than it had: the videos left to another run, each holding
    that run's whole top ranks (1..m, one run), or RowsLost naming the videos that would be incomplete or
    mixed. Costs one indexed read of the chunk's videos, and only when rows were skipped."""
    stored = sa_table(target, *(sa_column(c) for c in COLUMNS))
    held: dict[str, dict[int, tuple[int, int, int]]] = {}
    for start in range(0, len(ids), 5000):
        query = (
            select(stored.c.video_id, stored.c.run_id, func.count(), func.min(stored.c.rank), func.max(stored.c.rank))
            .where(stored.c.model_version == model_version, stored.c.video_id.in_(ids[start : start + 5000]))
            .group_by(stored.c.video_id, stored.c.run_id)
        )
        for video, run, n, low, high in conn.execute(query):
            held.setdefault(video, {})[run] = (n, low, high)
    elsewhere, lost = [], []
    for video in ids:
        runs = held.get(video, {})
        if runs == {run_id: (k, 1, k)}:
            continue
        if len(runs) == 1 and run_id not in runs:
            ((other, (n, low, high)),) = runs.items()
            if low == 1 and n == high:
                elsewhere.append(video)
                continue
        lost.append(
            f"{video} ("
            + (
                "; ".join(f"run {r} holds {n} rows, ranks {low}..{high}" for r, (n, low, high) in runs.items())
                or "no row stored"
            )
            + ")"
        )
    if lost:
        raise RowsLost(
            f"run {run_id}: {len(lost)} of {len(ids)} videos of a chunk would be stored incompletely in {target}, "
            f"{k} rows each expected: {_few(lost, 3)}; nothing of the chunk was written"
        )
    return tuple(elsewhere)


def write_chunk(
    db_url: str,
    run_id: int,
    model_version: int,
    part: int,
    target: str,
    attempt: int,
    ids: list[str],
    top_labels: np.ndarray,
    top_scores: np.ndarray,
    lock: RunLockHolder | None = None,
) -> ChunkWritten:
    """One chunk of a part's predictions and the part's progress, all or nothing; with `lock`, only while
    the run's lock is still held, and only while this is the part's latest try (both checked inside the
    chunk's transaction, the try when it commits). Every video gets its k rows, or is left whole to
    another run that scored it at the same time (it then leaves the part's total), or the chunk fails."""
    table, k = prediction_table(run_id, model_version, ids, top_labels, top_scores), top_labels.shape[1]
    with engine_for(db_url).begin() as conn:
        if lock is not None:
            lock.check(conn)
        written = insert_bulk(conn, table, target)
        elsewhere = () if written == table.num_rows else check_chunk(conn, run_id, model_version, target, ids, k)
        videos = len(ids) - len(elsewhere)
        if written != videos * k:  # e.g. a video twice in the chunk
            raise RowsLost(
                f"run {run_id} part {part}: the database took {written} rows for {videos} videos x {k}; "
                "nothing of the chunk was written"
            )
        progressed = conn.execute(
            update(inference_parts)
            .where(_this_try(run_id, part, attempt))
            .values(
                videos_done=inference_parts.c.videos_done + videos,
                rows_written=inference_parts.c.rows_written + written,
                videos_total=inference_parts.c.videos_total - len(elsewhere),
            )
        )
        if progressed.rowcount != 1:
            raise SupersededTry(f"run {run_id} part {part}: try {attempt} was superseded by a newer try; stopping")
    if elsewhere:
        log.info(
            "run %d part %d: %d videos were scored by another run at the same time and stay its: %s",
            run_id,
            part,
            len(elsewhere),
            _few(elsewhere),
        )
    return ChunkWritten(written, videos, elsewhere)


class ChunkWriter:
    """Writes chunks in the background while the caller scores the next ones: two connections on
    PostgreSQL (a single COPY stream leaves the server's second core idle: 131-167k rows/s against
    232-261k with two, measured here), one on SQLite (its writers take turns anyway). At most
    `writers * 2` chunks wait, so memory stays bounded; the first failure is raised.

    With `label_counts` (a top_k x classes array), it counts each written video's labels at each rank
    there, so that a part's counts are those of the rows it wrote, not of videos left to another run."""

    def __init__(
        self,
        db_url: str,
        run_id: int,
        model_version: int,
        part: int,
        lock: RunLockHolder | None = None,
        target: str = "predictions",
        attempt: int = 1,
        label_counts: np.ndarray | None = None,
    ):
        from concurrent.futures import ThreadPoolExecutor

        writers = 2 if engine_for(db_url).dialect.name == "postgresql" else 1
        self._args, self._lock, self._limit = (db_url, run_id, model_version, part, target, attempt), lock, 2 * writers
        self._pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="vtag-writer")
        self._pending: list = []
        self._label_counts = label_counts
        self.rows_written = self.videos_written = 0
        self.scored_elsewhere: list[str] = []

    def submit(self, ids: list[str], top_labels: np.ndarray, top_scores: np.ndarray) -> None:
        if len(self._pending) >= self._limit:
            self._collect(*self._pending.pop(0))
        future = self._pool.submit(write_chunk, *self._args, ids, top_labels, top_scores, self._lock)
        self._pending.append((future, ids, top_labels))

    def _collect(self, future, ids: list[str], top_labels: np.ndarray) -> None:
        written = future.result()
        self.rows_written += written.rows
        self.videos_written += written.videos
        self.scored_elsewhere += written.scored_elsewhere
        if self._label_counts is not None:
            if written.scored_elsewhere:
                gone = set(written.scored_elsewhere)
                top_labels = top_labels[[i for i, v in enumerate(ids) if v not in gone]]
            for rank in range(self._label_counts.shape[0]):
                self._label_counts[rank] += np.bincount(top_labels[:, rank], minlength=self._label_counts.shape[1])

    def abandon(self) -> None:
        """The caller failed: let the chunks in flight finish (their failures no longer matter)."""
        try:
            self.close()
        except BaseException:
            pass

    def close(self) -> int:
        """Wait for every chunk; raise the first failure after all have finished."""
        error = None
        for pending in self._pending:
            try:
                self._collect(*pending)
            except BaseException as exc:  # keep waiting: no write may outlive the run's bookkeeping
                error = error or exc
        self._pending = []
        self._pool.shutdown()
        if error is not None:
            raise error
        return self.rows_written


def finish_run(db_url: str, run_id: int, error: str | None = None) -> dict:
    """The night's outcome; its videos and rows are the sums of its parts'."""
    with engine_for(db_url).begin() as conn:
        _refresh_run_totals(conn, run_id)
        conn.execute(
            update(inference_runs)
            .where(inference_runs.c.run_id == run_id)
            .values(status="failed" if error else "succeeded", error=error, finished_at=utcnow())
        )
        return conn.execute(select(inference_runs).where(inference_runs.c.run_id == run_id)).first()._asdict()


class RetireError(ValueError):
    pass


def retire(db_url: str, model_version: int) -> int:
    """Drop every prediction of a model version that is not in production (on PostgreSQL its partition,
    at once however many rows); its runs stay as history. Returns the rows dropped."""
    with engine_for(db_url).begin() as conn:
        version = conn.execute(
            select(model_versions).where(model_versions.c.version == model_version).with_for_update()
        ).first()
        if version is None:
            raise RetireError(f"model version {model_version} does not exist")
        if version.status == "production":
            raise RetireError(
                f"model version {model_version} is in production: promote another before retiring its predictions"
            )
        running = (
            conn.execute(
                select(inference_runs.c.logical_date).where(
                    inference_runs.c.model_version == model_version, inference_runs.c.status == "running"
                )
            )
            .scalars()
            .first()
        )
        if running is not None:
            raise RetireError(
                f"model version {model_version} has a night in progress ({running.isoformat()}): "
                "retire it once that night has finished"
            )
        rows = conn.execute(
            select(func.count()).select_from(predictions).where(predictions.c.model_version == model_version)
        ).scalar()
        table = partition_name(model_version)
        if conn.dialect.name == "postgresql" and _table_exists(conn, table):
            conn.exec_driver_sql(f"DROP TABLE {table}")
        for (run_id,) in conn.execute(
            select(inference_runs.c.run_id).where(
                inference_runs.c.model_version == model_version, inference_runs.c.load_table.is_not(None)
            )
        ):
            loading = load_table_name(model_version, run_id)
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {loading}")
            conn.execute(update(inference_runs).where(inference_runs.c.run_id == run_id).values(load_table=None))
        conn.execute(
            delete(predictions).where(predictions.c.model_version == model_version)
        )  # SQLite, default partition
        runs = select(inference_runs.c.run_id).where(inference_runs.c.model_version == model_version)
        conn.execute(delete(inference_label_counts).where(inference_label_counts.c.run_id.in_(runs)))
        conn.execute(
            update(model_versions)
            .where(model_versions.c.version == model_version)
            .values(predictions_retired_at=utcnow())
        )
    log.info("retired model version %d: %d prediction rows dropped", model_version, rows)
    return rows


def versions_with_predictions(db_url: str) -> list[dict]:
    """Model versions that have run and whose predictions were not retired, newest first."""
    query = (
        select(model_versions.c.version, model_versions.c.status)
        .where(
            model_versions.c.predictions_retired_at.is_(None),
            exists().where(inference_runs.c.model_version == model_versions.c.version),
        )
        .order_by(model_versions.c.version.desc())
    )
    with engine_for(db_url).connect() as conn:
        return [row._asdict() for row in conn.execute(query)]
