"""Video ids found by their first characters, for the Tags search's suggestions.

`storage/database/views.py` `suggestions` offers the video ids that start with what one types
(`video_id LIKE 'abc%'`). PostgreSQL uses a b-tree for LIKE only under the C collation or with a pattern
operator class, so on a database created with any other (C.UTF-8 included, before PostgreSQL 17) each
keystroke scanned the whole catalogue: 45 ms at 10% of YouTube-8M, growing with it. This index serves the
prefix as a range. On SQLite it is an ordinary index on the id.

Revision ID: 0015
Revises: 0014
"""

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_videos_id_prefix", "videos", ["video_id"], postgresql_ops={"video_id": "varchar_pattern_ops"})


def downgrade() -> None:
    op.drop_index("ix_videos_id_prefix", table_name="videos")
