"""Segment predictions: where in each video its labels are, the night's best 5-second segments per video.

- `segment_predictions`: per model version and video, its best `rank` 1..M (segment, class) pairs over the
  1,000 segment-rated classes, the second the segment starts at and its score; written by the night's
  parts into part tables of their own and published with the night's predictions (storage/database/
  segment_writes.py). LIST-partitioned by model_version on PostgreSQL like `predictions` (a version's
  partition made when its first segments are published, retired by DROP TABLE); one table on SQLite. The
  label index serves "top segments of label X" (sql/queries/label_top_segments.sql) as an ordered read.
- `inference_parts.segment_rows`: the segment rows a part wrote, kept with its other counters.

Readable by the analysts' role.

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    op.create_table(
        "segment_predictions",
        sa.Column("video_id", sa.String(32), primary_key=True),
        sa.Column("model_version", sa.Integer, primary_key=True),
        sa.Column("rank", sa.SmallInteger, primary_key=True),
        sa.Column("label_id", sa.Integer, nullable=False),
        sa.Column("start_second", sa.Integer, nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("run_id", sa.Integer, nullable=False),
        **({"postgresql_partition_by": "LIST (model_version)"} if postgresql else {}),
    )
    if postgresql:
        op.execute("CREATE TABLE segment_predictions_default PARTITION OF segment_predictions DEFAULT")
    op.create_index(
        "ix_segment_predictions_label_score",
        "segment_predictions",
        ["model_version", "label_id", sa.text("score DESC"), "video_id", "start_second"],
    )
    op.add_column("inference_parts", sa.Column("segment_rows", sa.BigInteger, nullable=False, server_default="0"))
    if postgresql:
        op.execute("GRANT SELECT ON segment_predictions TO vtag_analyst")


def downgrade() -> None:
    op.drop_column("inference_parts", "segment_rows")
    op.drop_index("ix_segment_predictions_label_score", table_name="segment_predictions")
    op.drop_table("segment_predictions")  # and its partitions on PostgreSQL
