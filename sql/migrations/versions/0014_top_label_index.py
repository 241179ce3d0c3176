"""Each version's rank-1 rows indexed apart, for top_label_changes.

`sql/queries/top_label_changes.sql` compares two versions' top label video by video. Without this index it
read both versions' whole partitions (20 rows a video for the one it needs) and sorted or probed them: 32 s
at YouTube-8M's size, growing n^1.15. With it, both sides are ordered scans of this index alone, merged by
video id: no sort, no heap (the partition's visibility map set by the VACUUM after its first night). A
partial index over 1 row in 20, so a night's publish pays little for it.

On PostgreSQL the index is created on every existing partition of `predictions` (a build per version's
partition: about 10 s for 6 M videos); later partitions get it before they are attached
(storage/database/partitions.py `attach_version`, `attach_layer`, since migration 0017).

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_predictions_top_label",
        "predictions",
        ["video_id", "model_version"],
        postgresql_include=["label_id", "score"],
        postgresql_where=sa.text("rank = 1"),
        sqlite_where=sa.text("rank = 1"),
    )


def downgrade() -> None:
    op.drop_index("ix_predictions_top_label", table_name="predictions")
