"""Labels, videos, ground truth, inference runs and predictions; the production labels view; the analysts' role.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

ANALYST_ROLE = "vtag_analyst"
READABLE = (
    "labels",
    "videos",
    "video_labels",
    "inference_runs",
    "predictions",
    "model_versions",
    "evaluations",
    "production_labels",
)


def upgrade() -> None:
    op.create_table(
        "labels",
        sa.Column("label_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("name", sa.Text, nullable=False, server_default=""),  # 56 real labels have no name
        sa.Column("knowledge_graph_id", sa.String(64)),
        sa.Column("train_video_count", sa.Integer),
        sa.Column("vertical1", sa.Text),
        sa.Column("vertical2", sa.Text),
        sa.Column("vertical3", sa.Text),
        sa.Column("wiki_url", sa.Text),
    )
    op.create_table(
        "videos",  # Google publishes the same videos at both levels: one row per (video, level)
        sa.Column("video_id", sa.String(32), primary_key=True),
        sa.Column("level", sa.String(8), primary_key=True),
        sa.Column("split", sa.String(16), nullable=False),
        sa.Column("source_uri", sa.String(1024), nullable=False),
        sa.Column("parquet_uri", sa.String(1024), nullable=False),
        sa.Column("ingested_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_videos_ingested_at", "videos", ["ingested_at"])
    op.create_index("ix_videos_source_uri", "videos", ["source_uri"])
    op.create_table(
        "video_labels",  # ground truth, where a video has it (not the test split), whatever the level
        sa.Column("video_id", sa.String(32), primary_key=True),
        sa.Column("label_id", sa.Integer, primary_key=True),
    )
    op.create_table(
        "inference_runs",
        sa.Column("run_id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("logical_date", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_version", sa.Integer, sa.ForeignKey("model_versions.version"), nullable=False),
        sa.Column("top_k", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("videos_total", sa.Integer, nullable=False, server_default="0"),
        sa.Column("videos_done", sa.Integer, nullable=False, server_default="0"),
        sa.Column("rows_written", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("error", sa.Text),
        sa.Column("airflow_run_id", sa.String(256)),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.UniqueConstraint("logical_date", "model_version", name="uq_inference_runs_date_model"),
        sa.CheckConstraint("status IN ('running', 'succeeded', 'failed')", name="ck_inference_runs_status"),
    )
    # No foreign keys on this fact table (120 M rows a model version at full scale): PostgreSQL checks
    # them row by row, which cut COPY from ~140,000 to ~42,000 rows/s (benchmarks/inference_throughput.py).
    # The only writer, storage/database/prediction_writes.py, writes ids it has just read from videos, model_versions
    # and inference_runs in the same database.
    op.create_table(
        "predictions",
        sa.Column("video_id", sa.String(32), primary_key=True),
        sa.Column("model_version", sa.Integer, primary_key=True),
        sa.Column("rank", sa.SmallInteger, primary_key=True),
        sa.Column("label_id", sa.Integer, nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("run_id", sa.Integer, nullable=False),
    )
    op.create_index("ix_predictions_label_score", "predictions", ["model_version", "label_id", "score"])
    # A run's rows are appended together, night after night: on PostgreSQL a BRIN index finds them
    # at almost no cost to the bulk write (a b-tree cost about 10% of it).
    op.create_index("ix_predictions_run", "predictions", ["run_id"], postgresql_using="brin")
    op.execute("""
        CREATE VIEW production_labels AS
        SELECT p.video_id, p.rank, p.label_id, l.name AS label_name, p.score, p.model_version, v.level
        FROM predictions p
        JOIN model_versions v ON v.version = p.model_version AND v.status = 'production'
        LEFT JOIN labels l ON l.label_id = p.label_id
    """)
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"""
            DO $$ BEGIN
                IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ANALYST_ROLE}') THEN
                    CREATE ROLE {ANALYST_ROLE} NOLOGIN;
                END IF;
            END $$
        """)
        op.execute(f"GRANT USAGE ON SCHEMA public TO {ANALYST_ROLE}")
        op.execute(f"GRANT SELECT ON {', '.join(READABLE)} TO {ANALYST_ROLE}")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"REVOKE ALL ON {', '.join(READABLE)} FROM {ANALYST_ROLE}")
        op.execute(f"REVOKE USAGE ON SCHEMA public FROM {ANALYST_ROLE}")
    op.execute("DROP VIEW production_labels")
    op.drop_index("ix_predictions_run", table_name="predictions")
    op.drop_index("ix_predictions_label_score", table_name="predictions")
    op.drop_table("predictions")
    op.drop_table("inference_runs")
    op.drop_table("video_labels")
    op.drop_index("ix_videos_source_uri", table_name="videos")
    op.drop_index("ix_videos_ingested_at", table_name="videos")
    op.drop_table("videos")
    op.drop_table("labels")
