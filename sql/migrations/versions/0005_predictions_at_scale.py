"""Predictions at full size: one partition per model version on PostgreSQL, nights in parts, label counts.

- `predictions` becomes LIST-partitioned by model_version on PostgreSQL (`predictions_v<N>`, created when
  a version's first run starts, and `predictions_default` for rows of a version without one). A rescore
  writes into an empty partition whatever the table already holds, the pending anti-join probes only the
  version's partition, and retiring a version's 122 M rows is a DROP TABLE. SQLite keeps one table.
- The label index carries the tie-break of label_top_videos (score DESC, video_id), so that query reads
  `limit` index entries instead of sorting every row of a common label.
- `inference_parts`: a night is cut into parts (contiguous ranges of Parquet files) that run as mapped
  tasks on any GPU worker; each part's progress and outcome.
- `inference_label_counts`: per part, how many videos got each label at each rank, counted while
  scoring; run_label_counts sums it instead of aggregating a night's 122 M rows.
- `videos (level, parquet_uri)`: a part selects its videos by file range.
- `model_versions.predictions_retired_at`: when a version's predictions were dropped (`vtag retire`).
- `inference_runs.load_table`: a version's first whole night loads into a table of its own, indexed
  and attached as the version's partition when the night ends (storage/database/runs.py, start_run).
- `production_versions`: the version number of each level's production model, for the analysts'
  queries that must name it to reach one partition (the analysts' role does not read model_versions).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

ANALYST_ROLE = "vtag_analyst"
NEW_READABLE = ("inference_parts", "inference_label_counts", "production_versions")
COLUMNS = "video_id, model_version, rank, label_id, score, run_id"
VIEW = """
    CREATE VIEW production_labels AS
    SELECT p.video_id, p.rank, p.label_id, l.name AS label_name, p.score, p.model_version, v.level
    FROM predictions p
    JOIN model_versions v ON v.version = p.model_version AND v.status = 'production'
    LEFT JOIN labels l ON l.label_id = p.label_id
"""


def _predictions_columns() -> list[sa.Column]:
    return [
        sa.Column("video_id", sa.String(32), primary_key=True),
        sa.Column("model_version", sa.Integer, primary_key=True),
        sa.Column("rank", sa.SmallInteger, primary_key=True),
        sa.Column("label_id", sa.Integer, nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("run_id", sa.Integer, nullable=False),
    ]


def _label_index() -> None:
    op.create_index(
        "ix_predictions_label_score", "predictions", ["model_version", "label_id", sa.text("score DESC"), "video_id"]
    )


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    op.execute("DROP VIEW production_labels")
    op.drop_index("ix_predictions_label_score", table_name="predictions")
    if postgresql:
        op.drop_index("ix_predictions_run", table_name="predictions")
        op.execute("ALTER TABLE predictions RENAME TO predictions_0004")
        op.execute("ALTER TABLE predictions_0004 RENAME CONSTRAINT predictions_pkey TO predictions_0004_pkey")
        op.create_table("predictions", *_predictions_columns(), postgresql_partition_by="LIST (model_version)")
        op.execute("CREATE TABLE predictions_default PARTITION OF predictions DEFAULT")
        _label_index()
        op.create_index("ix_predictions_run", "predictions", ["run_id"], postgresql_using="brin")
        versions = [
            row[0] for row in op.get_bind().execute(sa.text("SELECT DISTINCT model_version FROM predictions_0004"))
        ]
        for version in versions:
            op.execute(
                f"CREATE TABLE predictions_v{int(version)} PARTITION OF predictions FOR VALUES IN ({int(version)})"
            )
        op.execute(f"INSERT INTO predictions ({COLUMNS}) SELECT {COLUMNS} FROM predictions_0004")
        op.execute("DROP TABLE predictions_0004")
    else:
        _label_index()
    op.execute(VIEW)

    op.create_table(
        "inference_parts",
        sa.Column("run_id", sa.Integer, sa.ForeignKey("inference_runs.run_id", ondelete="CASCADE"), primary_key=True),
        sa.Column("part", sa.Integer, primary_key=True),
        sa.Column("first_uri", sa.String(1024), nullable=False),
        sa.Column("last_uri", sa.String(1024), nullable=False),
        sa.Column("files", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("videos_total", sa.Integer, nullable=False, server_default="0"),
        sa.Column("videos_done", sa.Integer, nullable=False, server_default="0"),
        sa.Column("rows_written", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("error", sa.Text),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint("status IN ('planned', 'running', 'succeeded', 'failed')", name="ck_inference_parts_status"),
    )
    op.create_table(
        "inference_label_counts",
        sa.Column("run_id", sa.Integer, primary_key=True),
        sa.Column("part", sa.Integer, primary_key=True),
        sa.Column("rank", sa.SmallInteger, primary_key=True),
        sa.Column("label_id", sa.Integer, primary_key=True),
        sa.Column("videos", sa.Integer, nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id", "part"], ["inference_parts.run_id", "inference_parts.part"], ondelete="CASCADE"
        ),
    )
    op.create_index("ix_videos_level_parquet_uri", "videos", ["level", "parquet_uri"])
    op.add_column("model_versions", sa.Column("predictions_retired_at", sa.DateTime(timezone=True)))
    op.add_column("inference_runs", sa.Column("load_table", sa.String(64)))
    op.execute(
        "CREATE VIEW production_versions AS SELECT version, level FROM model_versions WHERE status = 'production'"
    )
    if postgresql:
        op.execute(f"GRANT SELECT ON predictions, production_labels, {', '.join(NEW_READABLE)} TO {ANALYST_ROLE}")


def downgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    if postgresql:
        op.execute(f"REVOKE ALL ON {', '.join(NEW_READABLE)} FROM {ANALYST_ROLE}")
    op.execute("DROP VIEW production_versions")
    op.drop_column("inference_runs", "load_table")
    op.drop_column("model_versions", "predictions_retired_at")
    op.drop_index("ix_videos_level_parquet_uri", table_name="videos")
    op.drop_table("inference_label_counts")
    op.drop_table("inference_parts")
    op.execute("DROP VIEW production_labels")
    op.drop_index("ix_predictions_label_score", table_name="predictions")
    if postgresql:
        op.execute("ALTER TABLE predictions RENAME TO predictions_0005")
        op.execute("ALTER TABLE predictions_0005 RENAME CONSTRAINT predictions_pkey TO predictions_0005_pkey")
        op.execute("ALTER INDEX ix_predictions_run RENAME TO ix_predictions_0005_run")
        op.create_table("predictions", *_predictions_columns())
        op.execute(f"INSERT INTO predictions ({COLUMNS}) SELECT {COLUMNS} FROM predictions_0005")
        op.execute("DROP TABLE predictions_0005")  # and every partition with it
        op.create_index("ix_predictions_run", "predictions", ["run_id"], postgresql_using="brin")
    op.create_index("ix_predictions_label_score", "predictions", ["model_version", "label_id", "score"])
    op.execute(VIEW)
    if postgresql:
        op.execute(f"GRANT SELECT ON predictions, production_labels TO {ANALYST_ROLE}")
