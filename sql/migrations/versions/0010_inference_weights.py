"""Inference reads weights, not training state.

`model_versions.weights_uri`, `weights_sha256`: the version's inference artifact (model/checkpoint.py
`publish_weights`: its config and weights alone, without the optimizer state and history a training
checkpoint carries), written when the version is registered; a night's parts load it, hashing it as they
read it. NULL for versions registered before: they load from their checkpoint, as then.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

COLUMNS = (sa.Column("weights_uri", sa.String(1024)), sa.Column("weights_sha256", sa.String(64)))


def upgrade() -> None:
    for column in COLUMNS:
        op.add_column("model_versions", column)


def downgrade() -> None:
    for column in reversed(COLUMNS):
        op.drop_column("model_versions", column.name)
