"""Human reviews of a model's promotion.

`model_reviews`: one row per review a `yt8m_train` run with `require_approval` asked for: the candidate
  version and the evaluation it was shown with, production's version and evaluation on the same set (none
  when there was no production model), when it was asked and until when it waits, and the outcome
  (`approved`, `rejected` or `timed_out`; NULL while it waits), who decided and when. Unique per
  (version, DAG run), so a rerun of the request asks once.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_reviews",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("model_version", sa.Integer, sa.ForeignKey("model_versions.version"), nullable=False),
        sa.Column("run_id", sa.String(256), nullable=False),
        sa.Column("evaluation_id", sa.Integer, sa.ForeignKey("evaluations.id"), nullable=False),
        sa.Column("production_version", sa.Integer, sa.ForeignKey("model_versions.version")),
        sa.Column("production_evaluation_id", sa.Integer, sa.ForeignKey("evaluations.id")),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deadline_at", sa.DateTime(timezone=True)),
        sa.Column("decision", sa.String(16)),
        sa.Column("decided_by", sa.String(256)),
        sa.Column("decided_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint(
            "decision IS NULL OR decision IN ('approved', 'rejected', 'timed_out')", name="ck_model_reviews_decision"
        ),
        sa.UniqueConstraint("model_version", "run_id", name="uq_model_reviews_version_run"),
    )
    op.create_index("ix_model_reviews_pending", "model_reviews", ["decision", "model_version"])


def downgrade() -> None:
    op.drop_index("ix_model_reviews_pending", table_name="model_reviews")
    op.drop_table("model_reviews")
