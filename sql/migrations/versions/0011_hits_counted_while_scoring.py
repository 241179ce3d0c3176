"""Hits counted while a night writes: precision over a version reads totals, not its 122 M rows.

- `predictions.hit`: whether the row's label was among the video's ground truth when it was scored
  (NULL: the video had none). Rows written before this migration are judged here, once, against the
  ground truth they have now (one pass over each version's rows: about as long as one of the old
  `precision_at_k` queries at full size, during the deploy, before any night runs).
- `inference_label_counts.judged`, `.hits`: of a part's videos with a label at a rank, those judged, and
  the true ones among them (the same, for parts published before: 0).
- `version_hits`: judged rows and hits at each rank over the rows a version serves
  (storage/database/label_counts.py keeps it in step), readable by the analysts' role.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("predictions", sa.Column("hit", sa.Boolean))
    for name in ("judged", "hits"):
        op.add_column("inference_label_counts", sa.Column(name, sa.Integer, nullable=False, server_default="0"))
    op.create_table(
        "version_hits",
        sa.Column("model_version", sa.Integer, primary_key=True),
        sa.Column("rank", sa.SmallInteger, primary_key=True),
        sa.Column("judged", sa.BigInteger, nullable=False),
        sa.Column("hits", sa.BigInteger, nullable=False),
    )
    op.execute(
        "UPDATE predictions SET hit = EXISTS (SELECT 1 FROM video_labels t WHERE t.video_id = predictions.video_id "
        "AND t.label_id = predictions.label_id) WHERE EXISTS (SELECT 1 FROM video_labels t "
        "WHERE t.video_id = predictions.video_id)"
    )
    op.execute(
        "INSERT INTO version_hits (model_version, rank, judged, hits) "
        "SELECT model_version, rank, COUNT(hit), SUM(CASE WHEN hit THEN 1 ELSE 0 END) FROM predictions "
        "WHERE hit IS NOT NULL GROUP BY model_version, rank"
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("GRANT SELECT ON version_hits TO vtag_analyst")


def downgrade() -> None:
    op.drop_table("version_hits")
    for name in ("hits", "judged"):
        op.drop_column("inference_label_counts", name)
    op.drop_column("predictions", "hit")
