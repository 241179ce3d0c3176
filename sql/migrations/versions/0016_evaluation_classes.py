"""Each evaluation's average precision class by class.

`evaluation_classes`: for every evaluation, each class with a positive among the videos it scored, how many
positives and its average precision (the starter's per-class AP, whose mean over these classes is the
evaluation's mAP). The Models pages put a candidate beside production on the same videos
(`evaluations.set_fingerprint`) and name the classes that gained and lost most. Evaluations recorded before
this migration have no rows here: their pages say so.

Revision ID: 0016
Revises: 0015
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "evaluation_classes",
        sa.Column("evaluation_id", sa.Integer, sa.ForeignKey("evaluations.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("label_id", sa.Integer, primary_key=True),
        sa.Column("positives", sa.Integer, nullable=False),
        sa.Column("average_precision", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("evaluation_classes")
