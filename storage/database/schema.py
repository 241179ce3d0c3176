"""The project's tables as SQLAlchemy Core metadata, as the migrations in sql/migrations leave them.

The migrations are the truth (they are what databases hold); this metadata mirrors their head:
columns, types, nullability, server defaults, indexes, unique, check and foreign-key constraints.
tests/test_schema.py compares the two on SQLite and PostgreSQL, so a change to one without the other
fails there. What is created at run time (predictions' partitions and load tables, see
storage/database/partitions.py), the views and the analysts' role live in the migrations only.
"""

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

from storage.formats.yt8m_spec import MAX_ID_LENGTH

metadata = MetaData()

ingested_shards = Table(
    "ingested_shards",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("source_uri", String(1024), nullable=False),
    Column("dest_uri", String(1024), nullable=False),
    Column("output_uri", String(1024)),
    Column("level", String(8)),
    Column("split", String(16)),
    Column("size_bytes", BigInteger, nullable=False),
    Column("fingerprint", String(256), nullable=False),
    Column("checksum", String(64)),
    Column("rows", Integer),
    Column("status", String(16), nullable=False),
    Column("error", Text),
    Column("error_record", Integer),
    Column("error_offset", BigInteger),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    UniqueConstraint("source_uri", "dest_uri", name="uq_ingested_shards_source_dest"),
    CheckConstraint("status IN ('running', 'succeeded', 'failed', 'replaced')", name="ck_ingested_shards_status"),
    Index("ix_ingested_shards_status", "status"),
)

model_versions = Table(
    "model_versions",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=True),
    Column("level", String(8), nullable=False),
    Column("preset", String(64), nullable=False),
    Column("checkpoint_uri", String(1024), nullable=False, unique=True),
    Column("config", JSON, nullable=False),
    Column("data_uri", String(1024), nullable=False),
    Column("train_split", String(16), nullable=False),
    Column("epochs", Integer, nullable=False),
    Column("steps", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("run_id", String(256)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("promoted_at", DateTime(timezone=True)),
    Column("predictions_retired_at", DateTime(timezone=True)),
    Column("checkpoint_sha256", String(64)),  # NULL: registered before migration 0006, never verified
    Column("loss_plot_uri", String(1024)),  # the version's own loss curve; NULL: registered before 0009
    # Its inference artifact (weights and config only) and that file's sha256; NULL: registered before 0010
    Column("weights_uri", String(1024)),
    Column("weights_sha256", String(64)),
    CheckConstraint("status IN ('trained', 'production', 'archived', 'rejected')", name="ck_model_versions_status"),
    CheckConstraint("level IN ('frame', 'video')", name="ck_model_versions_level"),
    # At most one production model per level, whatever the code does.
    Index(
        "uq_model_versions_production",
        "level",
        unique=True,
        postgresql_where=text("status = 'production'"),
        sqlite_where=text("status = 'production'"),
    ),
)

evaluations = Table(
    "evaluations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model_version", Integer, ForeignKey("model_versions.version", ondelete="CASCADE"), nullable=False),
    Column("split", String(16), nullable=False),
    Column("data_uri", String(1024), nullable=False),
    Column("pattern", String(256), nullable=False),
    Column("hit_at_one", Float, nullable=False),
    Column("perr", Float, nullable=False),
    Column("gap", Float, nullable=False),
    Column("map", Float, nullable=False),
    Column("videos", Integer, nullable=False),
    Column("plot_uri", String(1024)),
    Column("seconds", Float, nullable=False),
    Column("evaluated_at", DateTime(timezone=True), nullable=False),
    # the exact videos scored (model/evaluate.py VideoSet); NULL: before migration 0009, matches nothing
    Column("set_fingerprint", String(64)),
    Index("ix_evaluations_model_split", "model_version", "split"),
)

# Each evaluation's average precision of every class with a positive among its videos (migration 0016):
# what a candidate gained and lost against production, class by class, on the same videos.
evaluation_classes = Table(
    "evaluation_classes",
    metadata,
    Column("evaluation_id", Integer, ForeignKey("evaluations.id", ondelete="CASCADE"), primary_key=True),
    Column("label_id", Integer, primary_key=True),
    Column("positives", Integer, nullable=False),
    Column("average_precision", Float, nullable=False),
)

model_reviews = Table(
    "model_reviews",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model_version", Integer, ForeignKey("model_versions.version"), nullable=False),
    Column("run_id", String(256), nullable=False),  # the yt8m_train run that asked
    Column("evaluation_id", Integer, ForeignKey("evaluations.id"), nullable=False),  # what the reviewer saw
    Column("production_version", Integer, ForeignKey("model_versions.version")),  # None: no production model
    Column("production_evaluation_id", Integer, ForeignKey("evaluations.id")),
    Column("requested_at", DateTime(timezone=True), nullable=False),
    Column("deadline_at", DateTime(timezone=True)),  # None: waits until someone answers
    Column("decision", String(16)),  # None while it waits
    Column("decided_by", String(256)),
    Column("decided_at", DateTime(timezone=True)),
    CheckConstraint(
        "decision IS NULL OR decision IN ('approved', 'rejected', 'timed_out')", name="ck_model_reviews_decision"
    ),
    UniqueConstraint("model_version", "run_id", name="uq_model_reviews_version_run"),
    Index("ix_model_reviews_pending", "decision", "model_version"),
)

labels = Table(
    "labels",
    metadata,
    Column("label_id", Integer, primary_key=True, autoincrement=False),
    # 56 real labels have no name. Migration 0003 says server_default="", the same DDL (DEFAULT ''), but
    # Alembic's SQLite comparison cannot match an empty string with its reflected '' and would report drift.
    Column("name", Text, nullable=False, server_default=text("''")),
    Column("knowledge_graph_id", String(64)),
    Column("train_video_count", Integer),
    Column("vertical1", Text),
    Column("vertical2", Text),
    Column("vertical3", Text),
    Column("wiki_url", Text),
)

videos = Table(
    "videos",
    metadata,
    Column("video_id", String(MAX_ID_LENGTH), primary_key=True),
    Column("level", String(8), primary_key=True),
    Column("split", String(16), nullable=False),
    Column("source_uri", String(1024), nullable=False),
    Column("parquet_uri", String(1024), nullable=False),
    Column("ingested_at", DateTime(timezone=True), nullable=False),
    # xxh3-128 (xxhash) of the video's record: what its predictions were scored from; NULL before migration 0009
    Column("content_fingerprint", String(32)),
    Index("ix_videos_ingested_at", "ingested_at"),
    Index("ix_videos_source_uri", "source_uri"),
    Index("ix_videos_level_parquet_uri", "level", "parquet_uri"),  # a part selects its videos by file range
    # The Tags search's id prefixes (LIKE 'abc%'): the primary key cannot serve LIKE outside the C collation.
    Index("ix_videos_id_prefix", "video_id", postgresql_ops={"video_id": "varchar_pattern_ops"}),
)

video_labels = Table(
    "video_labels",
    metadata,
    Column("video_id", String(MAX_ID_LENGTH), primary_key=True),
    Column("label_id", Integer, primary_key=True),
)

inference_runs = Table(
    "inference_runs",
    metadata,
    Column("run_id", Integer, primary_key=True, autoincrement=True),
    Column("logical_date", DateTime(timezone=True), nullable=False),
    Column("model_version", Integer, ForeignKey("model_versions.version"), nullable=False),
    Column("top_k", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("videos_total", Integer, nullable=False, server_default="0"),
    Column("videos_done", Integer, nullable=False, server_default="0"),
    Column("rows_written", BigInteger, nullable=False, server_default="0"),
    Column("error", Text),
    Column("airflow_run_id", String(256)),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    Column(
        "load_table", String(64)
    ),  # a first whole night loading apart (PostgreSQL): see storage.database.runs.start_run
    Column("exports_uri", String(1024)),  # where this run wrote its exports; NULL: a run before migration 0009
    UniqueConstraint("logical_date", "model_version", name="uq_inference_runs_date_model"),
    CheckConstraint("status IN ('running', 'succeeded', 'failed')", name="ck_inference_runs_status"),
)

inference_parts = Table(
    "inference_parts",
    metadata,
    Column("run_id", Integer, ForeignKey("inference_runs.run_id", ondelete="CASCADE"), primary_key=True),
    Column("part", Integer, primary_key=True),
    Column("first_uri", String(1024), nullable=False),
    Column("last_uri", String(1024), nullable=False),
    Column("files", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("videos_total", Integer, nullable=False, server_default="0"),
    Column("videos_done", Integer, nullable=False, server_default="0"),
    Column("rows_written", BigInteger, nullable=False, server_default="0"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("segment_rows", BigInteger, nullable=False, server_default="0"),  # segment_predictions' rows
    Column("error", Text),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    CheckConstraint("status IN ('planned', 'running', 'succeeded', 'failed')", name="ck_inference_parts_status"),
)

inference_label_counts = Table(
    "inference_label_counts",
    metadata,
    Column("run_id", Integer, primary_key=True),
    Column("part", Integer, primary_key=True),
    Column("rank", SmallInteger, primary_key=True),
    Column("label_id", Integer, primary_key=True),
    Column("videos", Integer, nullable=False),
    # Of those videos, how many had ground truth when scored, and how many of these it was true for
    Column("judged", Integer, nullable=False, server_default="0"),
    Column("hits", Integer, nullable=False, server_default="0"),
    ForeignKeyConstraint(["run_id", "part"], ["inference_parts.run_id", "inference_parts.part"], ondelete="CASCADE"),
    Index("ix_inference_label_counts_label_run", "label_id", "run_id"),  # a label's nights (migration 0013)
)

predictions = Table(
    "predictions",  # LIST-partitioned by model_version on PostgreSQL: see migration 0005
    metadata,
    Column("video_id", String(MAX_ID_LENGTH), primary_key=True),  # no foreign keys: see migration 0003
    Column("model_version", Integer, primary_key=True),
    Column("rank", SmallInteger, primary_key=True),
    Column("label_id", Integer, nullable=False),
    Column("score", Float, nullable=False),
    Column("run_id", Integer, nullable=False),
    Column("hit", Boolean),  # the label among the video's ground truth when scored; NULL: it had none
    # The run whose night's table holds the row on PostgreSQL: a later night's own until it is merged into
    # the version's base, the first night's in the base; 0 once merged, or written without a night
    # (storage/database/partitions.py, migration 0017). 0 on SQLite, whose primary key is the three above.
    Column("layer", Integer, primary_key=True, server_default="0"),
    # A run's rows are appended together: a BRIN index finds them at almost no cost to the bulk write.
    Index("ix_predictions_run", "run_id", postgresql_using="brin"),
    postgresql_partition_by="LIST (model_version)",
)
# The tie-break of label_top_videos (score DESC, video_id): that query reads `limit` index entries.
# Declared apart because a descending column needs the table's column object.
Index(
    "ix_predictions_label_score",
    predictions.c.model_version,
    predictions.c.label_id,
    predictions.c.score.desc(),
    predictions.c.video_id,
)
# top_label_changes: two versions' rank-1 rows read side by side in video order, from this index alone.
Index(
    "ix_predictions_top_label",
    predictions.c.video_id,
    predictions.c.model_version,
    postgresql_include=["label_id", "score"],
    postgresql_where=text("rank = 1"),
    sqlite_where=text("rank = 1"),
)

# Each video's best 5-second segments over the 1,000 segment-rated classes (migration 0012)
segment_predictions = Table(
    "segment_predictions",  # LIST-partitioned by model_version on PostgreSQL, as predictions
    metadata,
    Column("video_id", String(MAX_ID_LENGTH), primary_key=True),
    Column("model_version", Integer, primary_key=True),
    Column("rank", SmallInteger, primary_key=True),
    Column("label_id", Integer, nullable=False),
    Column("start_second", Integer, nullable=False),
    Column("score", Float, nullable=False),
    Column("run_id", Integer, nullable=False),
    postgresql_partition_by="LIST (model_version)",
)
Index(
    "ix_segment_predictions_label_score",
    segment_predictions.c.model_version,
    segment_predictions.c.label_id,
    segment_predictions.c.score.desc(),
    segment_predictions.c.video_id,
    segment_predictions.c.start_second,
)

# A version's judged rows and hits at each rank over the rows it serves (storage/database/label_counts.py)
version_hits = Table(
    "version_hits",
    metadata,
    Column("model_version", Integer, primary_key=True),
    Column("rank", SmallInteger, primary_key=True),
    Column("judged", BigInteger, nullable=False),
    Column("hits", BigInteger, nullable=False),
)

night_deadline_misses = Table(
    "night_deadline_misses",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("deadline_id", String(64), nullable=False),  # Airflow's Deadline row: one miss per deadline
    Column("dag_id", String(250), nullable=False),
    Column("dag_run_id", String(250), nullable=False),
    Column("logical_date", DateTime(timezone=True)),  # None for a manual run without one
    Column("deadline_time", DateTime(timezone=True), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("deadline_id", name="uq_night_deadline_misses_deadline"),
)
