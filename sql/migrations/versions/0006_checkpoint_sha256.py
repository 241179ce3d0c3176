"""Model versions record the content they stand for.

- `model_versions.checkpoint_sha256`: the sha256 of the checkpoint's bytes when the version was
  registered; every load of the version's checkpoint compares it, so weights that changed under the
  version's URI are refused instead of scored with. Versions registered before stay NULL: unverified.
- `ingested_shards.status` may be `replaced`: the shard's output file now holds another source's videos
  (`vtag ingest --replace`), so the shard is neither converted nor quarantined.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


STATUS_CHECK = "ck_ingested_shards_status"


def _shard_statuses(statuses: tuple[str, ...]) -> None:
    # batch mode: SQLite changes a CHECK constraint only by copying the table.
    with op.batch_alter_table("ingested_shards", recreate="auto") as batch:
        batch.drop_constraint(STATUS_CHECK, type_="check")
        batch.create_check_constraint(STATUS_CHECK, sa.text(f"status IN {statuses!r}"))


def upgrade() -> None:
    op.add_column("model_versions", sa.Column("checkpoint_sha256", sa.String(64)))
    _shard_statuses(("running", "succeeded", "failed", "replaced"))


def downgrade() -> None:
    op.execute("UPDATE ingested_shards SET status = 'failed' WHERE status = 'replaced'")
    _shard_statuses(("running", "succeeded", "failed"))
    op.drop_column("model_versions", "checkpoint_sha256")
