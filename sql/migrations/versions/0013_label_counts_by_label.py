"""A label's nights: `inference_label_counts` indexed by label, then run.

The Video tags label page shows how many videos carry a label night after night and its precision there
(storage/database/views.py `label_nights`); the table's primary key leads with the run, so without this
index that read would scan every night's counts (about 1.9 M rows a full rescore).

Revision ID: 0013
Revises: 0012
"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_inference_label_counts_label_run", "inference_label_counts", ["label_id", "run_id"])


def downgrade() -> None:
    op.drop_index("ix_inference_label_counts_label_run", table_name="inference_label_counts")
