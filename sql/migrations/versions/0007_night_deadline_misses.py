"""Nights that missed their deadline.

`night_deadline_misses`: one row per Airflow deadline of a `yt8m_nightly_inference` run that passed
  before the run finished (the DAG's DeadlineAlert callback, airflow_glue/alerts.py, writes it from the
  triggerer); unique per deadline, so a callback run twice records one miss.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "night_deadline_misses",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("deadline_id", sa.String(64), nullable=False),
        sa.Column("dag_id", sa.String(250), nullable=False),
        sa.Column("dag_run_id", sa.String(250), nullable=False),
        sa.Column("logical_date", sa.DateTime(timezone=True)),
        sa.Column("deadline_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("deadline_id", name="uq_night_deadline_misses_deadline"),
    )


def downgrade() -> None:
    op.drop_table("night_deadline_misses")
