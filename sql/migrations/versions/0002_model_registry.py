"""The model registry: every trained model version, and every evaluation of one.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_versions",
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("preset", sa.String(64), nullable=False),
        sa.Column("checkpoint_uri", sa.String(1024), nullable=False, unique=True),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("data_uri", sa.String(1024), nullable=False),
        sa.Column("train_split", sa.String(16), nullable=False),
        sa.Column("epochs", sa.Integer, nullable=False),
        sa.Column("steps", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("run_id", sa.String(256)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("promoted_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint(
            "status IN ('trained', 'production', 'archived', 'rejected')", name="ck_model_versions_status"
        ),
        sa.CheckConstraint("level IN ('frame', 'video')", name="ck_model_versions_level"),
    )
    # At most one production model per level, whatever the code does.
    op.create_index(
        "uq_model_versions_production",
        "model_versions",
        ["level"],
        unique=True,
        postgresql_where=sa.text("status = 'production'"),
        sqlite_where=sa.text("status = 'production'"),
    )
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "model_version", sa.Integer, sa.ForeignKey("model_versions.version", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("split", sa.String(16), nullable=False),
        sa.Column("data_uri", sa.String(1024), nullable=False),
        sa.Column("pattern", sa.String(256), nullable=False),
        sa.Column("hit_at_one", sa.Float, nullable=False),
        sa.Column("perr", sa.Float, nullable=False),
        sa.Column("gap", sa.Float, nullable=False),
        sa.Column("map", sa.Float, nullable=False),
        sa.Column("videos", sa.Integer, nullable=False),
        sa.Column("plot_uri", sa.String(1024)),
        sa.Column("seconds", sa.Float, nullable=False),
        sa.Column("evaluated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_evaluations_model_split", "evaluations", ["model_version", "split"])


def downgrade() -> None:
    op.drop_index("ix_evaluations_model_split", table_name="evaluations")
    op.drop_table("evaluations")
    op.drop_index("uq_model_versions_production", table_name="model_versions")
    op.drop_table("model_versions")
