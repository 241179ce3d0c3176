"""The tables predictions (and segment predictions) live in: a PostgreSQL partition per model version
(created when a version's first night is published), the part tables a night's parts write into until the night succeeds and
publishes them (storage/database/prediction_writes.py, `publish`), and retirement, which drops a
version's predictions at once.

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
    one. Serialized by a transaction lock so that two runs starting at once do not both create it."""
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
    conn.exec_driver_sql(f"CREATE TABLE {table} (LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
    conn.exec_driver_sql(f"INSERT INTO {table} SELECT * FROM {parent}_default WHERE model_version = %s", (version,))
    conn.exec_driver_sql(f"DELETE FROM {parent}_default WHERE model_version = %s", (version,))
    conn.exec_driver_sql(f"ALTER TABLE {parent} ATTACH PARTITION {table} FOR VALUES IN ({version})")


# The definitions of predictions' partitioned indexes (migrations 0005 and 0014), in the form a table
# about to become a version's partition is given them: ATTACH then adopts them instead of building them.
_PREDICTION_INDEXES = (
    "ALTER TABLE {t} ADD PRIMARY KEY (video_id, model_version, rank)",
    "CREATE INDEX ON {t} (model_version, label_id, score DESC, video_id)",
    "CREATE INDEX ON {t} USING brin (run_id)",
    # top_label_changes: each version's rank-1 rows alone, in video order (a merge join, no sort, no heap)
    "CREATE INDEX ON {t} (video_id, model_version) INCLUDE (label_id, score) WHERE rank = 1",
)
_VERSION_PARTITION = re.compile(r"predictions_v\d+")


def index_as_partition(conn, table: str) -> None:
    """Build predictions' indexes on a version's filled table before it is attached as its partition:
    sorted builds, much faster than inserting its rows into indexes one by one."""
    if not _VERSION_PARTITION.fullmatch(table):
        raise ValueError(f"not a version's partition of predictions: {table!r}")
    for statement in _PREDICTION_INDEXES:
        conn.exec_driver_sql(statement.format(t=table))


def vacuum_analyze(db_url: str, table: str) -> None:
    """VACUUM (ANALYZE) a version's partition that a night has just made whole: statistics for the planner,
    and a visibility map that lets index-only scans (top_label_changes) skip the heap. Outside any
    transaction, as VACUUM must run; a failure is logged, not raised: the night it follows has succeeded,
    and autovacuum gets to the partition later anyway."""
    if not _VERSION_PARTITION.fullmatch(table):
        raise ValueError(f"not a version's partition of predictions: {table!r}")
    try:
        with engine_for(db_url).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f"VACUUM (ANALYZE) {table}")
    except SQLAlchemyError as exc:
        log.warning("%s: VACUUM (ANALYZE) after its first night failed, left to autovacuum: %s", table, exc)


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
