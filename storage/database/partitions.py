"""The tables predictions (and segment predictions) live in: a PostgreSQL partition per model version
(created when a version's first night is published), the part tables a night's parts write into until the night succeeds and
publishes them (storage/database/prediction_writes.py, `publish`), and retirement, which drops a
version's predictions at once.

A version's partition of `predictions` is itself partitioned by `layer` (migration 0017): its base
(`predictions_v<N>_base`) holds what its first night wrote and every night merged since; each later night
publishes its rows as a layer of its own (`predictions_v<N>_night<run>`), indexed apart with sorted builds
and attached, instead of inserting them at random places of the base's indexes (at YouTube-8M's size
12 GB of them: 52,000-73,000 rows/s that way). A row's `layer` is the run whose night's table holds it: a
part writes its run's id, so that its table can become the night's layer (or a first night's base) as it
is; rows merged into the base, or written without a night, have 0 (the base takes 0 and its first night's
run). A lookup
probes the base and each layer not merged yet; `merge_layers`, off the night's path, moves the layers into
the base.

Table names are built only here, from constant prefixes and ints, so that they are safe to format
into DDL.
"""

import logging
import re

from sqlalchemy import Connection, delete, exists, func, select, update
from sqlalchemy.exc import SQLAlchemyError

from storage.database import label_counts
from storage.database.db import engine_for, utcnow
from storage.database.schema import (
    inference_label_counts,
    inference_runs,
    model_versions,
    predictions,
    segment_predictions,
)
from storage.errors import VtagError

log = logging.getLogger(__name__)


PARTITION_LOCK = 0x76746167  # "vtag": serializes the creation of partitions (transaction-level)
PREDICTIONS, SEGMENTS = "predictions", "segment_predictions"  # the tables a night writes, partitioned alike


def partition_name(model_version: int, table: str = PREDICTIONS) -> str:
    """The PostgreSQL partition of a model version's rows; an int, so it is safe to format into DDL."""
    return f"{family(table)}_v{int(model_version)}"


def base_name(model_version: int) -> str:
    """The layer of a version's predictions that its first night and the merged nights fill."""
    return f"{PREDICTIONS}_v{int(model_version)}_base"


def layer_name(model_version: int, run_id: int) -> str:
    """The layer one later night of a version publishes its predictions as, until it is merged."""
    return f"{PREDICTIONS}_v{int(model_version)}_night{int(run_id)}"


def part_table_name(model_version: int, run_id: int, part: int, table: str = PREDICTIONS) -> str:
    """The table one part of a night writes its rows into, seen by no query until the night publishes it."""
    return f"{family(table)}_v{int(model_version)}_run{int(run_id)}_part{int(part)}"


def family(table: str) -> str:
    """`table` if it is one of the two tables nights write (it is formatted into DDL), else ValueError."""
    if table not in (PREDICTIONS, SEGMENTS):
        raise ValueError(f"not a table nights write: {table!r}")
    return table


# _part-less: a load table of releases before
PART_TABLE = re.compile(r"(segment_)?predictions_v\d+_run\d+(_part\d+)?")


def run_tables(conn, model_version: int, run_id: int | None = None) -> list[str]:
    """The part tables (predictions' and segments', and older releases' load tables) of a version's runs,
    or of one run, that exist."""
    found = []
    for parent in (PREDICTIONS, SEGMENTS):
        prefix = f"{parent}_v{int(model_version)}_run{'' if run_id is None else int(run_id)}"
        if conn.dialect.name == "postgresql":
            names = conn.exec_driver_sql(
                "SELECT relname FROM pg_class WHERE relkind = 'r' AND relnamespace = current_schema()::regnamespace "
                "AND starts_with(relname, %s)",
                (prefix,),
            ).scalars()
        else:
            names = conn.exec_driver_sql(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND substr(name, 1, ?) = ?", (len(prefix), prefix)
            ).scalars()
        # ..._run1 is a prefix of ..._run12: keep the run's own tables only
        own = re.compile(re.escape(prefix) + (r"\d*" if run_id is None else "") + r"(_part\d+)?")
        found += [n for n in names if PART_TABLE.fullmatch(n) and own.fullmatch(n)]
    return sorted(found)


def drop_run_tables(conn, model_version: int, run_id: int | None = None) -> None:
    for table in run_tables(conn, model_version, run_id):
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")


def table_exists(conn, table: str) -> bool:
    # pg_class read with this statement's snapshot: to_regclass's catalog cache can miss a table that
    # another transaction committed while this one waited for the lock.
    return (
        conn.exec_driver_sql(
            "SELECT 1 FROM pg_class WHERE relname = %s AND relnamespace = current_schema()::regnamespace", (table,)
        ).first()
        is not None
    )


def ensure_partition(conn, model_version: int, parent: str = PREDICTIONS) -> None:
    """Give the version its own partition of `parent` (PostgreSQL), moving any rows of it out of the default
    one (predictions': into its base layer). Serialized by a transaction lock so that two runs starting at
    once do not both create it."""
    if conn.dialect.name != "postgresql":
        return
    parent, table = family(parent), partition_name(model_version, parent)
    if table_exists(conn, table):
        return
    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
    if table_exists(conn, table):  # created by the run that held the lock before us
        return
    version = int(model_version)
    # Created apart and attached: ATTACH checks the default partition holds no rows of this version,
    # so they move first (there are none unless rows were written without a run, e.g. by hand).
    if parent == PREDICTIONS:
        table = base_name(version)
        conn.exec_driver_sql(f"CREATE TABLE {table} ({layer_definition(version)})")
    else:
        conn.exec_driver_sql(f"CREATE TABLE {table} (LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
    columns = ", ".join(
        c.name for c in (predictions if parent == PREDICTIONS else segment_predictions).columns if c.name != "layer"
    )
    conn.exec_driver_sql(
        f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {parent}_default WHERE model_version = %s", (version,)
    )
    conn.exec_driver_sql(f"DELETE FROM {parent}_default WHERE model_version = %s", (version,))
    if parent == PREDICTIONS:
        attach_version(conn, version, layer=0)
    else:
        conn.exec_driver_sql(f"ALTER TABLE {parent} ATTACH PARTITION {table} FOR VALUES IN ({version})")


def layer_definition(model_version: int, layer: int = 0) -> str:
    """The columns of a table about to become a layer (or the base) of a version's predictions, whose rows'
    `layer` is `layer`, CHECKed to its version and layer so that ATTACH takes it without scanning it (the
    layer's CHECK, `night_layer`, is dropped once attached: the partition bound holds from then on)."""
    return (
        f"LIKE predictions INCLUDING DEFAULTS, CHECK (model_version = {int(model_version)}), "
        f"CONSTRAINT night_layer CHECK (layer = {int(layer)})"
    )


def create_layer(conn, model_version: int, run_id: int) -> str:
    """An empty table for a later night's rows of the version (their `layer` = the run), to be filled,
    then indexed and attached (`attach_layer`)."""
    table = layer_name(model_version, run_id)
    conn.exec_driver_sql(f"CREATE TABLE {table} ({layer_definition(model_version, run_id)})")
    return table


def attach_layer(conn, model_version: int, run_id: int) -> None:
    """The night's filled layer, indexed, becomes part of the version's predictions (a lock that lets reads
    go on)."""
    table = layer_name(model_version, run_id)
    _index(conn, table)
    conn.exec_driver_sql(
        f"ALTER TABLE {partition_name(model_version)} ATTACH PARTITION {table} FOR VALUES IN ({int(run_id)})"
    )
    conn.exec_driver_sql(f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS night_layer")


def attach_version(conn, model_version: int, layer: int) -> None:
    """The version's partition of predictions, partitioned by layer, made of its filled base, indexed (whose
    rows' `layer` is `layer`; it takes 0 too: merged rows, rows written without a night): created apart and
    attached (ATTACH, unlike CREATE ... PARTITION OF, lets reads of predictions go on meanwhile)."""
    version, partition = int(model_version), partition_name(model_version)
    _index(conn, base_name(version))
    # No CHECK of its own (its partitions would need one of the same name): the base's proves the attach
    conn.exec_driver_sql(f"CREATE TABLE {partition} (LIKE predictions INCLUDING DEFAULTS) PARTITION BY LIST (layer)")
    values = ", ".join(str(v) for v in sorted({0, int(layer)}))
    conn.exec_driver_sql(f"ALTER TABLE {partition} ATTACH PARTITION {base_name(version)} FOR VALUES IN ({values})")
    conn.exec_driver_sql(f"ALTER TABLE {base_name(version)} DROP CONSTRAINT IF EXISTS night_layer")
    conn.exec_driver_sql(f"ALTER TABLE predictions ATTACH PARTITION {partition} FOR VALUES IN ({version})")


def base_layers(conn, model_version: int) -> set[int]:
    """The `layer` values the version's base takes: 0 and its first night's run (its partition bound)."""
    bound = conn.exec_driver_sql(
        "SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE oid = to_regclass(%s)", (base_name(model_version),)
    ).scalar()
    return {int(v) for v in re.fullmatch(r"FOR VALUES IN \(([\d, ]+)\)", bound).group(1).split(",")}


def layers(conn, model_version: int) -> list[int]:
    """The runs whose nights are layers of the version's predictions not merged into its base, oldest first."""
    if conn.dialect.name != "postgresql":
        return []
    names = conn.exec_driver_sql(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(%s)",
        (partition_name(model_version),),
    ).scalars()
    return sorted(int(m.group(1)) for n in names if (m := _LAYER.fullmatch(n)))


def merge_layers(conn, model_version: int) -> int:
    """Move every layer of the version's predictions into its base, in one sorted insert, and drop them:
    in the caller's transaction, so that readers see the rows in the layers or in the base, never in both
    or neither; publishes wait (the publish lock). Returns the rows moved."""
    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
    runs = layers(conn, model_version)
    if not runs:
        return 0
    version = int(model_version)
    columns = ", ".join(c.name for c in predictions.columns if c.name != "layer")
    moved = conn.exec_driver_sql(
        f"INSERT INTO {base_name(version)} ({columns}, layer) SELECT {columns}, 0 FROM {partition_name(version)} "
        f"WHERE layer IN ({', '.join(map(str, runs))}) ORDER BY video_id, rank"
    ).rowcount
    for run in runs:
        conn.exec_driver_sql(f"DROP TABLE {layer_name(version, run)}")
    log.info("model version %d: %d rows of %d nights merged into its base", version, moved, len(runs))
    return moved


# The definitions of predictions' partitioned indexes (migrations 0005, 0014 and 0017), in the form a table
# about to become a layer of a version's partition is given them: ATTACH then adopts them instead of
# building them.
_PREDICTION_INDEXES = (
    "ALTER TABLE {t} ADD PRIMARY KEY (video_id, model_version, rank, layer)",
    "CREATE INDEX ON {t} (model_version, label_id, score DESC, video_id)",
    "CREATE INDEX ON {t} USING brin (run_id)",
    # top_label_changes: each version's rank-1 rows alone, in video order (a merge join, no sort, no heap)
    "CREATE INDEX ON {t} (video_id, model_version) INCLUDE (label_id, score) WHERE rank = 1",
)
_LAYER = re.compile(r"predictions_v\d+_night(\d+)")
_VERSION_LAYER = re.compile(r"predictions_v\d+_(base|night\d+)")


def _index(conn, table: str) -> None:
    """Build predictions' indexes on a version's filled base or night layer before it is attached: sorted
    builds, much faster than inserting its rows into indexes one by one."""
    if not _VERSION_LAYER.fullmatch(table):
        raise ValueError(f"not a layer of a version's predictions: {table!r}")
    for statement in _PREDICTION_INDEXES:
        conn.exec_driver_sql(statement.format(t=table))


def vacuum_analyze(db_url: str, table: str) -> None:
    """VACUUM (ANALYZE) a layer of a version's predictions that a night or a merge has just filled: statistics
    for the planner, and a visibility map that lets index-only scans (top_label_changes) skip the heap.
    Outside any transaction, as VACUUM must run; a failure is logged, not raised: the night or merge it
    follows has succeeded, and autovacuum gets to the table later anyway."""
    if not _VERSION_LAYER.fullmatch(table):
        raise ValueError(f"not a layer of a version's predictions: {table!r}")
    try:
        with engine_for(db_url).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f"VACUUM (ANALYZE) {table}")
    except SQLAlchemyError as exc:
        log.warning("%s: VACUUM (ANALYZE) after it was filled failed, left to autovacuum: %s", table, exc)


class RetireError(VtagError, ValueError):
    pass


def retire(conn: Connection, model_version: int) -> int:
    """Drop every prediction of a model version that is not in production (on PostgreSQL its partition,
    at once however many rows); its runs stay as history. Returns the rows dropped."""
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
    for parent in (PREDICTIONS, SEGMENTS):
        table = partition_name(model_version, parent)
        if conn.dialect.name == "postgresql" and table_exists(conn, table):
            conn.exec_driver_sql(f"DROP TABLE {table}")
    drop_run_tables(conn, model_version)  # the rows of nights that never published
    conn.execute(update(inference_runs).where(inference_runs.c.model_version == model_version).values(load_table=None))
    for table_of in (predictions, segment_predictions):  # SQLite, default partitions
        conn.execute(delete(table_of).where(table_of.c.model_version == model_version))
    runs = select(inference_runs.c.run_id).where(inference_runs.c.model_version == model_version)
    conn.execute(delete(inference_label_counts).where(inference_label_counts.c.run_id.in_(runs)))
    label_counts.forget_version(conn, model_version)
    conn.execute(
        update(model_versions).where(model_versions.c.version == model_version).values(predictions_retired_at=utcnow())
    )
    log.info("retired model version %d: %d prediction rows dropped", model_version, rows)
    return rows


def versions_with_predictions(conn: Connection) -> list[dict]:
    """Model versions that have run and whose predictions were not retired, newest first."""
    query = (
        select(model_versions.c.version, model_versions.c.status)
        .where(
            model_versions.c.predictions_retired_at.is_(None),
            exists().where(inference_runs.c.model_version == model_versions.c.version),
        )
        .order_by(model_versions.c.version.desc())
    )
    return [row._asdict() for row in conn.execute(query)]
