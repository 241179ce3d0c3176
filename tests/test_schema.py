"""One schema: storage/database/schema.py's metadata against the database the migrations build, on SQLite and PostgreSQL.

Alembic's autogenerate comparison (`compare_metadata`) reflects the migrated database and lists every
difference it can see: tables, columns, types, nullability, server defaults, indexes, unique and foreign-key
constraints. It does not compare check constraints or partial indexes' predicates, which are compared here
by name and content; nor can SQLite's reflection tell an index column's sort order (PostgreSQL's run of the
same test does).
"""

import re
from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import CheckConstraint, Column, Float, Index, MetaData, String, inspect, text

from storage.database import registry
from storage.database.db import engine_for
from storage.database.partitions import SEGMENTS, ensure_partition
from storage.database.prediction_writes import create_part_table
from storage.database.runs import start_run
from storage.database.schema import metadata
from tests.support.db import in_transaction

# Tables PostgreSQL holds that the metadata leaves out on purpose, each created outside it:
RUNTIME_TABLES = (
    # migrations 0005, 0012: the DEFAULT partitions, rows of a version without a partition of its own
    re.compile(r"(segment_)?predictions_default"),
    # storage.database.partitions.partition_name: a model version's LIST partition, made when its first run starts,
    # and predictions' layers of it (base_name, layer_name: migration 0017)
    re.compile(r"(segment_)?predictions_v\d+"),
    re.compile(r"predictions_v\d+_(base|night\d+)"),
)
# On both: storage.database.partitions.part_table_name, a night's part writing apart until the night publishes
PART_TABLES = re.compile(r"(segment_)?predictions_v\d+_run\d+_part\d+")
# Not filtered because autogenerate never reflects them: the views production_labels and production_versions
# (it reads tables only) and the analysts' role and its grants (not schema objects).


def _runtime_table(dialect: str, type_: str, name: str | None) -> bool:
    if type_ != "table" or name is None:
        return False
    return bool(PART_TABLES.fullmatch(name)) or (
        dialect == "postgresql" and any(p.fullmatch(name) for p in RUNTIME_TABLES)
    )


def _diff(db_url: str, target: MetaData = metadata) -> tuple[list[tuple], set[str]]:
    """(every difference between `target` and the database at `db_url` as flat tuples, the names filtered out)."""
    excluded: set[str] = set()
    with engine_for(db_url).connect() as conn:

        def include_name(name, type_, _parent_names) -> bool:
            if _runtime_table(conn.dialect.name, type_, name):
                excluded.add(name)
                return False
            return True

        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True, "include_name": include_name}
        )
        # Column changes come grouped in a list per column; the rest are tuples.
        diff = [
            op for entry in compare_metadata(context, target) for op in (entry if isinstance(entry, list) else [entry])
        ]
    return diff, excluded


def _with_runtime_tables(db_url: str) -> None:
    """What a running pipeline adds: a part's table (both backends) and, on PostgreSQL, a partition."""
    version = in_transaction(
        db_url,
        registry.register,
        level="frame",
        preset="small",
        checkpoint_uri="file:///models/1/model.pt",
        config={},
        data_uri="file:///parquet",
        train_split="train",
        epochs=1,
        steps=1,
    )
    with engine_for(db_url).begin() as conn:
        run = start_run(conn, datetime(2026, 11, 1, 2, tzinfo=UTC), version, top_k=20, airflow_run_id=None)
        create_part_table(conn, version, run, 0)
        create_part_table(conn, version, run, 0, SEGMENTS)
        ensure_partition(conn, version + 1)
        ensure_partition(conn, version + 1, SEGMENTS)


def test_schema_py_is_what_the_migrations_build(db_url):
    _with_runtime_tables(db_url)
    diff, excluded = _diff(db_url)
    assert diff == []
    if db_url.startswith("postgresql"):  # the filter took the run-time tables, and only them
        assert excluded == {
            f"{table}{name}"
            for table in ("", "segment_")
            for name in ("predictions_default", "predictions_v1_run1_part0", "predictions_v2")
        } | {"predictions_v2_base"}
    else:
        assert excluded == {"predictions_v1_run1_part0", "segment_predictions_v1_run1_part0"}


def _condition(sqltext: str) -> tuple[str, list[str]]:
    # PostgreSQL rewrites `status IN ('a', 'b')` as `status::text = ANY (ARRAY['a'::character varying, ...])`:
    # compare what both spellings keep, the column and the literals in order.
    return re.match(r"\W*(\w+)", sqltext).group(1), re.findall(r"'([^']*)'", sqltext)


def _declared_conditions(table, dialect: str) -> dict[tuple[str, str], tuple[str, list[str]]]:
    """{("check", name) or ("where", index name): condition} of a metadata table."""
    conditions = {
        ("check", c.name): _condition(str(c.sqltext)) for c in table.constraints if isinstance(c, CheckConstraint)
    }
    for index in table.indexes:
        if (where := index.dialect_options[dialect]["where"]) is not None:
            conditions[("where", index.name)] = _condition(str(where))
    return conditions


def _reflected_conditions(inspector, table: str, dialect: str) -> dict[tuple[str, str], tuple[str, list[str]]]:
    conditions = {("check", c["name"]): _condition(c["sqltext"]) for c in inspector.get_check_constraints(table)}
    for index in inspector.get_indexes(table):
        if (where := index["dialect_options"].get(f"{dialect}_where")) is not None:
            conditions[("where", index["name"])] = _condition(str(where))
    return conditions


def _condition_drift(db_url: str, target: MetaData = metadata) -> dict[str, tuple[dict, dict]]:
    """What compare_metadata does not compare, check constraints and partial indexes' predicates:
    {table: (its conditions in `target`, in the database)} for each table where they differ."""
    engine = engine_for(db_url)
    inspector, dialect = inspect(engine), engine.dialect.name
    drift = {}
    for table in target.sorted_tables:
        declared = _declared_conditions(table, dialect)
        reflected = _reflected_conditions(inspector, table.name, dialect)
        if declared != reflected:
            drift[table.name] = (declared, reflected)
    return drift


def _copy(target: MetaData) -> MetaData:
    copy = MetaData()
    for table in target.sorted_tables:
        table.to_metadata(copy)
    return copy


def test_check_constraints_and_partial_indexes_are_the_migrations(db_url):
    assert _condition_drift(db_url) == {}


def test_a_drifted_schema_is_named(db_url):
    """The comparison fails when schema.py drifts: a column, an index or a type the migrations lack."""
    drifted = _copy(metadata)
    videos = drifted.tables["videos"]
    videos.append_column(Column("duration_s", Float))
    Index("ix_videos_split", videos.c.split)
    drifted.tables["labels"].c.knowledge_graph_id.type = String(128)

    diff, _ = _diff(db_url, drifted)
    assert sorted((op[0], op[2], op[3]) for op in diff if op[0] == "modify_type") == [
        ("modify_type", "labels", "knowledge_graph_id")
    ]
    assert [(op[0], op[2], op[3].name) for op in diff if op[0] == "add_column"] == [
        ("add_column", "videos", "duration_s")
    ]
    assert [(op[0], op[1].name) for op in diff if op[0] == "add_index"] == [("add_index", "ix_videos_split")]
    assert len(diff) == 3


def test_a_drifted_condition_is_named(db_url):
    """schema.py keeping 0001's shard statuses (without 0006's `replaced`), or a partial index over other rows."""
    drifted = _copy(metadata)
    shards = drifted.tables["ingested_shards"]
    shards.constraints.discard(next(c for c in shards.constraints if c.name == "ck_ingested_shards_status"))
    shards.append_constraint(
        CheckConstraint("status IN ('running', 'succeeded', 'failed')", name="ck_ingested_shards_status")
    )
    versions = drifted.tables["model_versions"]
    versions.indexes.discard(next(i for i in versions.indexes if i.name == "uq_model_versions_production"))
    archived = text("status = 'archived'")
    Index(
        "uq_model_versions_production", versions.c.level, unique=True, postgresql_where=archived, sqlite_where=archived
    )

    drift = _condition_drift(db_url, drifted)
    assert sorted(drift) == ["ingested_shards", "model_versions"]
    declared, reflected = drift["ingested_shards"]
    assert declared[("check", "ck_ingested_shards_status")] == ("status", ["running", "succeeded", "failed"])
    assert reflected[("check", "ck_ingested_shards_status")] == (
        "status",
        ["running", "succeeded", "failed", "replaced"],
    )
    declared, reflected = drift["model_versions"]
    assert declared[("where", "uq_model_versions_production")] == ("status", ["archived"])
    assert reflected[("where", "uq_model_versions_production")] == ("status", ["production"])


def test_tasks_check_the_schema_and_never_migrate_it(empty_db_url, tmp_path):
    """Migrations run at deploy time (`vtag db upgrade`); a task on a database left behind refuses, in one
    line naming that command, before it reads or writes anything, and leaves the schema as it found it."""
    from storage.database import db
    from tasks.inference import run_inference
    from tasks.ingest import ingest

    (tmp_path / "raw").mkdir()
    head = db.head_revision()
    with pytest.raises(
        db.SchemaOutOfDate, match=rf"has no vtag schema, this release needs {head}: run `vtag db upgrade"
    ):
        ingest(str(tmp_path / "raw"), str(tmp_path / "parquet"), empty_db_url)
    assert db.current_revision(empty_db_url) is None
    assert not (tmp_path / "parquet").exists()

    db.upgrade(empty_db_url, "0005")  # the release before: a deployment that upgraded the code, not the schema
    with pytest.raises(db.SchemaOutOfDate, match=rf"is at schema revision 0005, this release needs {head}"):
        run_inference(empty_db_url, datetime(2030, 1, 1, tzinfo=UTC))
    assert db.current_revision(empty_db_url) == "0005"

    db.upgrade(empty_db_url)
    assert not ingest(str(tmp_path / "raw"), str(tmp_path / "parquet"), empty_db_url).failed
