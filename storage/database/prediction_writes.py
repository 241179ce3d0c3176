"""The bulk write path of predictions, and deletes of a run's rows.

Rows go in chunks, each chunk and the run's progress in one transaction, so a run is all-or-nothing
per chunk. PostgreSQL takes them with COPY (through a staging table when two runs scored the same
video at once, so they never collide); SQLite with executemany. Every chunk counts the rows the
database took: each video gets its k rows, or is left whole to the run that wrote it first, or the
chunk fails (`check_chunk`), and a part or night succeeds only when its counters add up
(`storage.database.runs.shortfall`). A version's first whole night loads into a table of its own, which
`finalize_load` makes the version's partition.
"""

import io
import logging
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
from sqlalchemy import Connection, Engine, and_, delete, func, select, update
from sqlalchemy import column as sa_column
from sqlalchemy import table as sa_table

from storage.database.partitions import PARTITION_LOCK, load_table_name, partition_name, table_exists
from storage.database.run_locks import RunLockHolder
from storage.database.runs import RowsLost, SupersededTry, refresh_run_totals, this_try
from storage.database.schema import inference_label_counts, inference_parts, inference_runs, videos

COLUMNS = ("video_id", "model_version", "rank", "label_id", "score", "run_id")

log = logging.getLogger(__name__)


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
    engine: Engine,
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
    with engine.begin() as conn:
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
            .where(this_try(run_id, part, attempt))
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
        engine: Engine,
        run_id: int,
        model_version: int,
        part: int,
        lock: RunLockHolder | None = None,
        target: str = "predictions",
        attempt: int = 1,
        label_counts: np.ndarray | None = None,
    ):
        from concurrent.futures import ThreadPoolExecutor

        writers = 2 if engine.dialect.name == "postgresql" else 1
        self._args, self._lock, self._limit = (engine, run_id, model_version, part, target, attempt), lock, 2 * writers
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


def drop_run_rows(
    conn: Connection,
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
    of_run = and_(target.c.model_version == model_version, target.c.run_id == run_id)
    if uri_range is not None:
        in_range = select(videos.c.video_id).where(videos.c.level == level, videos.c.parquet_uri.between(*uri_range))
        conn.execute(delete(target).where(of_run, target.c.video_id.in_(in_range)))
    for start in range(0, len(ids or []), 5000):
        conn.execute(delete(target).where(of_run, target.c.video_id.in_(ids[start : start + 5000])))


def finalize_load(conn: Connection, run_id: int) -> None:
    """Make a loaded night's rows the version's partition: index the load table (sorted builds) and
    attach it; if a partition appeared meanwhile (another night of the version), merge into it."""
    run = conn.execute(select(inference_runs).where(inference_runs.c.run_id == run_id).with_for_update()).first()
    if run is None or not run.load_table or conn.dialect.name != "postgresql":
        return
    table, partition = load_table_name(run.model_version, run_id), partition_name(run.model_version)
    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
    if table_exists(conn, partition):
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
    refresh_run_totals(conn, run.run_id)
    log.info(
        "run %d: %d videos were scored by another night of model version %d at the same time and stay its: %s",
        run.run_id,
        len(elsewhere),
        version,
        _few(elsewhere),
    )
