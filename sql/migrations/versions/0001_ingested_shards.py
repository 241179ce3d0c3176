"""The ingest manifest: one row per (source shard, destination).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ingested_shards",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("source_uri", sa.String(1024), nullable=False),
        sa.Column("dest_uri", sa.String(1024), nullable=False),
        sa.Column("output_uri", sa.String(1024)),
        sa.Column("level", sa.String(8)),
        sa.Column("split", sa.String(16)),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("fingerprint", sa.String(256), nullable=False),
        sa.Column("checksum", sa.String(64)),
        sa.Column("rows", sa.Integer),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("error_record", sa.Integer),
        sa.Column("error_offset", sa.BigInteger),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.UniqueConstraint("source_uri", "dest_uri", name="uq_ingested_shards_source_dest"),
        sa.CheckConstraint("status IN ('running', 'succeeded', 'failed')", name="ck_ingested_shards_status"),
    )
    op.create_index("ix_ingested_shards_status", "ingested_shards", ["status"])


def downgrade() -> None:
    op.drop_index("ix_ingested_shards_status", table_name="ingested_shards")
    op.drop_table("ingested_shards")
