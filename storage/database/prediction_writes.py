"""The bulk write path of predictions, and the publishing of a night's rows.

A night's parts never write where anyone reads: each part writes its rows into a table of its own
(`storage.database.partitions.part_table_name`, no index, so COPY runs at full speed), in chunks, each
chunk and the part's progress in one transaction. Only a night that succeeded (every part, and its
exports) publishes them (`publish`): in one transaction, its rows replace what an earlier try of the
night had published, videos another night published meanwhile stay that night's, and videos whose
content changed after the part scored them (or that left the catalogue) are not published at all and
stay pending. A failed night's rows are never served; its part tables wait for its retry or rerun.

PostgreSQL takes rows with COPY, SQLite with executemany. A part succeeds only when its counters add up
(`storage.database.runs.shortfall`). On PostgreSQL no night inserts into large indexes: a version's
first night becomes the version's partition whole (its base: its part tables indexed once, sorted, and
attached), and each later night a layer of it (storage/database/partitions.py), merged into the base
later, off the night's path.
"""

import io
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
from sqlalchemy import Column, Connection, Engine, MetaData, Table, delete, exists, func, select, update
from sqlalchemy import column as sa_column
from sqlalchemy import table as sa_table

from storage.database import label_counts, segment_writes
from storage.database.partitions import (
    PART_TABLE,
    PARTITION_LOCK,
    PREDICTIONS,
    attach_layer,
    attach_version,
    base_layers,
    base_name,
    create_layer,
    ensure_partition,
    family,
    layer_definition,
    layer_name,
    part_table_name,
    partition_name,
    run_tables,
    table_exists,
)
from storage.database.run_locks import RunLockHolder
from storage.database.runs import RowsLost, SupersededTry, refresh_run_totals, this_try
from storage.database.schema import (
    inference_label_counts,
    inference_parts,
    predictions,
    segment_predictions,
    video_labels,
    videos,
)
from storage.formats.segment_rows import TopSegments

COLUMNS = ("video_id", "model_version", "rank", "label_id", "score", "run_id", "hit")

log = logging.getLogger(__name__)


def prediction_table(
    run_id: int,
    model_version: int,
    ids: list[str],
    top_labels: np.ndarray,
    top_scores: np.ndarray,
    hit: np.ma.MaskedArray | None = None,
) -> pa.Table:
    """A chunk's rows, columnar: one row per (video, rank), built without a Python loop over rows. `hit`:
    whether each label is true (videos x k, masked where the video has no ground truth; None: unjudged)."""
    count, k = top_labels.shape
    if hit is None:
        hit = np.ma.masked_all((count, k), bool)
    return pa.table(
        {
            "video_id": pa.array(np.repeat(np.asarray(ids, dtype=object), k), pa.string()),
            "model_version": pa.array(np.full(count * k, model_version, np.int32)),
            "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int16), count)),
            "label_id": pa.array(top_labels.reshape(-1).astype(np.int32)),
            "score": pa.array(top_scores.reshape(-1).astype(np.float64)),
            "run_id": pa.array(np.full(count * k, run_id, np.int32)),
            "hit": pa.array(np.ma.filled(hit, False).reshape(-1), mask=np.ma.getmaskarray(hit).reshape(-1)),
        }
    )


def judge(conn: Connection, ids: list[str], top_labels: np.ndarray) -> np.ma.MaskedArray:
    """Whether each of the videos' top labels is among their ground truth, as the catalogue holds it now;
    masked for a video without any (one index range scan per video, in the chunk's transaction; the
    comparison in one vectorized pass: a per-video loop cost the full rescore about 90 s at 6.1 M videos)."""
    row_of = {video: i for i, video in enumerate(ids)}
    truth = conn.execute(
        select(video_labels.c.video_id, video_labels.c.label_id).where(video_labels.c.video_id.in_(ids))
    ).all()
    rows = np.fromiter((row_of[video] for video, _ in truth), np.int64, len(truth))
    labels = np.fromiter((label for _, label in truth), np.int64, len(truth))
    classes = max(int(top_labels.max(initial=0)), int(labels.max(initial=0))) + 1
    # (row, label) pairs as one integer each: a top label is a hit when its pair is among the truth's
    hit = np.isin(np.arange(len(ids))[:, None] * classes + top_labels, rows * classes + labels)
    judged = np.zeros(len(ids), bool)
    judged[rows] = True
    return np.ma.masked_array(hit, mask=np.repeat(~judged[:, None], hit.shape[1], axis=1))


def _csv(table: pa.Table) -> io.BytesIO:
    # Arrow's CSV writer: building the text row by row in Python took a third of the bulk path's time.
    buffer = io.BytesIO()
    pa_csv.write_csv(table, buffer, pa_csv.WriteOptions(include_header=False))
    buffer.seek(0)
    return buffer


def tuples(table: pa.Table) -> list[tuple]:
    return list(zip(*(column.to_pylist() for column in table.columns)))


def create_part_table(conn: Connection, model_version: int, run_id: int, part: int, parent: str = PREDICTIONS) -> str:
    """A part's table of `parent`'s rows (predictions, segment_predictions), empty (a try starts afresh:
    whatever an earlier try wrote goes with the old one)."""
    parent, table = family(parent), part_table_name(model_version, run_id, part, parent)
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
    if conn.dialect.name == "postgresql":
        # LIKE the partitioned table and CHECKed to its version (and base layer): what ATTACH takes unscanned
        version = int(model_version)
        if parent == PREDICTIONS:  # its rows' layer is the run's: it may become the night's layer as it is
            conn.exec_driver_sql(f"CREATE TABLE {table} ({layer_definition(version, run_id)})")
            conn.exec_driver_sql(f"ALTER TABLE {table} ALTER COLUMN layer SET DEFAULT {int(run_id)}")
        else:
            conn.exec_driver_sql(
                f"CREATE TABLE {table} (LIKE {parent} INCLUDING DEFAULTS, CHECK (model_version = {version}))"
            )
    else:
        columns = (predictions if parent == PREDICTIONS else segment_predictions).columns
        Table(
            table,
            MetaData(),
            *(
                Column(c.name, c.type, nullable=c.nullable, server_default=c.server_default and c.server_default.arg)
                for c in columns
            ),
        ).create(conn)
    return table


def insert_bulk(conn, table: pa.Table, target: str) -> int:
    """Insert rows (its columns named as the target's) into a part's table in the connection's
    transaction, by the fastest path of its database; returns the rows the database took."""
    if not PART_TABLE.fullmatch(target):
        raise ValueError(f"not a table predictions are written to: {target!r}")  # it is formatted into SQL
    columns = ", ".join(table.column_names)  # ours (prediction_table, TopSegments.table), not a caller's
    if conn.dialect.name == "postgresql":
        cursor = conn.connection.driver_connection.cursor()
        cursor.copy_expert(f"COPY {target} ({columns}) FROM STDIN WITH (FORMAT csv)", _csv(table))
        return table.num_rows  # COPY takes every row or fails
    before = conn.connection.driver_connection.total_changes
    marks = ", ".join("?" * table.num_columns)
    conn.exec_driver_sql(f"INSERT INTO {target} ({columns}) VALUES ({marks})", tuples(table))
    return conn.connection.driver_connection.total_changes - before


@dataclass(frozen=True)
class ChunkWritten:
    rows: int  # rows the database took
    videos: int
    hit: np.ma.MaskedArray  # whether each row's label is true, masked where the video has no ground truth


def _few(items, limit: int = 5) -> str:
    items = list(items)
    return ", ".join(map(str, items[:limit])) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def held_elsewhere(conn, run_id: int, model_version: int, ids: list[str], k: int) -> tuple[str, ...]:
    """Of videos whose rows did not all land in `predictions`: those another run holds whole (its top
    ranks 1..m), left to it, or RowsLost naming the videos that would be incomplete or mixed."""
    stored = predictions.c
    held: dict[str, dict[int, tuple[int, int, int]]] = {}
    for start in range(0, len(ids), 5000):
        query = (
            select(stored.video_id, stored.run_id, func.count(), func.min(stored.rank), func.max(stored.rank))
            .where(stored.model_version == model_version, stored.video_id.in_(ids[start : start + 5000]))
            .group_by(stored.video_id, stored.run_id)
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
            f"run {run_id}: {len(lost)} of {len(ids)} videos would be stored incompletely, {k} rows each "
            f"expected: {_few(lost, 3)}; nothing of the night was published"
        )
    return tuple(elsewhere)


@dataclass(frozen=True)
class PartTable:
    """Where a part's try writes: its run, version and part number, its table, and which try it is."""

    run_id: int
    model_version: int
    part: int
    table: str
    attempt: int = 1
    segment_table: str | None = None  # where its segment rows go, when the night writes them


def write_chunk(
    engine: Engine,
    into: PartTable,
    ids: list[str],
    top_labels: np.ndarray,
    top_scores: np.ndarray,
    lock: RunLockHolder | None = None,
    segments: TopSegments | None = None,
) -> ChunkWritten:
    """One chunk of a part's predictions (and its videos' `segments`) into its tables, and the part's
    progress, all or nothing; with `lock`, only while the run's lock is still held, and only while this is
    the part's latest try (both checked inside the chunk's transaction, the try when it commits)."""
    run_id, model_version, part, target, attempt = into.run_id, into.model_version, into.part, into.table, into.attempt
    k = top_labels.shape[1]
    with engine.begin() as conn:
        if lock is not None:
            lock.check(conn)
        hit = judge(conn, ids, top_labels)
        table = prediction_table(run_id, model_version, ids, top_labels, top_scores, hit)
        written = insert_bulk(conn, table, target)
        if written != len(ids) * k:
            raise RowsLost(
                f"run {run_id} part {part}: the database took {written} rows for {len(ids)} videos x {k}; "
                "nothing of the chunk was written"
            )
        segment_rows = 0
        if segments is not None and into.segment_table is not None:
            rows = segments.table(ids, model_version, run_id)
            segment_rows = insert_bulk(conn, rows, into.segment_table)
            if segment_rows != rows.num_rows:
                raise RowsLost(
                    f"run {run_id} part {part}: the database took {segment_rows} of the chunk's {rows.num_rows} "
                    "segment rows; nothing of the chunk was written"
                )
        progressed = conn.execute(
            update(inference_parts)
            .where(this_try(run_id, part, attempt))
            .values(
                videos_done=inference_parts.c.videos_done + len(ids),
                rows_written=inference_parts.c.rows_written + written,
                segment_rows=inference_parts.c.segment_rows + segment_rows,
            )
        )
        if progressed.rowcount != 1:
            raise SupersededTry(f"run {run_id} part {part}: try {attempt} was superseded by a newer try; stopping")
    return ChunkWritten(written, len(ids), hit)


class ChunkWriter:
    """Writes chunks in the background while the caller scores the next ones: two connections on
    PostgreSQL (a single COPY stream leaves the server's second core idle: 131-167k rows/s against
    232-261k with two, measured here), one on SQLite (its writers take turns anyway). At most
    `writers * 2` chunks wait, so memory stays bounded; the first failure is raised.

    With `counts` (label_counts.LabelCounts), it counts each written video's labels and hits at each rank."""

    def __init__(
        self,
        engine: Engine,
        into: PartTable,
        lock: RunLockHolder | None = None,
        counts: label_counts.LabelCounts | None = None,
    ):
        from concurrent.futures import ThreadPoolExecutor

        writers = 2 if engine.dialect.name == "postgresql" else 1
        self._args, self._lock, self._limit = (engine, into), lock, 2 * writers
        self._pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="vtag-writer")
        self._pending: list = []
        self._counts = counts
        self.rows_written = self.videos_written = 0

    def submit(
        self, ids: list[str], top_labels: np.ndarray, top_scores: np.ndarray, segments: TopSegments | None = None
    ) -> None:
        if len(self._pending) >= self._limit:
            self._collect(*self._pending.pop(0))
        future = self._pool.submit(write_chunk, *self._args, ids, top_labels, top_scores, self._lock, segments)
        self._pending.append((future, top_labels))

    def _collect(self, future, top_labels: np.ndarray) -> None:
        written = future.result()
        self.rows_written += written.rows
        self.videos_written += written.videos
        if self._counts is not None:
            self._counts.add(top_labels, written.hit)

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


def _rows_of(table: str):
    return sa_table(table, *(sa_column(c) for c in COLUMNS))


@dataclass(frozen=True)
class Published:
    videos: int
    rows: int
    changed: tuple[str, ...]  # scored, then changed or gone from the catalogue: not published, pending again
    elsewhere: tuple[str, ...]  # published meanwhile by another night of the version, left to it
    filled: str | None = None  # the table the night filled whole (a version's base or a night's layer)


def publish(
    conn: Connection, run_id: int, model_version: int, level: str, parts: list[int], k: int, replace_any: bool
) -> Published:
    """Make the rows the given parts of a night wrote the version's, in the caller's transaction (the one
    that marks the night succeeded). Each video's rows replace those this run published before (with
    `replace_any`, a targeted rescoring: those of any run of the version); a video another night of the
    version published meanwhile stays that night's; a video whose catalogue row is gone or newer than the
    start of the try that scored it is left out, so that the next night scores its new content. Videos
    left out leave their part's counts. A part without its table (published already) is skipped."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))  # publishes take turns
    present = set(run_tables(conn, model_version, run_id))  # one catalogue query, not one per part
    tables = {p: name for p in parts if (name := part_table_name(model_version, run_id, p)) in present}
    started = dict(
        conn.execute(
            select(inference_parts.c.part, inference_parts.c.started_at).where(
                inference_parts.c.run_id == run_id, inference_parts.c.part.in_(list(tables))
            )
        ).all()
    )
    changed: list[str] = []
    left_out: dict[int, list[str]] = {}  # by part: its videos that this night does not publish
    for part, table in tables.items():
        stale = _changed_since(conn, table, level, started[part])
        _leave_part(conn, run_id, part, table, stale, drop_rows=True)
        changed += stale
        left_out[part] = stale
    segments = segment_writes.Publishing(conn, run_id, model_version, present)
    elsewhere: list[str] = []
    filled = None  # the table this night filled whole, on PostgreSQL: the version's base or the night's layer
    if _first_night(conn, model_version, replace_any):
        _attach_as_base(conn, model_version, run_id, list(tables.values()))
        filled = base_name(model_version)
        for part in tables:  # the version had no rows: none of its segments to replace
            segments.publish_part(part, left_out[part], published=None)
    else:
        ensure_partition(conn, model_version)
        layer = _night_layer(conn, model_version, run_id, parts=len(tables))
        for part, table in tables.items():
            theirs = _make_room(conn, run_id, model_version, part, table, k, replace_any)
            segments.publish_part(part, left_out[part] + theirs, published=table)
            elsewhere += theirs
            _move_rows(conn, run_id, part, table, layer)
        if layer is not None and layer.new:
            filled = _attach_night_layer(conn, model_version, run_id, layer)
    label_counts.publish_parts(conn, run_id, model_version, list(tables))
    conn.execute(
        delete(inference_label_counts).where(
            inference_label_counts.c.run_id == run_id, inference_label_counts.c.videos <= 0
        )
    )
    refresh_run_totals(conn, run_id)
    done = conn.execute(
        select(
            func.coalesce(func.sum(inference_parts.c.videos_done), 0),
            func.coalesce(func.sum(inference_parts.c.rows_written), 0),
        ).where(inference_parts.c.run_id == run_id, inference_parts.c.part.in_(list(tables)))
    ).first()
    for what, ids in (
        ("changed or left the catalogue after it was scored", changed),
        ("published by another night of the version meanwhile", elsewhere),
    ):
        if ids:
            log.info("run %d: %d videos %s, not published by this night: %s", run_id, len(ids), what, _few(ids))
    return Published(int(done[0]), int(done[1]), tuple(changed), tuple(elsewhere), filled)


def _changed_since(conn, table: str, level: str, started) -> list[str]:
    """The videos of a part's table whose catalogue row is gone, or newer than the try that scored them
    (ingest keeps a video's ingested_at while its content stays the same)."""
    rows = _rows_of(table)
    current = exists().where(
        videos.c.video_id == rows.c.video_id, videos.c.level == level, videos.c.ingested_at <= started
    )
    return list(conn.execute(select(rows.c.video_id).where(rows.c.rank == 1, ~current)).scalars())


def _leave_part(conn, run_id: int, part: int, table: str, ids: list[str], drop_rows: bool) -> None:
    """These videos leave the part's counts (videos, rows, label counts and hits), and with `drop_rows` its
    table."""
    rows = _rows_of(table)
    counts = inference_label_counts.c
    for start in range(0, len(ids), 5000):
        some = ids[start : start + 5000]
        by_label = conn.execute(
            select(rows.c.rank, rows.c.label_id, func.count(), *label_counts.judged_and_hits(rows.c.hit))
            .where(rows.c.video_id.in_(some))
            .group_by(rows.c.rank, rows.c.label_id)
        ).all()
        for rank, label, n, judged, hits in by_label:
            conn.execute(
                update(inference_label_counts)
                .where(counts.run_id == run_id, counts.part == part, counts.rank == rank, counts.label_id == label)
                .values(videos=counts.videos - n, judged=counts.judged - judged, hits=counts.hits - hits)
            )
        conn.execute(
            update(inference_parts)
            .where(inference_parts.c.run_id == run_id, inference_parts.c.part == part)
            .values(
                videos_total=inference_parts.c.videos_total - len(some),
                videos_done=inference_parts.c.videos_done - len(some),
                rows_written=inference_parts.c.rows_written - sum(row[2] for row in by_label),
            )
        )
        if drop_rows:
            conn.execute(delete(rows).where(rows.c.video_id.in_(some)))


def _first_night(conn, model_version: int, replace_any: bool) -> bool:
    """Whether this night becomes the version's partition whole: PostgreSQL, a whole night, no partition yet
    and no stray row of the version in the default partition."""
    if conn.dialect.name != "postgresql" or replace_any or table_exists(conn, partition_name(model_version)):
        return False
    stray = conn.exec_driver_sql(
        "SELECT 1 FROM predictions_default WHERE model_version = %s LIMIT 1", (int(model_version),)
    ).first()
    return stray is None


def _attach_as_base(conn, model_version: int, run_id: int, tables: list[str]) -> None:
    """The night's part tables become the version's partition: its base, one part table renamed or several
    gathered into one (a single sequential write), then indexed (sorted builds, faster than inserting into
    indexes) and attached."""
    base, version = base_name(model_version), int(model_version)
    if len(tables) == 1:
        conn.exec_driver_sql(f"ALTER TABLE {tables[0]} RENAME TO {base}")
    else:
        conn.exec_driver_sql(f"CREATE TABLE {base} ({layer_definition(version, run_id)})")
        for table in tables:
            conn.exec_driver_sql(f"INSERT INTO {base} SELECT * FROM {table}")
            conn.exec_driver_sql(f"DROP TABLE {table}")
    attach_version(conn, version, layer=run_id)
    log.info("model version %d: its first night's rows are now its partition's base %s", version, base)


@dataclass(frozen=True)
class Layer:
    table: str
    new: bool  # made by this publish, attached at its end; else attached by an earlier publish of the run
    renamed: bool  # the night's one part table becomes it as it is; else the parts' rows are inserted


def _night_layer(conn, model_version: int, run_id: int, parts: int) -> Layer | None:
    """Where a later night's rows go on PostgreSQL: its own layer of the version's predictions, new (its one
    part's table renamed, or an empty table the parts' rows fill; indexed and attached at the end) or left
    by an earlier publish of the same run (the base, when the run was the version's first night); None on
    SQLite."""
    if conn.dialect.name != "postgresql":
        return None
    if run_id in base_layers(conn, model_version):  # the run is the version's first night, publishing again
        return Layer(base_name(model_version), new=False, renamed=False)
    table = layer_name(model_version, run_id)
    if table_exists(conn, table):
        return Layer(table, new=False, renamed=False)
    if parts == 1:
        return Layer(table, new=True, renamed=True)
    return Layer(create_layer(conn, model_version, run_id), new=True, renamed=False)


def _attach_night_layer(conn, model_version: int, run_id: int, layer: Layer) -> str | None:
    """Index the night's new layer and attach it; an empty one (every video left out) is dropped instead."""
    if conn.exec_driver_sql(f"SELECT 1 FROM {layer.table} LIMIT 1").first() is None:
        conn.exec_driver_sql(f"DROP TABLE {layer.table}")
        return None
    attach_layer(conn, model_version, run_id)
    log.info("run %d: its rows are now the layer %s of model version %d", run_id, layer.table, model_version)
    return layer.table


def _published_before(conn, run_id: int, model_version: int) -> bool:
    stored = predictions.c
    found = select(stored.video_id).where(stored.model_version == model_version, stored.run_id == run_id).limit(1)
    return conn.execute(found).first() is not None


def _make_room(conn, run_id: int, model_version: int, part: int, table: str, k: int, replace_any: bool) -> list[str]:
    """Before a part's rows are published: the rows they replace leave the version (any layer); returns the
    videos left to the night that published them meanwhile (they leave the part's counts and its table, so
    that publishing the rest is a plain insert or rename: one probe per video instead of an anti-join and a
    conflict check per row, which the publish lock makes safe: no other publish runs meanwhile)."""
    rows, stored = _rows_of(table), predictions.c
    replaced = stored.video_id.in_(select(rows.c.video_id).where(rows.c.rank == 1))
    if not replace_any:
        replaced = replaced & (stored.run_id == run_id)
    # A whole night replaces rows only when its run published before (a rerun): one look at the run's
    # block range index first, instead of a probe of it per video (at 121 M rows, 61,000 scans of it: 60 s).
    if replace_any or _published_before(conn, run_id, model_version):
        label_counts.take_off(conn, (stored.model_version == model_version) & replaced)
        conn.execute(delete(predictions).where(stored.model_version == model_version, replaced))
    # Any rank: a stray row without its rank 1 must fail the night (held_elsewhere), not be served beside it.
    held = list(
        conn.execute(
            select(rows.c.video_id).where(
                rows.c.rank == 1,
                exists().where(stored.model_version == model_version, stored.video_id == rows.c.video_id),
            )
        ).scalars()
    )
    elsewhere = list(held_elsewhere(conn, run_id, model_version, held, k)) if held else []
    _leave_part(conn, run_id, part, table, elsewhere, drop_rows=True)
    return elsewhere


def _move_rows(conn, run_id: int, part: int, table: str, layer: Layer | None) -> None:
    """The part's rows, less those `_make_room` left out, become the version's: its table renamed to the
    night's layer, or its rows inserted into the layer (SQLite: `predictions`) and the table dropped; their
    number checked against the part's counters (checked against its committed chunks before publishing, and
    kept in step by _leave_part)."""
    expected = conn.execute(
        select(inference_parts.c.rows_written).where(inference_parts.c.run_id == run_id, inference_parts.c.part == part)
    ).scalar()
    if layer is not None and layer.renamed:
        published = conn.exec_driver_sql(f"SELECT COUNT(*) FROM {table}").scalar()
        conn.exec_driver_sql(f"ALTER TABLE {table} RENAME TO {layer.table}")
    else:
        columns = ", ".join((*COLUMNS, "layer"))
        # In the order of the primary key: a video's rows side by side, a layer's pages filled one after
        # another.
        published = conn.exec_driver_sql(
            f"INSERT INTO {'predictions' if layer is None else layer.table} ({columns}) "
            f"SELECT {columns} FROM {table} ORDER BY video_id, rank"
        ).rowcount
        conn.exec_driver_sql(f"DROP TABLE {table}")
    if published != expected:
        raise RowsLost(
            f"run {run_id} part {part}: {published} rows published where its counters say {expected}; "
            "nothing of the night was published"
        )
