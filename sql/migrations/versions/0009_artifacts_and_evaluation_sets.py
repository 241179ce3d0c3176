"""Each stored result names what produced it.

`videos.content_fingerprint`: xxh3-128 (xxhash) of the video's record as last ingested. A shard converted again
  drops the predictions of the videos whose fingerprint changed or that left it (every version's of that level), so that
  they are scored again; NULL for videos ingested before, which count as changed.
`evaluations.set_fingerprint`: the exact videos an evaluation scored (their ids and the content of the files
  they were read from; model/evaluate.py `VideoSet`): promotion compares two versions only on equal ones.
  NULL for evaluations made before: they match none, so production is evaluated again.
`model_versions.loss_plot_uri`: the version's own loss curve, drawn from its checkpoint's history under a
  key of its checkpoint's (NULL before: the UI falls back to the training folder's loss.png).
`inference_runs.exports_uri`: the folder the run wrote its exports to (NULL before: the UI looks where the
  DAG and the CLI write them).

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

COLUMNS = (
    ("videos", sa.Column("content_fingerprint", sa.String(32))),
    ("evaluations", sa.Column("set_fingerprint", sa.String(64))),
    ("model_versions", sa.Column("loss_plot_uri", sa.String(1024))),
    ("inference_runs", sa.Column("exports_uri", sa.String(1024))),
)


def upgrade() -> None:
    for table, column in COLUMNS:
        op.add_column(table, column)


def downgrade() -> None:
    for table, column in reversed(COLUMNS):
        op.drop_column(table, column.name)
