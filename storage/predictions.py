"""Inference runs and their predictions: the bulk write path and the run bookkeeping.

Rows go in chunks, each chunk and the run's progress in one transaction, so a run is all-or-nothing
per chunk. PostgreSQL takes them with COPY (through a staging table and ON CONFLICT DO NOTHING when
two runs scored the same video at once, so they never collide); SQLite with executemany.
"""

import hashlib
import io
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
from sqlalchemy import and_, delete, exists, insert, select, update

from storage.db import engine_for, utcnow
from storage.schema import inference_runs, predictions, videos

COLUMNS = ("video_id", "model_version", "rank", "label_id", "score", "run_id")

log = logging.getLogger(__name__)


def _lock_key(logical_date: datetime, model_version: int) -> int:
    """A signed 64-bit advisory-lock key for (model version, logical date). Alembic's lock (env.py) is a
    small constant: a clash costs at most a wait, never a wrong result."""
    digest = hashlib.blake2b(f"vtag-inference-run:{model_version}:{logical_date.isoformat()}".encode(), digest_size=8)
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
            (self.pid, self.key)).first()
        if held is None:
            raise LostRunLock(f"the connection holding this run's lock (backend {self.pid}) is gone: stopping, "
                              "so that a run which may have taken over is not written under")


@contextmanager
def run_lock(db_url: str, logical_date: datetime, model_version: int):
    """Held while a run of (logical date, model version) scores and writes: a second run of the same
    pair waits for the first and then replaces its rows (a rerun), instead of both writing one run.

    PostgreSQL: a session advisory lock on a connection of its own, released when the run ends or its
    process dies (the server drops the lock with the connection). SQLite: a file lock beside the
    database, which runs of every date share (SQLite takes one writer at a time anyway)."""
    engine = engine_for(db_url)
    if engine.dialect.name == "postgresql":
        key = _lock_key(logical_date, model_version)
        conn = engine.connect()
        try:
            if not conn.exec_driver_sql("SELECT pg_try_advisory_lock(%s)", (key,)).scalar():
                log.warning("another run of model version %d for %s is in progress: waiting for it to finish",
                            model_version, logical_date.isoformat())
                conn.exec_driver_sql("SELECT pg_advisory_lock(%s)", (key,))
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            conn.commit()  # the session lock outlives the transaction; no transaction stays open
            yield RunLockHolder(pid, key)
        finally:
            try:
                conn.exec_driver_sql("SELECT pg_advisory_unlock(%s)", (key,))
                conn.commit()
            except Exception:  # the connection broke (server restarted): the lock went with it
                conn.invalidate()
            conn.close()
        return
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield None
        return
    import fcntl

    with open(Path(database).with_name(Path(database).name + "-inference.lock"), "a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another inference run on %s is in progress: waiting for it to finish", database)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield None  # a file lock cannot be lost while this process lives
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)



def start_run(db_url: str, logical_date: datetime, model_version: int, top_k: int, airflow_run_id: str | None,
              clear: bool = True) -> int:
    """The run of (logical date, model version), emptied of its earlier rows unless `clear` is False:
    a rerun replaces, never duplicates."""
    with engine_for(db_url).begin() as conn:
        run_id = conn.execute(select(inference_runs.c.run_id).where(
            inference_runs.c.logical_date == logical_date, inference_runs.c.model_version == model_version)
            .with_for_update()).scalar()
        values = {"top_k": top_k, "status": "running", "videos_total": 0, "videos_done": 0, "rows_written": 0,
                  "error": None, "airflow_run_id": airflow_run_id, "started_at": utcnow(), "finished_at": None}
        if run_id is None:
            return conn.execute(insert(inference_runs).values(logical_date=logical_date, model_version=model_version, **values)
                                .returning(inference_runs.c.run_id)).scalar_one()
        if clear:
            conn.execute(delete(predictions).where(predictions.c.run_id == run_id))
        conn.execute(update(inference_runs).where(inference_runs.c.run_id == run_id).values(**values))
        return run_id


def pending_videos(db_url: str, model_version: int, until: datetime, level: str) -> list[tuple[str, str]]:
    """(video id, Parquet URI) of videos ingested up to `until` that this model has not scored, counting
    the rows of the run of (`until`, model) as not scored: a rerun of that date scores them again."""
    this_run = select(inference_runs.c.run_id).where(inference_runs.c.logical_date == until,
                                                     inference_runs.c.model_version == model_version)
    scored = exists().where(and_(predictions.c.video_id == videos.c.video_id, predictions.c.model_version == model_version,
                                 predictions.c.run_id.not_in(this_run)))
    query = (select(videos.c.video_id, videos.c.parquet_uri).where(videos.c.level == level, videos.c.ingested_at <= until, ~scored)
             .order_by(videos.c.parquet_uri, videos.c.video_id))
    with engine_for(db_url).connect() as conn:
        return [tuple(row) for row in conn.execute(query)]


def known_videos(db_url: str, ids: list[str], level: str) -> dict[str, str]:
    with engine_for(db_url).connect() as conn:
        found = {}
        for start in range(0, len(ids), 5000):
            query = select(videos.c.video_id, videos.c.parquet_uri).where(videos.c.level == level,
                                                                          videos.c.video_id.in_(ids[start:start + 5000]))
            found.update(dict(conn.execute(query).all()))
        return found


def forget(db_url: str, model_version: int, ids: list[str]) -> None:
    """Drop this model's predictions of these videos, so that they are scored again."""
    with engine_for(db_url).begin() as conn:
        for start in range(0, len(ids), 5000):
            conn.execute(delete(predictions).where(predictions.c.model_version == model_version,
                                                   predictions.c.video_id.in_(ids[start:start + 5000])))


def prediction_table(run_id: int, model_version: int, ids: list[str], top_labels: np.ndarray,
                     top_scores: np.ndarray) -> pa.Table:
    """A chunk's rows, columnar: one row per (video, rank), built without a Python loop over rows."""
    count, k = top_labels.shape
    return pa.table({
        "video_id": pa.array(np.repeat(np.asarray(ids, dtype=object), k), pa.string()),
        "model_version": pa.array(np.full(count * k, model_version, np.int32)),
        "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int16), count)),
        "label_id": pa.array(top_labels.reshape(-1).astype(np.int32)),
        "score": pa.array(top_scores.reshape(-1).astype(np.float64)),
        "run_id": pa.array(np.full(count * k, run_id, np.int32)),
    })


def _csv(table: pa.Table) -> io.BytesIO:
    # Arrow's CSV writer: building the text row by row in Python took a third of the bulk path's time.
    buffer = io.BytesIO()
    pa_csv.write_csv(table, buffer, pa_csv.WriteOptions(include_header=False))
    buffer.seek(0)
    return buffer


def tuples(table: pa.Table) -> list[tuple]:
    return list(zip(*(column.to_pylist() for column in table.columns)))


def insert_bulk(conn, table: pa.Table) -> int:
    """Insert prediction rows in the connection's transaction by the fastest path of its database."""
    if conn.dialect.name == "postgresql":
        return _copy_postgresql(conn.connection.driver_connection.cursor(), table)
    before = conn.connection.driver_connection.total_changes
    conn.exec_driver_sql(f"INSERT OR IGNORE INTO predictions ({', '.join(COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?)",
                         tuples(table))
    return conn.connection.driver_connection.total_changes - before


def _copy_postgresql(cursor, table: pa.Table) -> int:
    """COPY straight into the table; only if a row is already there (another run scored the same video
    at the same time) go again through a staging table with ON CONFLICT DO NOTHING, 40% slower."""
    import psycopg2.errors

    columns = ", ".join(COLUMNS)
    cursor.execute("SAVEPOINT vtag_copy")
    try:
        cursor.copy_expert(f"COPY predictions ({columns}) FROM STDIN WITH (FORMAT csv)", _csv(table))
        cursor.execute("RELEASE SAVEPOINT vtag_copy")
        return table.num_rows
    except psycopg2.errors.UniqueViolation:
        cursor.execute("ROLLBACK TO SAVEPOINT vtag_copy")
    cursor.execute("CREATE TEMP TABLE IF NOT EXISTS predictions_stage (LIKE predictions) ON COMMIT DELETE ROWS")
    cursor.copy_expert(f"COPY predictions_stage ({columns}) FROM STDIN WITH (FORMAT csv)", _csv(table))
    cursor.execute(f"INSERT INTO predictions ({columns}) SELECT {columns} FROM predictions_stage ON CONFLICT DO NOTHING")
    written = cursor.rowcount
    cursor.execute("TRUNCATE predictions_stage")
    return written


def write_chunk(db_url: str, run_id: int, model_version: int, ids: list[str], top_labels: np.ndarray,
                top_scores: np.ndarray, lock: RunLockHolder | None = None) -> int:
    """One chunk of a run's predictions and the run's progress, all or nothing; with `lock`, only while
    the run's lock is still held (checked inside the chunk's transaction)."""
    table = prediction_table(run_id, model_version, ids, top_labels, top_scores)
    with engine_for(db_url).begin() as conn:
        if lock is not None:
            lock.check(conn)
        written = insert_bulk(conn, table)
        conn.execute(update(inference_runs).where(inference_runs.c.run_id == run_id).values(
            videos_done=inference_runs.c.videos_done + len(ids), rows_written=inference_runs.c.rows_written + written))
    return written


class ChunkWriter:
    """Writes chunks in the background while the caller scores the next ones: two connections on
    PostgreSQL (a single COPY stream leaves the server's second core idle: 131-167k rows/s against
    232-261k with two, measured here), one on SQLite (its writers take turns anyway). At most
    `writers * 2` chunks wait, so memory stays bounded; the first failure is raised."""

    def __init__(self, db_url: str, run_id: int, model_version: int, lock: RunLockHolder | None = None):
        from concurrent.futures import ThreadPoolExecutor

        writers = 2 if engine_for(db_url).dialect.name == "postgresql" else 1
        self._args, self._lock, self._limit = (db_url, run_id, model_version), lock, 2 * writers
        self._pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="vtag-writer")
        self._pending: list = []
        self.rows_written = 0

    def submit(self, ids: list[str], top_labels: np.ndarray, top_scores: np.ndarray) -> None:
        if len(self._pending) >= self._limit:
            self.rows_written += self._pending.pop(0).result()
        self._pending.append(self._pool.submit(write_chunk, *self._args, ids, top_labels, top_scores, self._lock))

    def abandon(self) -> None:
        """The caller failed: let the chunks in flight finish (their failures no longer matter)."""
        try:
            self.close()
        except BaseException:
            pass

    def close(self) -> int:
        """Wait for every chunk; raise the first failure after all have finished."""
        error = None
        for future in self._pending:
            try:
                self.rows_written += future.result()
            except BaseException as exc:  # keep waiting: no write may outlive the run's bookkeeping
                error = error or exc
        self._pending = []
        self._pool.shutdown()
        if error is not None:
            raise error
        return self.rows_written


def set_total(db_url: str, run_id: int, total: int) -> None:
    with engine_for(db_url).begin() as conn:
        conn.execute(update(inference_runs).where(inference_runs.c.run_id == run_id).values(videos_total=total))


def finish_run(db_url: str, run_id: int, error: str | None = None) -> dict:
    with engine_for(db_url).begin() as conn:
        conn.execute(update(inference_runs).where(inference_runs.c.run_id == run_id).values(
            status="failed" if error else "succeeded", error=error, finished_at=utcnow()))
        return conn.execute(select(inference_runs).where(inference_runs.c.run_id == run_id)).first()._asdict()
